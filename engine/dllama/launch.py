"""What `dllama inference`, `dllama chat` and `dllama-api` share to start: the model flags and
their types, the notes on flags that mean nothing here, the tokenizer and the engine the flags
name, the line that says what was loaded, and how a user's error is reported.

numpy, tokenizers and the native core load only when a command loads a model: `--help` and
`--version` stay fast on a slow board.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dllama import Engine
    from dllama.tokenizer import Tokenizer

EXIT_ERROR = 1

# Distributed Llama flags that mean nothing here: accepted so existing command lines keep working.
IGNORED_FLAGS = {
    "weights_float_type": "the weight type is read from the model file",
    "nbatches": "the prompt is evaluated in one batch",
    "net_turbo": "sockets are always set up for low latency",
    "chat_template": "the chat template comes from tokenizer_config.json",
    "gpu_index": "there is no GPU backend",
    "gpu_segments": "there is no GPU backend",
}


class LaunchError(Exception):
    """A problem the user can fix: printed as one line, no traceback."""


# What a command reports as one line (its --debug shows the traceback instead).
USER_ERRORS = (LaunchError, ValueError, OSError, RuntimeError)


def report(prog: str, error: BaseException) -> int:
    """Prints `PROG: error: ` and the error's first line; returns the exit status."""
    text = str(error).strip()
    print(f"{prog}: error: {text.splitlines()[0] if text else type(error).__name__}", file=sys.stderr)
    return EXIT_ERROR


# the flags


def model_flags() -> argparse.ArgumentParser:
    """The model, cluster and sampling flags, as a parent parser."""
    flags = argparse.ArgumentParser(add_help=False)
    g = flags.add_argument_group("model")
    g.add_argument("--model", required=True, help="the .m model file")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer.json or its directory, or a Distributed Llama .t file (default: the one "
                        "beside the model file)")
    g.add_argument("--buffer-float-type", choices=("q80", "f32"), default="q80", type=str.lower,
                   help="type of the activations exchanged between nodes (default: q80)")
    g.add_argument("--nthreads", type=positive_int, default=os.cpu_count() or 1,
                   help="threads of the core on this node (default: all CPUs)")
    g.add_argument("--max-seq-len", type=positive_int, default=None,
                   help="context size in tokens (default: the engine's, at most the model's)")
    g.add_argument("--kv-cache-type", choices=("f32", "f16"), default="f32", type=str.lower,
                   help="type of the KV cache: f16 halves its memory (default: f32)")
    g.add_argument("--workers", nargs="+", type=host_port, default=[], metavar="HOST:PORT",
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


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"expected a port between 1 and 65535, got {value}")
    return value


def host_port(text: str) -> str:
    from dllama.cluster.root import WorkerAddress

    try:
        WorkerAddress.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


# loading


def note_ignored_flags(prog: str, args: argparse.Namespace) -> None:
    for name, reason in IGNORED_FLAGS.items():
        if getattr(args, name, None) is not None:
            print(f"{prog}: note: --{name.replace('_', '-')} is ignored ({reason})", file=sys.stderr)


def load_tokenizer(args: argparse.Namespace) -> tuple[Path, Tokenizer]:
    """The model file's path (checked to be a file) and the tokenizer: --tokenizer, or the one
    beside the model file."""
    from dllama.tokenizer import Tokenizer

    model = Path(args.model)
    if not model.is_file():
        raise LaunchError(f"model file not found: {model}" if not model.exists() else f"not a model file: {model}")
    return model, Tokenizer.load(args.tokenizer if args.tokenizer is not None else _default_tokenizer(model))


def _default_tokenizer(model: Path) -> Path:
    """tokenizer.json beside the model, else the Distributed Llama tokenizer `dllama download`
    (or its launch.py) puts there: dllama_tokenizer_NAME.t for dllama_model_NAME.m, or the only .t."""
    directory = model.resolve().parent
    if (directory / "tokenizer.json").is_file():
        return directory
    paired = directory / (model.stem.replace("dllama_model_", "dllama_tokenizer_", 1) + ".t")
    found = [paired] if paired.is_file() else sorted(directory.glob("*.t"))
    if len(found) == 1:
        return found[0]
    raise LaunchError(f"--tokenizer is required (no tokenizer.json or single .t tokenizer beside {model})")


def check_vocab(tokenizer: Tokenizer, model_vocab: Any) -> None:
    """A tokenizer with more tokens than the model's embedding rows belongs to another model."""
    if isinstance(model_vocab, int) and tokenizer.vocab_size > model_vocab:
        raise LaunchError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model_vocab}: wrong tokenizer?"
        )


def open_engine(args: argparse.Namespace, model: Path, max_sequences: int = 1,
                vocab_limit: int | None = None) -> Engine:
    """The engine the flags ask for, holding `max_sequences` sequences at once: this node alone,
    or the root of --workers. `vocab_limit`: the tokenizer's vocabulary (the model's padding rows
    past it are never sampled)."""
    try:
        from dllama import Engine
    except ImportError as e:
        raise LaunchError(f"the native core is not available ({e}); reinstall dllama-cluster") from None
    # no --max-seq-len: the engine's default
    options: dict[str, Any] = {"max_seq_len": args.max_seq_len} if args.max_seq_len is not None else {}
    return Engine(str(model), nthreads=args.nthreads, buffer_float_type=args.buffer_float_type,
                  workers=list(args.workers), cluster_key_file=args.cluster_key_file,
                  max_sequences=max_sequences, kv_cache_type=args.kv_cache_type, vocab_limit=vocab_limit,
                  **options)


def announce(prog: str, engine: Engine, args: argparse.Namespace) -> None:
    """Says what was loaded, in one line (after a note if --weights-float-type differs from the
    model's weights)."""
    weights = _lower_name(engine.config.weight_type)
    wanted = args.weights_float_type
    if wanted and wanted != weights:
        print(f"{prog}: note: the model's weights are {weights}, not {wanted}", file=sys.stderr)
    print(f"{prog}: {describe(engine, args)}", file=sys.stderr)


def describe(engine: Engine, args: argparse.Namespace) -> str:
    """`qwen3_moe, layers 48, dim 2048, experts 8/128, weights q40, context 4096, 4 sequences,
    KV cache 96.0 MiB/node f16, buffer q80, 4 threads, 4 nodes`: what the engine holds."""
    config = engine.config
    parts = [_lower_name(config.arch), f"layers {config.n_layers}", f"dim {config.dim}"]
    if config.n_experts:
        parts.append(f"experts {config.n_active_experts}/{config.n_experts}")
    parts.append(f"weights {_lower_name(config.weight_type)}")
    parts.append(f"context {engine.max_seq_len}")
    if engine.max_sequences > 1:
        parts.append(f"{engine.max_sequences} sequences")
    parts.append(f"KV cache {kv_cache_text(engine.kv_cache_bytes())} {engine.kv_cache_type}")
    parts.append(f"buffer {args.buffer_float_type}")
    parts.append(f"{args.nthreads} thread{'s' if args.nthreads > 1 else ''}")
    parts.append(f"{1 + len(args.workers)} node{'s' if args.workers else ''}")
    return ", ".join(parts)


def kv_cache_text(per_node: list[int]) -> str:
    """`96.0 MiB` on one node, `48.0 MiB/node` when every node holds as much, else each node's
    share, node 0 first: `64.0+32.0+32.0 MiB` (the cache is split by kv heads)."""
    unit, scale = ("GiB", 2**30) if max(per_node) >= 2**30 else ("MiB", 2**20)
    if len(set(per_node)) == 1:
        return f"{per_node[0] / scale:.1f} {unit}" + ("/node" if len(per_node) > 1 else "")
    return "+".join(f"{n / scale:.1f}" for n in per_node) + f" {unit}"


def _lower_name(value: Any) -> str:
    """An enum member's name (or the value itself) in lower case."""
    return str(getattr(value, "name", value)).lower()
