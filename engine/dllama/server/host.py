"""The engine behind a holder that knows whether it is up.

A single node's engine never goes down. A cluster's does when a worker dies: the step that
notices raises `WorkerLost(address)` (or, between requests, the node watch reports the worker gone
or restarted: report_lost, see nodes.py), the request in flight ends with an error, /health turns
503 naming the worker, and a background loop recreates the engine (connect, handshake, weights:
fast once the workers cache their slices) with backoff until it succeeds. `dllama-api` itself
never restarts.

    host = EngineHost(lambda: Engine(model, workers=[...]), workers=[...])
    host.start()                                # the engine now, or down + reconnecting
    logits = host.run(lambda e: e.forward(ids)) # WorkerLost or OSError -> down, then reconnect

The engine is used by one thread at a time (the scheduler's), always through run(). This module
needs only the standard library, so the engine can raise WorkerLost without the web stack.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

log = logging.getLogger("dllama.api")

from ..cluster.errors import WorkerLost

T = TypeVar("T")

MIN_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 5.0  # a restarted worker is back in use within this long


class EngineDown(RuntimeError):
    """The engine is not up: a worker is down and the host is reconnecting."""


@dataclass(frozen=True)
class HostState:
    up: bool
    reason: str = ""  # why it is down, naming the worker ("" when up)
    workers: dict[str, bool] = field(default_factory=dict)  # HOST:PORT -> up, in slice order
    since: float = 0.0  # time.time() of the last change
    attempts: int = 0  # reconnect attempts since it went down


class EngineHost:
    """Owns the engine: creates it, runs steps on it, notices when it is lost, recreates it."""

    def __init__(
        self,
        factory: Callable[[], Any],
        workers: Sequence[str] = (),
        *,
        min_backoff: float = MIN_BACKOFF_SECONDS,
        max_backoff: float = MAX_BACKOFF_SECONDS,
    ) -> None:
        self._factory = factory
        self._workers = list(workers)
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._lock = threading.Lock()
        self._stepping = threading.Lock()  # held while a step runs: no one closes the engine under it
        self._closed = threading.Event()
        self._engine: Any = None
        self._generation = 0  # bumped each time an engine is created: a loss is reported once
        self._state = HostState(up=False, reason="not started", workers={w: False for w in self._workers},
                                since=time.time())
        self._reconnector: threading.Thread | None = None

    # state

    @property
    def state(self) -> HostState:
        return self._state

    @property
    def workers(self) -> list[str]:
        return list(self._workers)

    @property
    def epoch(self) -> int:
        """Changes whenever an engine is installed or lost: report_lost names the engine it means."""
        return self._generation

    def info(self) -> Any:
        """The live engine (for figures such as max_seq_len), or None while down."""
        return self._engine if self._state.up else None

    # lifecycle

    def start(self) -> None:
        """Create the engine now. A lost worker leaves the host down and reconnecting; any other
        error (a missing model file, bad flags) is the operator's to fix and is raised."""
        try:
            engine = self._factory()
        except ConnectionError as e:  # a worker is not there (yet): serve 503 and keep trying
            self._lose(self._as_lost(e), self._generation)
            return
        with self._lock:
            self._install(engine)

    def close(self) -> None:
        self._closed.set()
        thread = self._reconnector
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)
        with self._lock:
            engine, self._engine = self._engine, None
            self._state = HostState(up=False, reason="shut down", workers={w: False for w in self._workers},
                                    since=time.time())
        _close_quietly(engine)

    # steps

    def run(self, step: Callable[[Any], T]) -> T:
        """step(engine) on the live engine. A WorkerLost, or an OSError from the engine's sockets,
        marks the host down, starts the reconnect loop and is raised as WorkerLost."""
        with self._stepping:
            with self._lock:
                if not self._state.up:
                    raise EngineDown(self._state.reason)
                engine, generation = self._engine, self._generation
            try:
                return step(engine)
            except OSError as e:  # the engine's WorkerLost, a ClusterError, a socket error
                lost = self._as_lost(e)
                self._lose(lost, generation)
                if lost is e:
                    raise
                raise lost from e

    def report_lost(self, address: str, reason: str, epoch: int) -> None:
        """Someone outside the steps (the node watch) knows a worker of the engine of `epoch` is
        gone: down and reconnecting now, not at the next request's step. Waits for a step in
        flight to end; a no-op when that engine is already gone."""
        with self._stepping:
            if self._state.up:  # down already: the reconnect loop is on it
                self._lose(WorkerLost(address, reason), epoch)

    # going down and coming back

    def _as_lost(self, error: OSError) -> WorkerLost:
        if isinstance(error, WorkerLost):
            return error
        return WorkerLost(_address(error, self._workers), str(error) or type(error).__name__)

    def _install(self, engine: Any) -> None:
        self._engine = engine
        self._generation += 1
        self._state = HostState(up=True, workers={w: True for w in self._workers}, since=time.time())

    def _lose(self, lost: WorkerLost, generation: int) -> None:
        with self._lock:
            if generation != self._generation or self._closed.is_set():
                return  # this engine's loss was already handled (or we are shutting down)
            engine, self._engine = self._engine, None
            self._generation += 1
            workers = dict(self._state.workers)
            if lost.address in workers:
                workers[lost.address] = False
            self._state = HostState(up=False, reason=str(lost), workers=workers, since=time.time())
            log.warning("%s; reconnecting", lost)
            if self._reconnector is None:  # (a loop that has installed an engine has let go of it)
                self._reconnector = threading.Thread(target=self._reconnect, name="dllama-reconnect", daemon=True)
                self._reconnector.start()
        _close_quietly(engine)

    def _reconnect(self) -> None:
        delay = self._min_backoff
        attempts = 0
        first_reason = self._state.reason
        while not self._closed.wait(delay):
            attempts += 1
            try:
                engine = self._factory()
            except Exception as e:  # noqa: BLE001 - any failure to come back is retried
                with self._lock:
                    state = self._state
                    workers = dict(state.workers)
                    address = _address(e, self._workers)
                    if address in workers:
                        workers[address] = False
                    latest = str(e) or type(e).__name__
                    reason = first_reason if latest in first_reason else f"{first_reason}; now: {latest}"
                    self._state = HostState(up=False, reason=reason, workers=workers, since=state.since,
                                            attempts=attempts)
                delay = min(delay * 2, self._max_backoff)
                log.info("reconnect attempt %d failed: %s; next in %.1f s", attempts, e, delay)
                continue
            with self._lock:
                closing = self._closed.is_set()
                if not closing:
                    self._install(engine)
                    self._reconnector = None  # the next loss starts a new loop
            if closing:
                _close_quietly(engine)
            else:
                log.warning("the engine is back after %d attempt%s", attempts, "" if attempts == 1 else "s")
            return


def _address(error: BaseException, workers: Sequence[str]) -> str:
    """The HOST:PORT an engine error is about: its .address or .worker, else the first worker
    its message names ("" when it names none)."""
    for name in ("address", "worker"):
        value = getattr(error, name, None)
        if value:
            return str(value)
    message = str(error)
    return next((w for w in workers if w in message), "")


def _close_quietly(engine: Any) -> None:
    if engine is None:
        return
    try:
        engine.close()
    except Exception as e:  # noqa: BLE001 - a broken engine may fail to close; it is gone either way
        log.debug("closing the old engine failed: %s", e)
