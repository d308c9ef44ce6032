"""GET /metrics: the server's figures in Prometheus text format, one registry per server.

Counters and the last request's rates are updated as requests end, the batch figures (tokens and
sequences per step, tokens generated over the last 10 s) after every engine step; the queue and
the cluster (up, each worker up or down) are read when Prometheus scrapes.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
RATE_WINDOW_SECONDS = 10.0
# a step's tokens: one per decoding sequence, plus up to --prefill-chunk prompt tokens
STEP_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
STEP_SEQUENCE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64, 128, 256)


@dataclass
class Live:
    """What a scrape reads from the scheduler and the engine host."""

    waiting: int
    running: int
    parallel: int
    queue_size: int
    up: bool
    workers: dict[str, bool] = field(default_factory=dict)


class Metrics:
    def __init__(self, live: Callable[[], Live]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("dllama_requests", "HTTP requests by endpoint and outcome status "
                                "(499: the client left; a stream that fails after it began counts as its error)",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("dllama_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter("dllama_prompt_tokens_cached",
                                     "Prompt tokens reused from the KV cache of their sequence slot", registry=r)
        self.generated_tokens = Counter("dllama_generated_tokens", "Tokens generated", registry=r)
        # per request: a step shared by several requests counts for each of them
        self.prefill_seconds = Counter("dllama_prefill_seconds", "Time of the steps that evaluated prompts, summed "
                                       "over requests", registry=r)
        self.decode_seconds = Counter("dllama_decode_seconds", "Time of the steps that generated tokens after the "
                                      "first, summed over requests", registry=r)
        self.prefill_rate = Gauge("dllama_prefill_tokens_per_second", "Prompt evaluation rate of the last request "
                                  "(its steps shared with the others running)", registry=r)
        self.decode_rate = Gauge("dllama_decode_tokens_per_second", "Generation rate of the last request (its steps "
                                 "shared with the others running; dllama_generated_tokens_per_second is all of "
                                 "them together)", registry=r)
        self.sync_ms = Gauge("dllama_sync_ms_per_token", "Network sync time per generated token, last request "
                             "(0 on a single node)", registry=r)
        self.sent_kb = Gauge("dllama_sent_kb_per_token", "KB sent by the root per generated token, last request",
                             registry=r)
        self.recv_kb = Gauge("dllama_recv_kb_per_token", "KB received by the root per generated token, last request",
                             registry=r)
        self.step_tokens = Histogram("dllama_step_tokens", "Tokens per engine step, all sequences together "
                                     "(prompt pieces and one per decoding sequence)", buckets=STEP_TOKEN_BUCKETS,
                                     registry=r)
        self.step_sequences = Histogram("dllama_step_sequences", "Sequences advanced per engine step",
                                        buckets=STEP_SEQUENCE_BUCKETS, registry=r)
        self.recent = Window(RATE_WINDOW_SECONDS)
        r.register(_LiveCollector(live, self.recent))

    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def generation(self, *, prompt_tokens: int, cached_tokens: int, result) -> None:
        """A finished (or cut short) generation: result is generate()'s GenerationResult."""
        self.prompt_tokens.inc(prompt_tokens)
        self.cached_tokens.inc(cached_tokens)
        self.generated_tokens.inc(len(result.tokens))
        self.prefill_seconds.inc(result.prefill_seconds)
        self.decode_seconds.inc(result.decode_seconds)
        if result.prefill_tokens:
            self.prefill_rate.set(result.prefill_tokens_per_second)
        if result.decode_tokens:
            self.decode_rate.set(result.decode_tokens_per_second)
            net = result.decode_net
            self.sync_ms.set(net.get("sync_ms", 0.0))
            self.sent_kb.set(net.get("sent_kb", 0.0))
            self.recv_kb.set(net.get("recv_kb", 0.0))

    def step(self, *, tokens: int, sequences: int, generated: int) -> None:
        """An engine step: tokens fed, sequences in it, tokens it generated (sampled and kept)."""
        self.step_tokens.observe(tokens)
        self.step_sequences.observe(sequences)
        self.recent.add(generated)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Window:
    """Counts of the last `seconds`, for a rate over a recent window (thread-safe: the engine
    thread adds, a scrape reads)."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            now = self._clock()
            self._events.append((now, n))
            self._forget(now)

    def rate(self) -> float:
        """The counts of the window per second (idle time included: a burst shows as its share)."""
        with self._lock:
            self._forget(self._clock())
            return sum(n for _, n in self._events) / self.seconds

    def _forget(self, now: float) -> None:
        while self._events and self._events[0][0] <= now - self.seconds:
            self._events.popleft()


class _LiveCollector:
    def __init__(self, live: Callable[[], Live], recent: Window) -> None:
        self._live = live
        self._recent = recent

    def collect(self) -> Iterator[Metric]:
        live = self._live()
        yield GaugeMetricFamily("dllama_queue_length", "Requests waiting for a sequence slot", value=live.waiting)
        yield GaugeMetricFamily("dllama_requests_running", "Requests the engine is generating: the active sequences "
                                "(at most dllama_parallel)", value=live.running)
        yield GaugeMetricFamily("dllama_parallel", "Sequences the engine generates at once (--parallel)",
                                value=live.parallel)
        yield GaugeMetricFamily("dllama_generated_tokens_per_second",
                                f"Tokens generated per second by all sequences together over the last "
                                f"{self._recent.seconds:g} s", value=self._recent.rate())
        yield GaugeMetricFamily("dllama_queue_size", "Requests admitted at most (running + waiting); more get 429",
                                value=live.queue_size)
        yield GaugeMetricFamily("dllama_cluster_up", "1 when the engine (every node) is up", value=int(live.up))
        workers = GaugeMetricFamily("dllama_worker_up", "1 when the worker at this address is up",
                                    labels=["address"])
        for address, up in live.workers.items():
            workers.add_metric([address], int(up))
        yield workers
