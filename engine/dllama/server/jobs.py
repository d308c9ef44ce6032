"""A request as the engine thread sees it, and the events it sends back to the request's handler.

    Started (the prompt tokens reused from the slot's cache)
    Delta... (text.py: reply text as it becomes certain)
    Finished (finish reason, usage)  or  Failed (an ApiError: 503 when a worker is lost, ...)

Events cross from the engine thread through `Job.emit`, which must be thread-safe.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import ApiError
from .schemas import Sampling

QUEUED, RUNNING, DONE, CANCELLED = "queued", "running", "done", "cancelled"


@dataclass(eq=False)
class Job:
    prompt_ids: list[int]
    sampling: Sampling  # max_tokens resolved: prompt + max_tokens fits in the context
    emit: Callable[[Any], None]  # thread-safe: hands an event to the request's handler
    reasoning: str | None = None  # None: plain text (completions); else the ReasoningSplitter mode
    state: str = QUEUED
    cancelled: threading.Event = field(default_factory=threading.Event)  # leave the batch at the next step
    abort: ApiError | None = None  # why it was stopped, when someone is still listening
    started: float = 0.0  # time.perf_counter() when it began running (Retry-After's average)


@dataclass(frozen=True)
class Started:
    cached_tokens: int  # prompt tokens reused from its slot's KV cache


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
