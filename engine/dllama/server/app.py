"""The HTTP side of `dllama-api`: starlette routes in OpenAI's shapes.

    POST /v1/chat/completions   messages -> chat template -> queue -> JSON or SSE chunks
    POST /v1/completions        a plain prompt, same path without the template
    GET  /v1/models[/{id}]      the loaded model and its context length
    GET  /v1/cluster            every node's figures, the last minutes' rates (for /cluster)
    GET  /health                200 when the engine is up, 503 naming the lost worker
    GET  /metrics               Prometheus text format
    GET  /, /cluster, /static/* the chat page and the boards' page (pages.py)

/v1/* needs `Authorization: Bearer KEY` when the server has an API key; /health and /metrics
stay open for probes and scrapers, and so do the pages, which hold no secret. Every error is OpenAI's {"error": {...}} body.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .errors import ApiError, bad_request, unavailable
from .host import EngineDown, EngineHost
from .metrics import CONTENT_TYPE, Live, Metrics
from .nodes import NodeWatch
from .pages import Pages
from .jobs import Failed, Finished, Job, Started
from .scheduler import QueueFull, Scheduler
from .schemas import Sampling, chat_request, completion_request, parse_json
from .text import CONTENT, REASONING, Delta, join, reasoning_mode

log = logging.getLogger("dllama.api")

MAX_BODY_BYTES = 1 << 20
CLIENT_CLOSED = 499  # nginx's status for "the client went away": used in metrics only
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class ServerConfig:
    model_name: str
    context_length: int  # tokens: prompt + completion
    vocab_size: int  # the model's: token ids in a prompt must be below it
    defaults: Sampling  # temperature, top_p, seed of a request that does not set them
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    created: int = 0


def create_app(config: ServerConfig, host: EngineHost, scheduler: Scheduler, tokenizer: Any,
               metrics: Metrics, watch: NodeWatch) -> Starlette:
    api = _Api(config, host, scheduler, tokenizer, metrics, watch)
    pages = Pages()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        scheduler.start()
        watch.start()
        try:
            yield
        finally:
            await run_in_threadpool(watch.stop)
            await run_in_threadpool(scheduler.stop)

    routes = [
        Route(CHAT, api.chat, methods=["POST"]),
        Route(COMPLETIONS, api.completions, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{model:path}", api.model, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/metrics", api.metrics_text, methods=["GET"]),
        Route("/v1/cluster", api.cluster, methods=["GET"]),
        Route("/", pages.page, methods=["GET"]),
        Route("/cluster", pages.page, methods=["GET"]),
        Route("/static/{name}", pages.static, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: _http_error, Exception: _server_error})


def live_figures(host: EngineHost, scheduler: Scheduler, watch: NodeWatch) -> Callable[[], Live]:
    def live() -> Live:
        waiting, running = scheduler.counts()
        state = host.state
        return Live(waiting=waiting, running=running, parallel=scheduler.parallel, queue_size=scheduler.queue_size,
                    up=state.up, workers=dict(state.workers), nodes=watch.nodes())
    return live


class _Api:
    def __init__(self, config: ServerConfig, host: EngineHost, scheduler: Scheduler, tokenizer: Any,
                 metrics: Metrics, watch: NodeWatch) -> None:
        self.config = config
        self.watch = watch
        self.host = host
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.metrics = metrics

    # routes

    async def chat(self, request: Request) -> Response:
        try:
            self._authorize(request)
            req = chat_request(parse_json(await self._body(request)), self.config.defaults)
            ids, mode = await run_in_threadpool(self._chat_prompt, req.messages, req.enable_thinking,
                                                req.template_kwargs)
            sampling = self._fit(len(ids), req.sampling, "messages")
        except ApiError as e:
            return self._error(CHAT, e)
        except ClientDisconnect:
            return self._gone(CHAT)
        return await self._serve(request, _ChatShape(self.config.model_name, sampling.include_usage), ids, sampling,
                                 reasoning=mode)

    async def completions(self, request: Request) -> Response:
        try:
            self._authorize(request)
            req = completion_request(parse_json(await self._body(request)), self.config.defaults)
            ids, prompt_text = await run_in_threadpool(self._completion_prompt, req.prompt)
            sampling = self._fit(len(ids), req.sampling, "prompt")
        except ApiError as e:
            return self._error(COMPLETIONS, e)
        except ClientDisconnect:
            return self._gone(COMPLETIONS)
        shape = _CompletionShape(self.config.model_name, sampling.include_usage, prompt_text if req.echo else "")
        return await self._serve(request, shape, ids, sampling, reasoning=None)

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except ApiError as e:
            return self._error("/v1/models", e)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        try:
            self._authorize(request)
            if request.path_params["model"] != self.config.model_name:
                raise ApiError(404, f"The model '{request.path_params['model']}' does not exist.",
                               param="model", code="model_not_found")
        except ApiError as e:
            return self._error("/v1/models", e)
        return JSONResponse(self._model_card())

    async def health(self, request: Request) -> Response:
        state = self.host.state
        waiting, running = self.scheduler.counts()
        body: dict[str, Any] = {
            "status": "ok" if state.up else "unavailable",
            "model": self.config.model_name,
            "context_length": self.config.context_length,
            "workers": [{"address": a, "up": up} for a, up in state.workers.items()],
            "queue": {"waiting": waiting, "running": running, "parallel": self.scheduler.parallel,
                      "size": self.scheduler.queue_size},
        }
        if state.up:
            return JSONResponse(body)
        body["reason"] = state.reason
        body["down_since"] = state.since
        body["reconnect_attempts"] = state.attempts
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})

    async def cluster(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except ApiError as e:
            return self._error("/v1/cluster", e)
        state = self.host.state
        return JSONResponse({
            "model": self.config.model_name,
            "up": state.up,
            "reason": state.reason,
            "nodes": self.watch.nodes(),
            "poll_seconds": self.watch.interval,
            "generated_tokens_per_second": self.metrics.recent.rate(),
            "history": {"bucket_seconds": self.metrics.history.bucket_seconds, **self.metrics.history.series()},
        })

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    # request handling

    def _authorize(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                           code="missing_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token.strip().encode("utf-8", "surrogateescape"),
                                   key.encode("utf-8", "surrogateescape")):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def _body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        too_large = ApiError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise bad_request("Invalid Content-Length header.")
            if int(length) > limit:
                raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    def _chat_prompt(self, messages: list[dict[str, Any]], enable_thinking: bool | None,
                     kwargs: dict[str, Any]) -> tuple[list[int], str]:
        """The rendered conversation's ids and how the reply starts (see text.reasoning_mode)."""
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                      enable_thinking=enable_thinking, **kwargs)
        except ValueError as e:
            raise bad_request(f"The chat template cannot render these messages: {e}", param="messages",
                              code="invalid_messages") from None
        return self.tokenizer.encode(text, add_special_tokens=False), reasoning_mode(text)

    def _completion_prompt(self, prompt: str | list[int]) -> tuple[list[int], str]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
            if not ids:
                raise bad_request("The prompt encodes to no tokens.", param="prompt", code="invalid_value")
            return ids, prompt
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise bad_request(f"Token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size}).",
                              param="prompt", code="invalid_value")
        return list(prompt), self.tokenizer.decode(prompt)

    def _fit(self, n_prompt: int, sampling: Sampling, param: str) -> Sampling:
        """Resolve max_tokens: the prompt plus the completion must fit in the context."""
        context = self.config.context_length
        what = "messages" if param == "messages" else "prompt"
        if sampling.max_tokens is None:
            if n_prompt >= context:
                raise bad_request(f"This model's maximum context length is {context} tokens. However, your "
                                  f"{what} resulted in {n_prompt} tokens, which leaves no room for a completion. "
                                  f"Please reduce the length of the {what}.", param=param,
                                  code="context_length_exceeded")
            return replace(sampling, max_tokens=context - n_prompt)
        if n_prompt + sampling.max_tokens > context:
            raise bad_request(f"This model's maximum context length is {context} tokens. However, you requested "
                              f"{n_prompt + sampling.max_tokens} tokens ({n_prompt} in the {what}, "
                              f"{sampling.max_tokens} in the completion). Please reduce the length of the {what} "
                              f"or completion.", param=param, code="context_length_exceeded")
        return sampling

    async def _serve(self, request: Request, shape: _Shape, ids: list[int], sampling: Sampling,
                     reasoning: str | None) -> Response:
        endpoint = shape.endpoint
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()

        def emit(event: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
                loop.call_soon_threadsafe(events.put_nowait, event)

        job = Job(prompt_ids=ids, sampling=sampling, emit=emit, reasoning=reasoning)
        try:
            self.scheduler.submit(job)
        except QueueFull as e:
            return self._error(endpoint, ApiError(
                429, f"The server is busy: {self.scheduler.queue_size} requests are queued or running. "
                     f"Retry in {e.retry_after} s.", type="rate_limit_error", code="queue_full",
                headers={"Retry-After": str(e.retry_after)}))
        except EngineDown as e:
            return self._error(endpoint, unavailable(f"The engine is down ({e}); retry shortly."))

        handed_over = False
        try:
            first = await _unless_client_leaves(request, events.get())
            if first is None:
                return self._gone(endpoint)
            if isinstance(first, Failed):
                return self._error(endpoint, first.error)
            assert isinstance(first, Started), first
            if sampling.stream:
                handed_over = True
                outcome = {"status": CLIENT_CLOSED}

                def close() -> None:  # however the stream ends, even before it began
                    self.scheduler.cancel(job)  # a no-op once the job is done
                    self.metrics.request(endpoint, outcome["status"])

                return _EventStream(self._stream(events, shape, outcome), on_close=close)
            outcome = await _unless_client_leaves(request, _collect(events))
            if outcome is None:
                return self._gone(endpoint)
            deltas, last = outcome
            if isinstance(last, Failed):
                return self._error(endpoint, last.error)
            self.metrics.request(endpoint, 200)
            return JSONResponse(shape.whole(join(deltas), last))
        finally:
            if not handed_over:
                self.scheduler.cancel(job)  # a no-op once the job is done

    async def _stream(self, events: asyncio.Queue, shape: _Shape, outcome: dict[str, int]) -> AsyncIterator[str]:
        """SSE chunks of the job's events until its last one; outcome["status"] says how it ended."""
        opening = shape.opening()
        if opening:
            yield opening
        while True:
            batch = [await events.get()]
            while not events.empty():
                batch.append(events.get_nowait())
            out = []
            for event in batch:
                if isinstance(event, Delta):
                    out.append(shape.chunk(event))
                elif isinstance(event, Finished):
                    out.append(shape.closing(event))
                    outcome["status"] = 200
                elif isinstance(event, Failed):
                    out.append(_sse(event.error.body()))  # the openai client raises APIError on it
                    outcome["status"] = event.error.status
            yield "".join(out)
            if outcome["status"] != CLIENT_CLOSED:
                return

    # responses

    def _error(self, endpoint: str, error: ApiError) -> Response:
        self.metrics.request(endpoint, error.status)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    def _gone(self, endpoint: str) -> Response:
        self.metrics.request(endpoint, CLIENT_CLOSED)
        return Response(status_code=CLIENT_CLOSED)  # nobody reads it

    def _model_card(self) -> dict[str, Any]:
        return {
            "id": self.config.model_name,
            "object": "model",
            "created": self.config.created,
            "owned_by": "dllama",
            "context_length": self.config.context_length,
            "max_model_len": self.config.context_length,
        }


class _EventStream(StreamingResponse):
    """A text/event-stream response that calls on_close however it ends: its last event sent,
    the client gone, or the task cancelled before the stream began."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


# response shapes: one per endpoint


class _Shape:
    endpoint = ""
    object_whole = ""
    object_chunk = ""
    prefix = ""

    def __init__(self, model: str, include_usage: bool) -> None:
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _chunk(self, choice: dict[str, Any]) -> str:
        body = {**self._head(self.object_chunk), "choices": [{"index": 0, **choice, "logprobs": None}]}
        if self.include_usage:
            body["usage"] = None
        return _sse(body)

    def closing(self, done: Finished) -> str:
        out = self._chunk({**self._empty_delta(), "finish_reason": done.finish_reason})
        if self.include_usage:
            out += _sse({**self._head(self.object_chunk), "choices": [], "usage": done.usage.body()})
        return out + "data: [DONE]\n\n"

    def opening(self) -> str:
        raise NotImplementedError

    def chunk(self, delta: Delta) -> str:
        raise NotImplementedError

    def whole(self, fields: dict[str, str], done: Finished) -> dict[str, Any]:
        raise NotImplementedError

    def _empty_delta(self) -> dict[str, Any]:
        raise NotImplementedError


class _ChatShape(_Shape):
    endpoint = CHAT
    object_whole = "chat.completion"
    object_chunk = "chat.completion.chunk"
    prefix = "chatcmpl"

    def opening(self) -> str:
        return self._chunk({"delta": {"role": "assistant", "content": ""}, "finish_reason": None})

    def chunk(self, delta: Delta) -> str:
        return self._chunk({"delta": {delta.kind: delta.text}, "finish_reason": None})

    def _empty_delta(self) -> dict[str, Any]:
        return {"delta": {}}

    def whole(self, fields: dict[str, str], done: Finished) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": fields[CONTENT]}
        if fields[REASONING]:
            message["reasoning_content"] = fields[REASONING]
        return {**self._head(self.object_whole),
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": done.finish_reason}],
                "usage": done.usage.body()}


class _CompletionShape(_Shape):
    endpoint = COMPLETIONS
    object_whole = object_chunk = "text_completion"
    prefix = "cmpl"

    def __init__(self, model: str, include_usage: bool, echo: str) -> None:
        super().__init__(model, include_usage)
        self.echo = echo

    def opening(self) -> str:
        return self._chunk({"text": self.echo, "finish_reason": None}) if self.echo else ""

    def chunk(self, delta: Delta) -> str:
        return self._chunk({"text": delta.text, "finish_reason": None})

    def _empty_delta(self) -> dict[str, Any]:
        return {"text": ""}

    def whole(self, fields: dict[str, str], done: Finished) -> dict[str, Any]:
        return {**self._head(self.object_whole),
                "choices": [{"index": 0, "text": self.echo + fields[CONTENT], "logprobs": None,
                             "finish_reason": done.finish_reason}],
                "usage": done.usage.body()}


# helpers


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _collect(events: asyncio.Queue) -> tuple[list[Delta], Finished | Failed]:
    deltas: list[Delta] = []
    while True:
        event = await events.get()
        if isinstance(event, Delta):
            deltas.append(event)
        elif isinstance(event, (Finished, Failed)):
            return deltas, event


async def _unless_client_leaves(request: Request, work: Awaitable[Any]) -> Any:
    """The result of work, or None when the client disconnects first (work is then cancelled)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, gone):
            if not t.done():
                t.cancel()
        for t in (task, gone):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
    return task.result() if task in done and not task.cancelled() else None


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    error = ApiError(exc.status_code, message, code=None, headers=dict(exc.headers or {}))
    return JSONResponse(error.body(), status_code=exc.status_code, headers=error.headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s: %r", request.method, request.url.path, exc)
    error = ApiError(500, "The server had an error while processing your request.", type="server_error",
                     code="internal_error")
    return JSONResponse(error.body(), status_code=500)
