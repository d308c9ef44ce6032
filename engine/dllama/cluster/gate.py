"""Where strangers knock: every connection a listener accepts is introduced in its own thread,
under its own deadline, with at most `max_pending` introductions at once, so a silent or slow
stranger holds one slot for a few seconds and never the door."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

from . import auth
from .protocol import printable

# What an introduction returns: nothing (refused, or recorded by the introduction itself), or
# the rest of the conversation, which then runs in the same thread with the slot freed.
Continuation = Callable[[], None] | None


class RateLimitedLog:
    """Up to `burst` lines per kind at once, then one per `every` seconds, with a count of the
    ones held back: a crowd of strangers cannot flood the journal."""

    def __init__(self, log: Callable[[str], None], burst: int = 10, every: float = 2.0) -> None:
        self.log, self.burst, self.every = log, burst, every
        self._tokens: dict[str, tuple[float, float]] = {}  # kind -> (tokens, when counted)
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, kind: str, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            tokens, then = self._tokens.get(kind, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) / self.every)
            if tokens < 1:
                self._tokens[kind] = (tokens, now)
                self._held[kind] = self._held.get(kind, 0) + 1
                return
            self._tokens[kind] = (tokens - 1, now)
            held = self._held.pop(kind, 0)
        self.log(message + (f" ({held} more like it not logged)" if held else ""))


def peer_name(addr) -> str:
    return printable(auth.endpoint(addr))


class Gate:
    def __init__(self, listener: socket.socket, introduce: Callable[[socket.socket, str], Continuation], *,
                 max_pending: int, log: RateLimitedLog) -> None:
        self.listener, self.introduce, self.log = listener, introduce, log
        self._slots = threading.BoundedSemaphore(max_pending)
        self.max_pending = max_pending

    def accept_until(self, done: Callable[[], bool], deadline: float | None = None, poll: float = 0.2) -> bool:
        """Accepts and introduces connections until `done()` holds (True) or the monotonic
        `deadline` passes (False). Without a deadline, until done() (which may never hold)."""
        self.listener.settimeout(poll)
        while not done():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            try:
                conn, addr = self.listener.accept()
            except TimeoutError:
                continue
            peer = peer_name(addr)
            if not self._slots.acquire(blocking=False):
                self.log("crowd", f"{peer}: closed at once: {self.max_pending} connections are already being introduced")
                conn.close()
                continue
            threading.Thread(target=self._run, args=(conn, peer), name=f"intro {peer}", daemon=True).start()
        return True

    def _run(self, conn: socket.socket, peer: str) -> None:
        rest = None
        try:
            rest = self.introduce(conn, peer)
        finally:
            self._slots.release()
        if rest is not None:
            rest()
