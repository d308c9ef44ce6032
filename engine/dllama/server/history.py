"""The cluster's figures over the last minutes, for the /cluster page's plots: every engine step
adds to the bucket of its time (BUCKET_SECONDS wide, the last BUCKETS of them kept).

Per bucket: prefill tok/s over the steps that read prompts, decode tok/s, sync ms and KB
(sent + received by the root) per token over the steps that only generated (a step that does
both says little about either). A bucket without such steps has None for them: a gap, not 0.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

BUCKET_SECONDS = 5.0
BUCKETS = 60  # five minutes


@dataclass
class _Bucket:
    start: float
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    sync_ms: float = 0.0
    net_kb: float = 0.0


class History:
    def __init__(self, clock: Callable[[], float] = time.time, bucket_seconds: float = BUCKET_SECONDS,
                 buckets: int = BUCKETS) -> None:
        self._clock = clock
        self.bucket_seconds = bucket_seconds
        self._buckets: deque[_Bucket] = deque(maxlen=buckets)
        self._lock = threading.Lock()

    def step(self, *, prefill_tokens: int, decode_tokens: int, seconds: float, net: dict[str, float]) -> None:
        """One engine step: prompt tokens it read, tokens the decoding sequences generated, its
        time, and its network figures (engine.stats(): sync_ms, sent_kb, recv_kb; empty alone)."""
        with self._lock:
            b = self._bucket(self._clock())
            if prefill_tokens:
                b.prefill_tokens += prefill_tokens
                b.prefill_seconds += seconds
            elif decode_tokens:
                b.decode_tokens += decode_tokens
                b.decode_seconds += seconds
                b.sync_ms += net.get("sync_ms", 0.0)
                b.net_kb += net.get("sent_kb", 0.0) + net.get("recv_kb", 0.0)

    def series(self) -> dict[str, list]:
        """Oldest first, one point per bucket of the whole window, which ends now (buckets before
        the first step and those without steps give None)."""
        with self._lock:
            latest = self._bucket(self._clock())
            points = list(self._buckets)
        size = self._buckets.maxlen or 0
        first = latest.start - (size - 1) * self.bucket_seconds
        points = [_Bucket(first + i * self.bucket_seconds) for i in range(size - len(points))] + points
        out: dict[str, list] = {"t": [], "prefill_tps": [], "decode_tps": [], "sync_ms_per_token": [],
                                "kb_per_token": []}
        for b in points:
            out["t"].append(b.start)
            out["prefill_tps"].append(_ratio(b.prefill_tokens, b.prefill_seconds))
            out["decode_tps"].append(_ratio(b.decode_tokens, b.decode_seconds))
            out["sync_ms_per_token"].append(_ratio(b.sync_ms, b.decode_tokens))
            out["kb_per_token"].append(_ratio(b.net_kb, b.decode_tokens))
        return out

    def _bucket(self, now: float) -> _Bucket:
        """The bucket of `now`, the ones between the last and it added empty."""
        start = now - now % self.bucket_seconds
        if self._buckets and self._buckets[-1].start > start:  # the clock went back: start over
            self._buckets.clear()
        last = self._buckets[-1].start if self._buckets else start - self.bucket_seconds
        gap = min(int(round((start - last) / self.bucket_seconds)), self._buckets.maxlen or 0)
        for i in range(gap - 1, -1, -1):
            self._buckets.append(_Bucket(start - i * self.bucket_seconds))
        return self._buckets[-1]


def _ratio(total: float, per: float) -> float | None:
    return round(total / per, 3) if per > 0 else None
