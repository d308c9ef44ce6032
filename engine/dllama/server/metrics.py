"""GET /metrics: the server's figures in Prometheus text format, one registry per server.

Counters and the last request's rates are updated as requests end; the queue and the cluster
(up, each worker up or down) are read when Prometheus scrapes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4


@dataclass
class Live:
    """What a scrape reads from the scheduler and the engine host."""

    waiting: int
    running: int
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
                                     "Prompt tokens reused from the KV cache of the previous sequence", registry=r)
        self.generated_tokens = Counter("dllama_generated_tokens", "Tokens generated", registry=r)
        self.prefill_seconds = Counter("dllama_prefill_seconds", "Time spent evaluating prompts", registry=r)
        self.decode_seconds = Counter("dllama_decode_seconds", "Time spent generating tokens after the first",
                                      registry=r)
        self.prefill_rate = Gauge("dllama_prefill_tokens_per_second", "Prompt evaluation rate of the last request",
                                  registry=r)
        self.decode_rate = Gauge("dllama_decode_tokens_per_second", "Generation rate of the last request",
                                 registry=r)
        self.sync_ms = Gauge("dllama_sync_ms_per_token", "Network sync time per generated token, last request "
                             "(0 on a single node)", registry=r)
        self.sent_kb = Gauge("dllama_sent_kb_per_token", "KB sent by the root per generated token, last request",
                             registry=r)
        self.recv_kb = Gauge("dllama_recv_kb_per_token", "KB received by the root per generated token, last request",
                             registry=r)
        r.register(_LiveCollector(live))

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

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveCollector:
    def __init__(self, live: Callable[[], Live]) -> None:
        self._live = live

    def collect(self) -> Iterator[Metric]:
        live = self._live()
        yield GaugeMetricFamily("dllama_queue_length", "Requests waiting for the engine", value=live.waiting)
        yield GaugeMetricFamily("dllama_requests_running", "Requests the engine is generating (0 or 1)",
                                value=live.running)
        yield GaugeMetricFamily("dllama_queue_size", "Requests admitted at most (running + waiting); more get 429",
                                value=live.queue_size)
        yield GaugeMetricFamily("dllama_cluster_up", "1 when the engine (every node) is up", value=int(live.up))
        workers = GaugeMetricFamily("dllama_worker_up", "1 when the worker at this address is up",
                                    labels=["address"])
        for address, up in live.workers.items():
            workers.add_metric([address], int(up))
        yield workers
