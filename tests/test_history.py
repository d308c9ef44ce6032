"""The /cluster page's history: per time bucket, prefill and decode rates and the network's
figures per generated token, over a window that always ends now."""
from __future__ import annotations

from dllama.server.history import History


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_buckets_hold_rates_per_kind_of_step_and_gaps_stay_gaps():
    clock = Clock()
    h = History(clock, bucket_seconds=5, buckets=4)
    h.step(prefill_tokens=100, decode_tokens=0, seconds=0.5, net={"sync_ms": 9.0, "sent_kb": 1, "recv_kb": 1})
    h.step(prefill_tokens=0, decode_tokens=2, seconds=0.1, net={"sync_ms": 4.0, "sent_kb": 1.5, "recv_kb": 0.5})
    h.step(prefill_tokens=0, decode_tokens=2, seconds=0.1, net={"sync_ms": 2.0, "sent_kb": 1.5, "recv_kb": 0.5})
    clock.now += 10  # one bucket without steps, then the current one
    h.step(prefill_tokens=0, decode_tokens=1, seconds=0.05, net={})  # a single node: no network
    s = h.series()
    assert s["t"] == [995.0, 1000.0, 1005.0, 1010.0]  # the whole window, oldest first, ending now
    assert s["prefill_tps"] == [None, 200.0, None, None]
    assert s["decode_tps"] == [None, 20.0, None, 20.0]
    assert s["sync_ms_per_token"] == [None, 1.5, None, 0.0]  # the prefill step's sync is not a token's
    assert s["kb_per_token"] == [None, 1.0, None, 0.0]
    clock.now += 60  # past the window: only empty buckets
    assert h.series()["decode_tps"] == [None] * 4 and len(h.series()["t"]) == 4
