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

from .history import History

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
    nodes: list[dict] = field(default_factory=list)  # NodeWatch.nodes(): the root and each worker


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
        self.history = History()
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

    def step(self, *, tokens: int, sequences: int, generated: int, prefill_tokens: int = 0, decode_tokens: int = 0,
             seconds: float = 0.0, net: dict[str, float] | None = None) -> None:
        """An engine step: tokens fed, sequences in it, tokens it generated (sampled and kept);
        for the history, the prompt tokens among those fed, the decoding sequences' tokens, the
        step's time and its network figures."""
        self.step_tokens.observe(tokens)
        self.step_sequences.observe(sequences)
        self.recent.add(generated)
        self.history.step(prefill_tokens=prefill_tokens, decode_tokens=decode_tokens, seconds=seconds, net=net or {})

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
        yield from node_gauges(live.nodes)


# (name, help, the figure it shows)
NODE_GAUGES = (
    ("dllama_node_temperature_celsius", "CPU temperature", "temperature_c"),
    ("dllama_node_cpu_mhz", "CPU clock now (cpu0)", "cpu_mhz"),
    ("dllama_node_load1", "Load average over 1 minute", "load1"),
    ("dllama_node_engine_rss_bytes", "Resident memory of the engine process (dllama-api on the root, "
     "dllama worker on a worker)", "rss_bytes"),
    ("dllama_node_memory_total_bytes", "Memory of the node", "mem_total_bytes"),
    ("dllama_node_memory_available_bytes", "Memory available for new processes", "mem_available_bytes"),
)


def node_gauges(nodes: list[dict]) -> Iterator[Metric]:
    """Per node (label node: "root" or the worker's HOST:PORT): up, each figure it reported, and
    the Pi's throttling flags now and since boot (nodes without vcgencmd have no such series)."""
    up = GaugeMetricFamily("dllama_node_up", "1 when the node answers (a worker: its figures connection)",
                           labels=["node"])
    families = [(GaugeMetricFamily(name, text, labels=["node"]), key) for name, text, key in NODE_GAUGES]
    throttle = GaugeMetricFamily("dllama_node_throttle", "1 when vcgencmd get_throttled reports the flag "
                                 "(now, or at some point since boot)", labels=["node", "flag", "since_boot"])
    for node in nodes:
        up.add_metric([node["address"]], int(node["status"] != "down"))
        for family, key in families:
            value = node["figures"].get(key)
            if value is not None:
                family.add_metric([node["address"]], value)
        for when, flags in (node["throttling"] or {}).items():
            for flag, on in flags.items():
                throttle.add_metric([node["address"], flag, str(int(when == "since_boot"))], int(on))
    yield up
    for family, _ in families:
        yield family
    yield throttle
