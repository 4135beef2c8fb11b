"""Prometheus metrics of one replica.

Request-level metrics (counts by route and status, TTFT, inter-token latency, end-to-end latency,
queue time, token counters) are recorded by the handlers. Engine state (running, waiting, KV usage,
prefix-cache counters) is read from `engine.load()` once per scrape, and also exported under vLLM's
names (`vllm:num_requests_running`, ...) so routers and dashboards built for vLLM read our replicas.
Each app has its own registry (several replicas can live in one test process); the process-wide
default registry (process stats, control-plane health) is appended to the output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from replica.engine.outputs import EngineLoad

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                0.3, 0.4, 0.5, 0.75, 1.0, 2.5)  # fmt: skip
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0, 960.0)  # fmt: skip


class EngineLoadCollector(Collector):
    """Turns one `engine.load()` dict into gauges and counters at scrape time."""

    def __init__(self, load: Callable[[], EngineLoad | None], model_name: str) -> None:
        self._load = load
        self._model = model_name

    def collect(self) -> Iterator[Metric]:
        load = self._load()
        if load is None:
            return
        gauges = (
            ("num_requests_running", "Requests in the running batch", load["running"]),
            ("num_requests_waiting", "Requests waiting to be scheduled", load["waiting"]),
        )
        for name, doc, value in gauges:
            yield _gauge(f"fleetserve_{name}", doc, value)
            yield _gauge(f"vllm:{name}", doc, value, self._model)
        doc = "Fraction of KV-cache blocks in use (0..1)"
        yield _gauge("fleetserve_kv_cache_usage_ratio", doc, load["kv_usage"])
        yield _gauge("vllm:kv_cache_usage_perc", doc, load["kv_usage"], self._model)
        counters = (
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
             load["prefix_cache_queries"]),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache",
             load["prefix_cache_hits"]),
        )  # fmt: skip
        for name, doc, value in counters:
            yield _counter(f"fleetserve_{name}", doc, value)
            yield _counter(f"vllm:{name}", doc, value, self._model)


def _gauge(name: str, doc: str, value: float, model: str | None = None) -> Metric:
    labels = ["model_name"] if model is not None else []
    family = GaugeMetricFamily(name, doc, labels=labels)
    family.add_metric([model] if model is not None else [], value)
    return family


def _counter(name: str, doc: str, value: float, model: str | None = None) -> Metric:
    labels = ["model_name"] if model is not None else []
    family = CounterMetricFamily(name, doc, labels=labels)
    family.add_metric([model] if model is not None else [], value)
    return family


class ReplicaMetrics:
    """The replica's metrics; handlers call the `observe_*` methods, /metrics calls `render`."""

    def __init__(self, model_name: str, load: Callable[[], EngineLoad | None]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "fleetserve_requests", "HTTP requests by route and status", ["route", "status"],
            registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "fleetserve_time_to_first_token_seconds", "Arrival to first generated token",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "fleetserve_inter_token_latency_seconds", "Time between generated tokens",
            buckets=_ITL_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "fleetserve_e2e_request_latency_seconds", "Arrival to last token",
            buckets=_E2E_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue = Histogram(
            "fleetserve_request_queue_time_seconds", "Arrival to first scheduling by the engine",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "fleetserve_prompt_tokens", "Prompt tokens of finished requests", registry=r
        )
        self.generation_tokens = Counter(
            "fleetserve_generation_tokens", "Generated tokens", registry=r
        )
        r.register(EngineLoadCollector(load, model_name))

    def render(self) -> bytes:
        return generate_latest(self.registry) + generate_latest(REGISTRY)
