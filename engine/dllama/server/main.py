"""`dllama-api`: the model (one node or the cluster) behind an OpenAI-compatible HTTP server.

    dllama-api --model m.m --tokenizer tok/ --buffer-float-type q80 --nthreads 4 --max-seq-len 4096 \\
        --workers 10.0.0.2:9999 10.0.0.3:9999 --port 8080 --api-key-file /etc/dllama/api-key --parallel 4

Any OpenAI client (Open WebUI, the `openai` library, curl) then talks to http://ROOT:8080/v1.
The pieces live beside this module in dllama.server; this one reads the flags, loads the
tokenizer and the engine (with dllama.launch, as the `dllama` command does), and runs uvicorn.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import prometheus_client
import uvicorn

from dllama import launch
from dllama.cluster.auth import warn_if_shared
from dllama.launch import port, positive_int

if TYPE_CHECKING:
    from dllama.config import ModelConfig
    from dllama.tokenizer import Tokenizer

    from .app import ServerConfig
    from .connections import ConnectionLimits
    from .host import EngineHost
    from .nodes import NodeWatch
    from .scheduler import Scheduler
    from .schemas import Sampling

PROG = "dllama-api"
EXIT_INTERRUPTED = 130
DEFAULT_PORT = 8080
DEFAULT_QUEUE_SIZE = 8
DEFAULT_PARALLEL = 4
DEFAULT_PREFILL_CHUNK = 64  # prompt tokens per step: a running stream waits at most for that many
LOOPBACK = ("127.0.0.1", "::1", "localhost")
MAX_TIMEOUT_SECONDS = 3600  # longer is a typo, and call_later of a huge delay is no timeout at all


def build_parser() -> argparse.ArgumentParser:
    from .connections import DEFAULT_KEEP_ALIVE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_REQUEST_TIMEOUT

    parser = argparse.ArgumentParser(
        prog=PROG, parents=[launch.model_flags()],
        description="Serve the model to OpenAI clients: /v1/chat/completions, /v1/completions, /v1/models, "
                    "/health, /metrics. The sampling flags are the defaults of requests that do not set them.",
    )
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="0.0.0.0",
                   help="address to listen on (default: 0.0.0.0, every interface: set --api-key-file)")
    g.add_argument("--port", type=port, default=DEFAULT_PORT, help=f"port to listen on (default: {DEFAULT_PORT})")
    g.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="file holding the key clients send as 'Authorization: Bearer KEY' (default: no key)")
    g.add_argument("--parallel", type=positive_int, default=DEFAULT_PARALLEL, metavar="N",
                   help="requests generated at once, each in its own sequence of the KV cache (allocated up "
                        "front for all N: the start-up line prints its size), all advanced by the same "
                        f"forward steps; 1 serves one request at a time (default: {DEFAULT_PARALLEL})")
    g.add_argument("--prefill-chunk", type=positive_int, default=DEFAULT_PREFILL_CHUNK, metavar="N",
                   help="prompt tokens evaluated per step, shared by the requests still reading their prompts "
                        "(oldest first): a long prompt goes in pieces between the running requests' tokens "
                        f"(default: {DEFAULT_PREFILL_CHUNK})")
    g.add_argument("--queue-size", type=positive_int, default=DEFAULT_QUEUE_SIZE, metavar="N",
                   help="requests admitted at once, the running ones included; more get 429. At least "
                        f"--parallel: a smaller N counts as --parallel (default: {DEFAULT_QUEUE_SIZE})")
    g.add_argument("--model-name", default=None, metavar="NAME",
                   help="the model's id in /v1/models and responses (default: the model file's name)")
    g.add_argument("--max-request-bytes", type=positive_int, default=None, metavar="N",
                   help="largest request body accepted; larger ones get 413 (default: 1 MiB)")
    c = parser.add_argument_group("connections (hostile or broken clients)")
    c.add_argument("--max-connections", type=positive_int, default=None, metavar="N",
                   help="open connections at once; more get 503 at once and are closed. The file descriptor "
                        f"limit is raised to fit them when the hard limit allows (default: {DEFAULT_MAX_CONNECTIONS}, "
                        "or fewer if the limit cannot hold that many)")
    c.add_argument("--request-timeout", type=_seconds, default=DEFAULT_REQUEST_TIMEOUT, metavar="SECONDS",
                   help="time a client has to send a request's headers and body, from its first byte (from "
                        "connecting, for a connection's first request); slower ones get 408 and are closed "
                        f"(default: {DEFAULT_REQUEST_TIMEOUT:g})")
    c.add_argument("--keep-alive-timeout", type=_seconds, default=DEFAULT_KEEP_ALIVE_TIMEOUT, metavar="SECONDS",
                   help="time an idle connection stays open between requests "
                        f"(default: {DEFAULT_KEEP_ALIVE_TIMEOUT:g})")
    g.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="uvicorn's and the server's log level (default: info)")
    g.add_argument("--debug", action="store_true", help="show tracebacks of startup errors")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=f"{PROG}: %(levelname)s: %(message)s")
    try:
        return serve(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except launch.USER_ERRORS as e:
        if args.debug:
            raise
        return launch.report(PROG, e)


def serve(args: argparse.Namespace) -> int:
    """Checks the flags, loads the tokenizer, starts the engine (or its reconnect loop), then
    serves until SIGINT/SIGTERM."""
    from .host import EngineHost

    prometheus_client.disable_created_metrics()  # no *_created series: they only add noise
    launch.note_ignored_flags(PROG, args)
    _check_parallel(args)
    defaults = _sampling_defaults(args)
    api_key = _read_api_key(args.api_key_file) if args.api_key_file else None
    limits = _connection_limits(args)
    model, tokenizer = launch.load_tokenizer(args)
    header = _model_header(model, tokenizer)
    host = EngineHost(lambda: launch.open_engine(args, model, max_sequences=args.parallel,
                                                        vocab_limit=tokenizer.vocab_size),
                      workers=[w.partition("@")[0] for w in args.workers])  # HOST:PORT[@weight]
    host.start()
    try:
        config = _server_config(args, model, header, _context_length(host, args, header), defaults, api_key)
        scheduler, app = _app(config, host, tokenizer, args)
        _say_serving(args, config, scheduler)
        _run(app, args, limits, on_shutdown=scheduler.drain)
        return 0
    finally:
        host.close()


def _check_parallel(args: argparse.Namespace) -> None:
    from dllama.engine import MAX_SEQUENCES

    if args.parallel > MAX_SEQUENCES:
        raise launch.LaunchError(f"--parallel is at most {MAX_SEQUENCES}, got {args.parallel}")


def _sampling_defaults(args: argparse.Namespace) -> Sampling:
    """The sampling flags: what a request that does not set them gets."""
    from .schemas import Sampling

    defaults = Sampling(max_tokens=None, temperature=args.temperature, top_p=args.topp, seed=args.seed)
    if not (0 <= defaults.temperature <= 2 and 0 < defaults.top_p <= 1):
        raise launch.LaunchError("--temperature must be in [0, 2] and --topp in (0, 1]")
    if defaults.seed is not None and defaults.seed < 0:
        raise launch.LaunchError("--seed must be a non-negative integer")
    return defaults


def _connection_limits(args: argparse.Namespace) -> ConnectionLimits:
    from .connections import ConnectionLimits, fit_connection_cap

    return ConnectionLimits(max_connections=fit_connection_cap(args.max_connections),
                            request_timeout=args.request_timeout, keep_alive_timeout=args.keep_alive_timeout)


def _model_header(model: Path, tokenizer: Tokenizer) -> ModelConfig:
    """The model file's header: what the server needs even while the engine is down."""
    from dllama.model_file import ModelFile

    with ModelFile.open(model) as f:
        config = f.config
    launch.check_vocab(tokenizer, config.vocab_size)
    return config


def _context_length(host: EngineHost, args: argparse.Namespace, header: ModelConfig) -> int:
    """The engine's context, announced; while the engine is down, the one it will have."""
    from dllama.engine import DEFAULT_MAX_SEQ_LEN

    engine = host.info()
    if engine is not None:
        launch.announce(PROG, engine, args)
        return engine.max_seq_len
    print(f"{PROG}: the engine is down ({host.state.reason}); reconnecting in the background", file=sys.stderr)
    return min(args.max_seq_len or DEFAULT_MAX_SEQ_LEN, header.seq_len)


def _server_config(args: argparse.Namespace, model: Path, header: ModelConfig, context_length: int,
                   defaults: Sampling, api_key: str | None) -> ServerConfig:
    from .app import MAX_BODY_BYTES, ServerConfig

    return ServerConfig(
        model_name=args.model_name or model.stem,
        context_length=context_length,
        vocab_size=header.vocab_size,
        defaults=defaults,
        api_key=api_key,
        max_body_bytes=args.max_request_bytes or MAX_BODY_BYTES,
        created=int(model.stat().st_mtime),
    )


def _app(config: ServerConfig, host: EngineHost, tokenizer: Tokenizer, args: argparse.Namespace
         ) -> tuple[Scheduler, Any]:
    """The scheduler in front of the engine, the starlette app in front of the scheduler."""
    from .app import create_app, live_figures
    from .metrics import Metrics
    from .scheduler import Scheduler

    scheduler = Scheduler(host, tokenizer, queue_size=args.queue_size, parallel=args.parallel,
                          prefill_chunk=args.prefill_chunk)
    watch = _node_watch(host, args)
    metrics = Metrics(live_figures(host, scheduler, watch))
    scheduler.metrics = metrics
    return scheduler, create_app(config, host, scheduler, tokenizer, metrics, watch)


def _node_watch(host: EngineHost, args: argparse.Namespace) -> NodeWatch:
    """The boards' figures for /cluster and /metrics: the workers asked with the cluster key."""
    from dllama.cluster.auth import load_key

    from .nodes import NodeWatch

    # no key file: the engine warned already, and an empty key is what it uses too
    key = load_key(args.cluster_key_file, "root") if args.workers and args.cluster_key_file else b""
    return NodeWatch(host.workers, key, host)


def _say_serving(args: argparse.Namespace, config: ServerConfig, scheduler: Scheduler) -> None:
    if config.api_key is None and args.host not in LOOPBACK:
        print(f"{PROG}: note: no --api-key-file: anyone who can reach port {args.port} can use the model; "
              f"pass --api-key-file FILE (or --host 127.0.0.1)", file=sys.stderr)
    print(f"{PROG}: serving {config.model_name} (context {config.context_length}, parallel {scheduler.parallel}, "
          f"queue {scheduler.queue_size}) on http://{_url_host(args.host)}:{args.port}/v1", file=sys.stderr,
          flush=True)


def _run(app: Any, args: argparse.Namespace, limits: ConnectionLimits, on_shutdown: Callable[[], None]) -> None:
    """uvicorn until SIGINT/SIGTERM; a port already taken is logged and exits 1."""
    from .connections import uvicorn_options
    from .logs import rate_limit

    server = _Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                    timeout_graceful_shutdown=5, lifespan="on", **uvicorn_options(limits)),
                     on_shutdown=on_shutdown)
    rate_limit()  # after uvicorn.Config, which configures uvicorn's loggers
    server.run()


class _Server(uvicorn.Server):
    """uvicorn's server, ending the requests in flight as soon as it starts shutting down (the
    running one with an error event, the waiting ones with 503) rather than waiting out long
    generations until its graceful timeout cancels them."""

    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_shutdown = on_shutdown

    async def shutdown(self, sockets: Any = None) -> None:
        self._on_shutdown()
        await super().shutdown(sockets)


def _read_api_key(path: str) -> str:
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
        mode = file.stat().st_mode
    except OSError as e:
        raise launch.LaunchError(f"cannot read the API key file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise launch.LaunchError(f"the API key file {path} is not UTF-8 text") from None
    key = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if not key:
        raise launch.LaunchError(f"the API key file {path} is empty")
    if any(c.isspace() for c in key):
        raise launch.LaunchError(f"the API key in {path} contains whitespace")
    warn_if_shared(path, mode, PROG)
    return key


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT_SECONDS):
        raise argparse.ArgumentTypeError(f"expected seconds in (0, {MAX_TIMEOUT_SECONDS}], got {text}")
    return value


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


if __name__ == "__main__":
    sys.exit(main())
