"""The boards as `dllama-api` sees them: every POLL_SECONDS each worker is asked for its
figures over a STATS connection of its own (never the engine's sockets, so no step is raced),
and the root reads its own.

A worker that cannot be reached shows down at once. It also tells the engine host, which
otherwise learns of a dead worker only at the next request's step: a worker whose port refuses
connections (its process is gone), or that answers with a new instance id (it restarted since
the engine's session began), makes the host drop that engine and reconnect, so the first request
after a restart finds the cluster whole again. A slow or odd answer only shows on the page.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from ..cluster import node_stats
from ..cluster.errors import ClusterError
from ..cluster.root import WorkerAddress
from ..cluster.stats_client import BadReport, StatsLink, refused

log = logging.getLogger("dllama.api")

POLL_SECONDS = 2.0
ROOT = "root"


@dataclass(frozen=True)
class NodeView:
    address: str
    role: str  # "root" or "worker"
    reachable: bool = False
    figures: dict[str, Any] = field(default_factory=dict)
    error: str = ""  # why the last poll failed ("" when it did not)
    seen: float = 0.0  # time.time() of the last good report (0: never)
    serving: bool | None = None  # in a session (workers only)


class NodeWatch:
    def __init__(self, workers: list[str], key: bytes, host: Any, *, interval: float = POLL_SECONDS) -> None:
        self.host = host
        self.interval = interval
        self._key = key
        self._lock = threading.Lock()
        self._views = {ROOT: NodeView(ROOT, ROOT, reachable=True), **{w: NodeView(w, "worker") for w in workers}}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._watch_root, name="dllama-watch root", daemon=True)]
        self._threads += [threading.Thread(target=self._watch, args=(w,), name=f"dllama-watch {w}", daemon=True)
                          for w in workers]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)

    def nodes(self) -> list[dict[str, Any]]:
        """The root, then each worker in slice order: address, role, status (up, down, waiting:
        reachable while the engine reconnects), figures, decoded throttling, error, seen."""
        state = self.host.state
        with self._lock:
            views = list(self._views.values())
        out = []
        for v in views:
            engaged = state.up and (v.role == ROOT or state.workers.get(v.address, False))
            out.append(_shown(v, "down" if not v.reachable else "up" if engaged else "waiting"))
        return out

    def _watch_root(self) -> None:
        """This process's own figures, read as often as the workers' (vcgencmd is a process)."""
        while True:
            self._update(ROOT, reachable=True, figures=node_stats.read_local(), seen=time.time())
            if self._stop.wait(self.interval):
                return

    def _watch(self, address: str) -> None:
        link = StatsLink(WorkerAddress.parse(address), self._key)
        known: tuple[str, int] | None = None  # (instance, the host's epoch when it was seen)
        try:
            while True:
                epoch = self.host.epoch
                try:
                    report = link.ask()
                except BadReport as e:
                    self._update(address, reachable=True, error=str(e), figures={})
                except ClusterError as e:
                    if self._update(address, reachable=False, error=str(e), figures={}).reachable:
                        log.warning("the node watch lost %s: %s", address, e)
                    known = None
                    if refused(e):
                        self.host.report_lost(address, "its port refuses connections (the worker stopped)", epoch)
                else:
                    if known is not None and report.instance != known[0]:
                        self.host.report_lost(address, "the worker restarted", known[1])
                    known = (report.instance, epoch)
                    before = self._update(address, reachable=True, error="", figures=report.figures,
                                          seen=time.time(), serving=report.serving)
                    if not before.reachable and before.seen:
                        log.warning("the node watch reaches %s again", address)
                if self._stop.wait(self.interval):
                    return
        finally:
            link.close()

    def _update(self, address: str, **changes: Any) -> NodeView:
        """Changes a node's view; returns the view before."""
        with self._lock:
            before = self._views[address]
            self._views[address] = replace(before, **changes)
        return before


def _shown(view: NodeView, status: str) -> dict[str, Any]:
    figures = view.figures
    return {"address": view.address, "role": view.role, "status": status, "figures": figures,
            "throttling": node_stats.decode_throttled(figures.get("throttled")), "error": view.error,
            "seen": view.seen, "serving": view.serving}
