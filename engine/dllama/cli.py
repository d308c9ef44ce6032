"""The `dllama` command: inference, chat, convert, worker; flags as in Distributed Llama.

    dllama inference --model m.m --tokenizer tok/ --prompt "Hello" --steps 64 --buffer-float-type q80
    dllama chat --model m.m --tokenizer tok/ --system-prompt "You are terse."
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

# numpy and tokenizers load only for the commands that generate: `dllama --version`, `--help` and
# `dllama worker` start in a fraction of the time on a slow board.
if TYPE_CHECKING:
    from dllama.sampler import Sampler
    from dllama.tokenizer import Tokenizer

PROG = "dllama"
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# Distributed Llama flags that mean nothing here: accepted so existing command lines keep working.
IGNORED_FLAGS = {
    "weights_float_type": "the weight type is read from the model file",
    "nbatches": "the prompt is evaluated in one batch",
    "net_turbo": "sockets are always set up for low latency",
    "chat_template": "the chat template comes from tokenizer_config.json",
    "gpu_index": "there is no GPU backend",
    "gpu_segments": "there is no GPU backend",
}


class CliError(Exception):
    """A problem the user can fix: printed as one line, no traceback."""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("DLLAMA_DEBUG", "") not in ("", "0")
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        if not hasattr(args, "run"):
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `dllama inference ... | head`: the reader left, nothing to report
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the interpreter's final flush quiet
        return EXIT_ERROR
    except (CliError, ValueError, OSError, RuntimeError) as e:
        if debug:
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_ERROR


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Qwen3 and Llama 3 inference on one machine or a cluster of small boards."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (or set DLLAMA_DEBUG=1)")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    p = sub.add_parser(
        "inference", parents=[_model_flags(), debug], help="complete a prompt and print the run's figures",
        description="Complete a raw prompt (no chat template) and print prefill and decode figures.",
    )
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="maximum number of generated tokens (default: until the context is full)")
    p.set_defaults(run=run_inference)

    p = sub.add_parser(
        "chat", parents=[_model_flags(), debug], help="talk with the model",
        description="Interactive chat using the tokenizer's chat template. /exit or Ctrl-D ends, /clear forgets.",
    )
    p.add_argument("--system-prompt", default=None, help="the system message of the conversation")
    p.add_argument("--enable-thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="Qwen3 thinking mode (default: the template's default)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="maximum tokens per reply (default: until the context is full)")
    p.set_defaults(run=run_chat)

    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint to a .m model file",
                       conflict_handler="resolve")  # dllama.convert's own flags win
    if _command(argv) == "convert":
        _mount_convert(p)
    p.set_defaults(run=p.get_default("run") or _convert_unavailable)

    p = sub.add_parser("worker", parents=[debug], help="serve as a worker node of a cluster")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    p.add_argument("--port", type=_port, default=9999, help="port to listen on (default: 9999)")
    p.add_argument("--nthreads", type=_positive_int, default=os.cpu_count() or 1, help="threads of the core")
    p.add_argument("--cluster-key-file", default=None, help="the cluster's shared key (root and workers)")
    p.add_argument("--cache-dir", default=None, help="keep received weight slices here across restarts")
    p.add_argument("--cache-max-bytes", type=_size, default=None, metavar="SIZE",
                   help="bound the slice cache (e.g. 20G); the oldest entries go first (default: no bound)")
    p.add_argument("--max-memory", type=_size, default=None, metavar="SIZE",
                   help="refuse sessions that need more memory than this (e.g. 7G); sessions that need more "
                        "than the machine has available are refused either way (default: no other bound)")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds a peer may stay silent inside a handshake or a step (default: 10)")
    p.set_defaults(run=run_worker)
    return parser


def _model_flags() -> argparse.ArgumentParser:
    flags = argparse.ArgumentParser(add_help=False)
    g = flags.add_argument_group("model")
    g.add_argument("--model", required=True, help="the .m model file")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer.json or its directory (default: the model file's directory)")
    g.add_argument("--buffer-float-type", choices=("q80", "f32"), default="q80", type=str.lower,
                   help="type of the activations exchanged between nodes (default: q80)")
    g.add_argument("--nthreads", type=_positive_int, default=os.cpu_count() or 1,
                   help="threads of the core on this node (default: all CPUs)")
    g.add_argument("--max-seq-len", type=_positive_int, default=None,
                   help="context size in tokens (default: the engine's, at most the model's)")
    g.add_argument("--workers", nargs="+", type=_host_port, default=[], metavar="HOST:PORT",
                   help="worker nodes, in slice order (HOST:PORT@W gives a node a share of weight W)")
    g.add_argument("--cluster-key-file", default=None, help="the cluster's shared key (root and workers)")
    g = flags.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.8, help="0 for greedy (default: 0.8)")
    g.add_argument("--topp", type=float, default=0.9, help="nucleus sampling threshold (default: 0.9)")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: from the OS)")
    g = flags.add_argument_group("accepted for Distributed Llama compatibility, ignored")
    g.add_argument("--weights-float-type", type=str.lower, default=None, help=argparse.SUPPRESS)
    g.add_argument("--nbatches", type=int, default=None, help=argparse.SUPPRESS)
    g.add_argument("--net-turbo", type=int, default=None, help=argparse.SUPPRESS)
    g.add_argument("--chat-template", default=None, help=argparse.SUPPRESS)
    g.add_argument("--gpu-index", type=int, default=None, help=argparse.SUPPRESS)
    g.add_argument("--gpu-segments", default=None, help=argparse.SUPPRESS)
    return flags


# commands


def run_inference(args: argparse.Namespace) -> int:
    sampler = _sampler(args)
    tokenizer, engine = _load(args)
    with _closing(engine):
        return _inference(args, sampler, tokenizer, engine)


def _closing(engine: Any) -> contextlib.AbstractContextManager:
    # closing tells a cluster's workers the session ended, so they listen again at once
    return contextlib.closing(engine) if hasattr(engine, "close") else contextlib.nullcontext()


def _inference(args: argparse.Namespace, sampler: Sampler, tokenizer: Tokenizer, engine: Any) -> int:
    from dllama.generate import format_stats, generate

    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise CliError("the prompt is empty")
    steps = args.steps if args.steps is not None else engine.max_seq_len
    engine.reset()

    out = _stdout()
    decoder = tokenizer.stream_decoder()
    out.write(args.prompt)
    out.flush()

    def on_token(token: int) -> None:
        piece = decoder.push(token)
        if piece:
            out.write(piece)
            out.flush()

    result = generate(engine, prompt_ids, steps=steps, sampler=sampler, eos_ids=tokenizer.eos_ids, on_token=on_token)
    out.write(decoder.flush() + "\n\n")
    out.write(format_stats(result) + "\n")
    out.flush()
    return 0


def run_chat(args: argparse.Namespace) -> int:
    sampler = _sampler(args)
    tokenizer, engine = _load(args)
    with _closing(engine):
        return _chat(args, sampler, tokenizer, engine)


def _chat(args: argparse.Namespace, sampler: Sampler, tokenizer: Tokenizer, engine: Any) -> int:
    from dllama.generate import generate

    if tokenizer.chat_template is None:
        raise CliError("the tokenizer has no chat template; use `dllama inference` for raw prompts")
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass

    out = _stdout()
    system = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    history: list[dict[str, Any]] = []
    fed: list[int] = []  # tokens the engine holds in its KV cache, in order
    engine.reset()
    print("Type a message; /clear forgets the conversation, /exit (or Ctrl-D) ends.", file=sys.stderr)
    while True:
        try:
            line = input("\n> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        command = line.strip()
        if command in ("/exit", "/quit", "/bye"):
            return 0
        if command == "/clear":
            history.clear()
            continue
        if not command:
            continue
        history.append({"role": "user", "content": line})
        ids = _render_fitting(tokenizer, system, history, args.enable_thinking, engine.max_seq_len)
        if ids is None:
            history.pop()
            print(f"{PROG}: that message does not fit in the context ({engine.max_seq_len} tokens)", file=sys.stderr)
            continue

        fed, new_ids = _reuse_cache(engine, fed, ids)

        decoder = tokenizer.stream_decoder()

        def on_token(token: int) -> None:
            piece = decoder.push(token)
            if piece:
                out.write(piece)
                out.flush()

        steps = args.steps if args.steps is not None else engine.max_seq_len
        try:
            result = generate(engine, new_ids, steps=steps, sampler=sampler, eos_ids=tokenizer.eos_ids,
                              on_token=on_token)
        except KeyboardInterrupt:
            out.write("\n")
            return 0
        out.write(decoder.flush() + "\n")
        out.flush()
        fed = (fed + new_ids + result.tokens)[: engine.position]
        history.append({"role": "assistant", "content": decoder.text})
        if result.finish_reason == "length" and engine.position >= engine.max_seq_len:
            print(f"{PROG}: the context is full ({engine.max_seq_len} tokens); older turns will be dropped",
                  file=sys.stderr)


def run_worker(args: argparse.Namespace) -> int:
    from .cluster import worker

    return worker.run(args)


def _convert_unavailable(args: argparse.Namespace) -> int:
    raise CliError("dllama convert is not available in this build")


def _mount_convert(parser: argparse.ArgumentParser) -> None:
    """Add dllama.convert's flags; imported only when `convert` is the command."""
    import importlib

    try:
        convert = importlib.import_module("dllama.convert")
    except ModuleNotFoundError as e:
        if e.name != "dllama.convert":
            raise CliError(f"dllama convert needs the {e.name} package") from None
        parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        return
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    convert.add_arguments(parser)
    parser.set_defaults(run=convert.run)


# loading


def _load(args: argparse.Namespace) -> tuple[Tokenizer, Any]:
    from dllama.tokenizer import Tokenizer

    for name, reason in IGNORED_FLAGS.items():
        if getattr(args, name, None) is not None:
            print(f"{PROG}: note: --{name.replace('_', '-')} is ignored ({reason})", file=sys.stderr)
    model = Path(args.model)
    if not model.is_file():
        raise CliError(f"model file not found: {model}" if not model.exists() else f"not a model file: {model}")
    tokenizer = Tokenizer.load(args.tokenizer if args.tokenizer is not None else _default_tokenizer(model))

    try:
        from dllama import Engine
    except ImportError as e:
        raise CliError(f"the native core is not available ({e}); reinstall dllama-cluster") from None
    options: dict[str, Any] = {"max_seq_len": args.max_seq_len} if args.max_seq_len is not None else {}
    engine = Engine(str(model), nthreads=args.nthreads, buffer_float_type=args.buffer_float_type,
                    workers=list(args.workers), cluster_key_file=args.cluster_key_file, **options)  # no --max-seq-len: the engine's default

    config = getattr(engine, "config", None)
    model_vocab = getattr(config, "vocab_size", None)
    if isinstance(model_vocab, int) and tokenizer.vocab_size > model_vocab:
        raise CliError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model_vocab}: wrong tokenizer?"
        )
    print(f"{PROG}: {_describe(engine, args)}", file=sys.stderr)
    return tokenizer, engine


def _default_tokenizer(model: Path) -> Path:
    directory = model.resolve().parent
    if (directory / "tokenizer.json").is_file():
        return directory
    raise CliError(f"--tokenizer is required (no tokenizer.json beside {model})")


def _describe(engine: Any, args: argparse.Namespace) -> str:
    config = getattr(engine, "config", None)
    parts = []
    arch = getattr(config, "arch", None)
    if arch is not None:
        parts.append(getattr(arch, "name", str(arch)).lower())
    for label, name in (("layers", "n_layers"), ("dim", "dim")):
        value = getattr(config, name, None)
        if value is not None:
            parts.append(f"{label} {value}")
    n_experts = getattr(config, "n_experts", 0)
    if n_experts:
        parts.append(f"experts {getattr(config, 'n_active_experts', '?')}/{n_experts}")
    weight_type = getattr(config, "weight_type", None)
    if weight_type is not None:
        parts.append(f"weights {getattr(weight_type, 'name', weight_type)}".lower())
        wanted = args.weights_float_type
        if wanted and wanted != str(getattr(weight_type, "name", weight_type)).lower():
            print(f"{PROG}: note: the model's weights are {weight_type.name.lower()}, not {wanted}", file=sys.stderr)
    parts.append(f"context {engine.max_seq_len}")
    parts.append(f"buffer {args.buffer_float_type}")
    parts.append(f"{args.nthreads} thread{'s' if args.nthreads > 1 else ''}")
    parts.append(f"{1 + len(args.workers)} node{'s' if args.workers else ''}")
    return ", ".join(parts)


def _render_fitting(
    tokenizer: Tokenizer, system: list[dict[str, Any]], history: list[dict[str, Any]],
    enable_thinking: bool | None, max_seq_len: int,
) -> list[int] | None:
    """The conversation's tokens, dropping the oldest turns until it leaves room for a reply."""
    while True:
        text = tokenizer.apply_chat_template(system + history, add_generation_prompt=True,
                                             enable_thinking=enable_thinking)
        ids = tokenizer.encode(text, add_special_tokens=False)  # the template writes any BOS itself
        if len(ids) < max_seq_len:
            return ids
        # drop the oldest exchange: everything before the second user message
        users = [i for i, m in enumerate(history) if m["role"] == "user"]
        if len(users) < 2:
            return None
        del history[: users[1]]


def _reuse_cache(engine: Any, fed: list[int], ids: list[int]) -> tuple[list[int], list[int]]:
    """Split ids into what the engine's KV cache already holds and what it must evaluate.

    The cache is kept when the conversation grew at its end; an engine with rewind(n) (keep the
    first n tokens) also keeps the common prefix when the template rewrote an earlier turn."""
    if engine.position != len(fed):
        fed = []
    keep, limit = 0, min(len(fed), len(ids) - 1)  # always evaluate at least one token
    while keep < limit and fed[keep] == ids[keep]:
        keep += 1
    rewind = getattr(engine, "rewind", None)
    if keep == len(fed) and keep > 0:
        return fed, ids[keep:]
    if keep > 0 and callable(rewind):
        rewind(keep)
        return fed[:keep], ids[keep:]
    engine.reset()
    return [], ids


def _sampler(args: argparse.Namespace) -> Sampler:
    from dllama.sampler import Sampler

    return Sampler(temperature=args.temperature, topp=args.topp, seed=args.seed)


def _stdout() -> Any:
    out = sys.stdout
    if hasattr(out, "reconfigure"):
        out.reconfigure(errors="replace")  # a non-UTF-8 terminal gets '?' rather than a crash
    return out


# argument types


def _size(text: str) -> int:
    from .cluster.footprint import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _host_port(text: str) -> str:
    from .cluster.root import WorkerAddress

    try:
        WorkerAddress.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"expected a port between 1 and 65535, got {value}")
    return value


def _command(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("dllama-cluster")
    except Exception:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
