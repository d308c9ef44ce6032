"""Warnings that strangers can cause, at a rate a log can hold.

A client decides how often the server warns: every malformed request, refused connection or
request deadline is a warning, and asyncio logs a traceback each time accept() fails. So each
kind of warning (its logger and message template) is logged at most once per window; the next
one logged says how many were dropped meanwhile. Lines below WARNING pass untouched.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterable

WINDOW_SECONDS = 10.0
MAX_KINDS = 512  # templates remembered at once; a logger formatting its own messages makes new ones
# the loggers strangers can make talk: uvicorn's, asyncio's (accept errors), the server's own
NOISY_LOGGERS = ("uvicorn.error", "asyncio", "dllama.api")


class RateLimit(logging.Filter):
    def __init__(self, window: float = WINDOW_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._window = window
        self._clock = clock
        self._lock = threading.Lock()  # the engine and reconnect threads log too
        self._kinds: dict[tuple[str, int, str], list[float | int]] = {}  # kind -> [last logged at, dropped since]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        kind = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        with self._lock:
            seen = self._kinds.get(kind)
            if seen is not None and now - seen[0] < self._window:
                seen[1] += 1
                return False
            dropped = int(seen[1]) if seen is not None else 0
            if seen is None and len(self._kinds) >= MAX_KINDS:
                self._forget(now)
            self._kinds[kind] = [now, 0]
        if dropped:
            record.msg = f"{record.msg} (and {dropped} more like this not logged)"
        return True

    def _forget(self, now: float) -> None:
        """Make room: drop the kinds whose window is over (their dropped counts were logged or are
        lost with them), or all of them when every one is recent."""
        expired = [k for k, (at, _) in self._kinds.items() if now - at >= self._window]
        for k in expired or list(self._kinds):
            del self._kinds[k]


def rate_limit(loggers: Iterable[str] = NOISY_LOGGERS, window: float = WINDOW_SECONDS) -> RateLimit:
    """Install one RateLimit on each named logger (a logger's filters see the records it makes
    itself, so each one that warns gets it). Call it after uvicorn has configured its logging."""
    limit = RateLimit(window)
    for name in loggers:
        logging.getLogger(name).addFilter(limit)
    return limit
