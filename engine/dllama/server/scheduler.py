"""One engine, many clients: a bounded queue in front of one engine thread, and a prefix cache.

    HTTP handlers (event loop)                      engine thread (one, owns the engine)
    submit(job) -> 429 when queue_size are in  -->  pops the oldest job, reuses the KV cache for
    await job events <--------------------------   the longest common prefix, prefills the rest,
    cancel(job) when the client leaves              generates token by token: Started, Delta...,
                                                    then Finished or Failed

queue_size counts every admitted request, the running one included: with --queue-size 4, four
clients are served (one generating, three waiting) and a fifth gets 429 with Retry-After.

The engine thread never blocks the event loop: events cross with loop.call_soon_threadsafe, and
the native forward pass releases the GIL while it runs.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from ..generate import PrefixCache, generate
from ..sampler import Sampler
from .errors import ApiError, unavailable
from .host import EngineDown, EngineHost, WorkerLost
from .schemas import Sampling
from .text import ReplyText

log = logging.getLogger("dllama.api")

QUEUED, RUNNING, DONE, CANCELLED = "queued", "running", "done", "cancelled"


# events, from the engine thread to the request's handler


@dataclass(frozen=True)
class Started:
    cached_tokens: int  # prompt tokens reused from the previous sequence's KV cache


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    def body(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" (eos or a stop string) or "length"
    usage: Usage


@dataclass(frozen=True)
class Failed:
    error: ApiError


@dataclass(eq=False)
class Job:
    prompt_ids: list[int]
    sampling: Sampling  # max_tokens resolved: prompt + max_tokens fits in the context
    emit: Callable[[Any], None]  # thread-safe: hands an event to the request's handler
    reasoning: str | None = None  # None: plain text (completions); else the ReasoningSplitter mode
    state: str = QUEUED
    cancelled: threading.Event = field(default_factory=threading.Event)  # stop at the next token
    abort: ApiError | None = None  # why it was stopped, when someone is still listening


class QueueFull(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class Scheduler:
    def __init__(self, host: EngineHost, tokenizer: Any, *, queue_size: int, metrics: Any = None) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        self.host = host
        self.tokenizer = tokenizer
        self.queue_size = queue_size
        self.metrics = metrics
        self.cache = PrefixCache()
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._running: Job | None = None
        self._closed = False
        self._seconds_per_job = 5.0  # moving average, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="dllama-engine", daemon=True)

    # the handlers' side

    def start(self) -> None:
        self._thread.start()

    def drain(self) -> None:
        """Shutting down: refuse new jobs, fail the waiting ones, end the running one at its next
        token with an error, so no client waits for a generation that will not finish."""
        error = unavailable("The server is shutting down.")
        with self._cond:
            self._closed = True
            queued, self._queue = list(self._queue), deque()
            for job in queued:
                job.state = CANCELLED
            running = self._running
            if running is not None:
                running.abort = error
                running.cancelled.set()
            self._cond.notify_all()
        for job in queued:
            job.emit(Failed(error))

    def stop(self) -> None:
        self.drain()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        """Admit a job, or raise QueueFull (429) or EngineDown (503)."""
        with self._cond:
            if self._closed:
                raise EngineDown("the server is shutting down")
            state = self.host.state
            if not state.up:
                raise EngineDown(state.reason)
            admitted = len(self._queue) + (self._running is not None)
            if admitted >= self.queue_size:
                raise QueueFull(self._retry_after(admitted))
            job.state = QUEUED
            self._queue.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client left: a waiting job leaves the queue, a running one stops at its next token."""
        with self._cond:
            if job.state == QUEUED:
                job.state = CANCELLED
                try:
                    self._queue.remove(job)
                except ValueError:
                    pass
            job.cancelled.set()

    def counts(self) -> tuple[int, int]:
        """(waiting, running)."""
        with self._cond:
            return len(self._queue), int(self._running is not None)

    def _retry_after(self, admitted: int) -> int:
        return max(1, min(120, math.ceil(self._seconds_per_job * admitted)))

    # the engine thread

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._queue.popleft()
                job.state = RUNNING
                self._running = job
            started = time.perf_counter()
            try:
                self._serve(job)
            finally:
                elapsed = time.perf_counter() - started
                with self._cond:
                    job.state = DONE
                    self._running = None
                    self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * elapsed

    def _serve(self, job: Job) -> None:
        try:
            self.host.run(lambda engine: self._generate(engine, job))
        except WorkerLost as e:
            self.cache.clear()
            job.emit(Failed(unavailable(f"The cluster lost a worker ({e}); reconnecting, retry shortly.")))
        except EngineDown as e:
            self.cache.clear()
            job.emit(Failed(unavailable(f"The engine is down ({e}); retry shortly.")))
        except Exception as e:  # noqa: BLE001 - one request's failure must not end the engine thread
            log.exception("generation failed")
            self.cache.clear()
            job.emit(Failed(ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error",
                                     code="internal_error")))

    def _generate(self, engine: Any, job: Job) -> None:
        sampling = job.sampling
        cached = self.cache.reuse(engine, job.prompt_ids)
        fresh = job.prompt_ids[cached:]
        job.emit(Started(cached))
        reply = ReplyText(self.tokenizer, sampling.stop, job.reasoning)
        cut_short = False  # the client left, or the server is shutting down

        def on_token(token: int) -> bool | None:
            nonlocal cut_short
            if job.cancelled.is_set():
                cut_short = True
                return True
            deltas, stopped = reply.push(token)
            for delta in deltas:
                job.emit(delta)
            return stopped or None

        sampler = Sampler(temperature=sampling.temperature, topp=sampling.top_p, seed=sampling.seed)
        try:
            result = generate(engine, fresh, steps=sampling.max_tokens, sampler=sampler,
                              eos_ids=self.tokenizer.eos_ids, on_token=on_token)
        except BaseException:
            self.cache.clear()
            raise
        self.cache.record(engine, fresh + result.tokens)
        if self.metrics is not None:
            self.metrics.generation(prompt_tokens=len(job.prompt_ids), cached_tokens=cached, result=result)
        if cut_short:
            if job.abort is not None:
                job.emit(Failed(job.abort))
            return
        for delta in reply.finish():
            job.emit(delta)
        finish_reason = "stop" if reply.stopped else result.finish_reason
        job.emit(Finished(finish_reason, Usage(len(job.prompt_ids), len(result.tokens), cached)))
