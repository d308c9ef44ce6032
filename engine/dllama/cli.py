"""The `dllama` command: inference, chat, convert, convert-tokenizer, download, worker; flags as
in Distributed Llama.

    dllama inference --model m.m --tokenizer tok/ --prompt "Hello" --steps 64 --buffer-float-type q80
    dllama chat --model m.m --tokenizer tok/ --system-prompt "You are terse."
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any, Callable, Sequence

from dllama import launch
from dllama.launch import positive_int, port

# numpy and tokenizers load only for the commands that generate: `dllama --version`, `--help` and
# `dllama worker` start in a fraction of the time on a slow board.
if TYPE_CHECKING:
    from dllama import Engine
    from dllama.sampler import Sampler
    from dllama.tokenizer import StreamDecoder, Tokenizer

PROG = "dllama"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# Tokens a chat reply may take unless --steps says otherwise: a model that never ends its turn
# stops there instead of filling the context (a Qwen3 answer with its thinking fits).
CHAT_STEPS = 2048


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
        return launch.EXIT_ERROR
    except launch.USER_ERRORS as e:
        if debug:
            raise
        return launch.report(PROG, e)


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
        "inference", parents=[launch.model_flags(), debug], help="complete a prompt and print the run's figures",
        description="Complete a raw prompt (no chat template) and print prefill and decode figures.",
    )
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="maximum number of generated tokens, the prompt not counted (Distributed Llama counts "
                        "prompt plus generated tokens) (default: until the context is full)")
    p.set_defaults(run=run_inference)

    p = sub.add_parser(
        "chat", parents=[launch.model_flags(), debug], help="talk with the model",
        description="Interactive chat using the tokenizer's chat template. /exit or Ctrl-D ends, /clear forgets.",
    )
    p.add_argument("--system-prompt", default=None, help="the system message of the conversation")
    p.add_argument("--enable-thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="Qwen3 thinking mode (default: the template's default)")
    p.add_argument("--steps", type=positive_int, default=CHAT_STEPS,
                   help="maximum generated tokens per reply, the prompt not counted; a reply that reaches it "
                        f"is cut there (default: {CHAT_STEPS})")
    p.set_defaults(run=run_chat)

    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint to a .m model file",
                       conflict_handler="resolve")  # dllama.convert's own flags win
    if _command(argv) == "convert":
        _mount_convert(p)
    p.set_defaults(run=p.get_default("run") or _convert_unavailable)

    for command, module, summary, description in (
        ("convert-tokenizer", "dl_tokenizer", "write a Distributed Llama .t tokenizer",
         "Write the .t tokenizer file Distributed Llama's converter writes for a Hugging Face model directory, "
         "byte for byte."),
        ("download", "download", "download a model Distributed Llama's launch.py offers",
         "Download a model of Distributed Llama's list (resumable, verified) and print the command that runs it."),
    ):
        p = sub.add_parser(command, parents=[debug], help=summary, description=description)
        p.set_defaults(run=_run_module(module))
        if _command(argv) == command:  # its flags: imported only when it is the command
            _import(module).add_arguments(p)

    p = sub.add_parser("worker", parents=[debug], help="serve as a worker node of a cluster")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    p.add_argument("--port", type=port, default=9999, help="port to listen on (default: 9999)")
    p.add_argument("--nthreads", type=positive_int, default=os.cpu_count() or 1, help="threads of the core")
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


# commands


def run_inference(args: argparse.Namespace) -> int:
    sampler = _sampler(args)
    tokenizer, engine = _load(args)
    with engine:  # closing tells a cluster's workers the session ended, so they listen again at once
        return _inference(args, sampler, tokenizer, engine)


def _inference(args: argparse.Namespace, sampler: Sampler, tokenizer: Tokenizer, engine: Engine) -> int:
    from dllama.generate import format_stats, generate

    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise launch.LaunchError("the prompt is empty")
    steps = args.steps if args.steps is not None else engine.max_seq_len

    out = _stdout()
    out.write(args.prompt)
    out.flush()
    on_token, decoder = _streamer(tokenizer, out)
    result = generate(engine, prompt_ids, steps=steps, sampler=sampler, eos_ids=tokenizer.eos_ids, on_token=on_token)
    out.write(decoder.flush() + "\n\n")
    out.write(format_stats(result) + "\n")
    out.flush()
    return 0


def run_chat(args: argparse.Namespace) -> int:
    sampler = _sampler(args)
    tokenizer, engine = _load(args)
    with engine:
        return _chat(args, sampler, tokenizer, engine)


def _chat(args: argparse.Namespace, sampler: Sampler, tokenizer: Tokenizer, engine: Engine) -> int:
    from dllama.generate import generate

    if tokenizer.chat_template is None:
        raise launch.LaunchError("the tokenizer has no chat template; use `dllama inference` for raw prompts")
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass

    out = _stdout()
    conversation = Conversation(engine, tokenizer, args.system_prompt, args.enable_thinking)
    steps = args.steps
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
            conversation.clear()
            continue
        if not command:
            continue
        new_ids = conversation.ask(line)
        if new_ids is None:
            print(f"{PROG}: that message does not fit in the context ({engine.max_seq_len} tokens)", file=sys.stderr)
            continue
        on_token, decoder = _streamer(tokenizer, out)
        try:
            result = generate(engine, new_ids, steps=steps, sampler=sampler, eos_ids=tokenizer.eos_ids,
                              on_token=on_token)
        except KeyboardInterrupt:
            out.write("\n")
            return 0
        out.write(decoder.flush() + "\n")
        out.flush()
        conversation.answer(new_ids + result.tokens, decoder.text)
        if result.finish_reason == "length" and len(result.tokens) >= steps:
            print(f"{PROG}: the reply was cut at {steps} tokens (--steps)", file=sys.stderr)
        elif result.finish_reason == "length" and engine.position >= engine.max_seq_len:
            print(f"{PROG}: the context is full ({engine.max_seq_len} tokens); older turns will be dropped",
                  file=sys.stderr)


class Conversation:
    """A chat's messages and what the engine's sequence 0 holds of them: each turn feeds only the
    tokens the engine has not seen (the template may rewrite earlier turns: then the engine
    rewinds to the common prefix), dropping the oldest turns when the conversation outgrows the
    context."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, system_prompt: str | None,
                 enable_thinking: bool | None) -> None:
        from dllama.generate import PrefixCache

        self.engine = engine
        self.tokenizer = tokenizer
        self.system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        self.enable_thinking = enable_thinking
        self.history: list[dict[str, Any]] = []
        self.cache = PrefixCache(seq=0)

    def ask(self, message: str) -> list[int] | None:
        """Adds the user's message; returns the conversation's tokens the engine does not hold yet
        (it is rewound to the rest), or None when the message alone leaves no room for a reply
        (then the conversation stays as it was)."""
        history = [*self.history, {"role": "user", "content": message}]
        ids = self._render_fitting(history)
        if ids is None:
            return None
        self.history = history
        return ids[self.cache.reuse(self.engine, ids):]

    def answer(self, fed: list[int], text: str) -> None:
        """Records the reply: `fed` are ask()'s tokens followed by the reply's (the engine holds
        them up to its position), `text` the reply as shown."""
        self.cache.record(self.engine, fed)
        self.history.append({"role": "assistant", "content": text})

    def clear(self) -> None:
        """Forgets the messages (the engine keeps what a new conversation can reuse: the system
        prompt)."""
        self.history.clear()

    def _render_fitting(self, history: list[dict[str, Any]]) -> list[int] | None:
        """The conversation's tokens, dropping the oldest turns of history until it leaves room
        for a reply."""
        while True:
            text = self.tokenizer.apply_chat_template(self.system + history, add_generation_prompt=True,
                                                      enable_thinking=self.enable_thinking)
            ids = self.tokenizer.encode(text, add_special_tokens=False)  # the template writes any BOS itself
            if len(ids) < self.engine.max_seq_len:
                return ids
            # drop the oldest exchange: everything before the second user message
            users = [i for i, m in enumerate(history) if m["role"] == "user"]
            if len(users) < 2:
                return None
            del history[: users[1]]


def run_worker(args: argparse.Namespace) -> int:
    from .cluster import worker

    return worker.run(args)


def _import(name: str) -> Any:
    import importlib

    return importlib.import_module(f"dllama.{name}")


def _run_module(name: str) -> Callable[[argparse.Namespace], int]:
    """A command whose flags and code live in dllama.NAME (imported when it runs)."""
    return lambda args: int(_import(name).run(args))


def _convert_unavailable(args: argparse.Namespace) -> int:
    raise launch.LaunchError("dllama convert is not available in this build")


def _mount_convert(parser: argparse.ArgumentParser) -> None:
    """Add dllama.convert's flags; imported only when `convert` is the command."""
    import importlib

    try:
        convert = importlib.import_module("dllama.convert")
    except ModuleNotFoundError as e:
        if e.name != "dllama.convert":
            raise launch.LaunchError(f"dllama convert needs the {e.name} package") from None
        parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        return
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    convert.add_arguments(parser)
    parser.set_defaults(run=convert.run)


# loading


def _load(args: argparse.Namespace) -> tuple[Tokenizer, Engine]:
    launch.note_ignored_flags(PROG, args)
    model, tokenizer = launch.load_tokenizer(args)
    engine = launch.open_engine(args, model, vocab_limit=tokenizer.vocab_size)
    try:
        launch.check_vocab(tokenizer, engine.config.vocab_size)
        launch.announce(PROG, engine, args)
    except BaseException:
        engine.close()
        raise
    return tokenizer, engine


def _streamer(tokenizer: Tokenizer, out: Any) -> tuple[Callable[[int], None], StreamDecoder]:
    """An on_token that writes each token's text as soon as it is whole, and its decoder (flush()
    gives the rest, .text all of it)."""
    decoder = tokenizer.stream_decoder()

    def on_token(token: int) -> None:
        piece = decoder.push(token)
        if piece:
            out.write(piece)
            out.flush()

    return on_token, decoder


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
