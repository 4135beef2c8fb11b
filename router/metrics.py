"""Router metrics, counted in plain dicts on the hot path and turned into Prometheus families
only when scraped (prometheus-client's labelled children take a lock and a label lookup per call,
which the data path's CPU budget cannot spare).

Exposed names:
  fleet_router_requests_total{route,model,replica,status}
  fleet_router_ttft_seconds{route,model}            first byte to the client, as the router sees it
  fleet_router_e2e_seconds{route,model}             whole request
  fleet_router_retries_total{model,reason}
  fleet_router_ejections_total{replica}
  fleet_router_policy_decisions_total{policy,outcome}   prefix_hit / prefix_miss / load_fallback / ...
  fleet_router_replica_in_flight{replica}, fleet_router_replica_routable{replica}
  fleet_router_queue_depth                          requests waiting for a replica with room
  fleet_router_queue_wait_seconds                   time a request waited before it was sent
  fleet_router_queue_rejections_total{reason}       left the queue unsent: full / timeout / client_left
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import TypedDict

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)


class QueueSnapshot(TypedDict):
    """The router queue's totals (router.queueing)."""

    depth: int
    waited: int
    mean_wait_s: float
    rejections: dict[str, int]


class MetricsSnapshot(TypedDict):
    """The totals the admin stats endpoint and the dashboard show."""

    requests: int
    requests_by_status: dict[str, int]
    retries: int
    ejections: dict[str, int]
    policy_decisions: dict[str, int]  # "policy:outcome" -> decisions
    queue: QueueSnapshot


class MetricsState(TypedDict):
    """One router process's counters as plain JSON (router.workers adds the workers' up); the
    gauges are what it holds now, left out of the counts of a worker that has exited."""

    requests: list[tuple[str, str, str, str, int]]
    ttft: list[tuple[str, str, list[int], float]]
    e2e: list[tuple[str, str, list[int], float]]
    retries: list[tuple[str, str, int]]
    ejections: dict[str, int]
    decisions: list[tuple[str, str, int]]
    queue_waits: tuple[list[int], float]
    queue_rejections: dict[str, int]
    replicas: list[tuple[str, int, bool]]  # gauges: (replica, in flight, routable)
    queue_depth: int  # gauge


class Histogram:
    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def add(self, counts: list[int], total: float) -> None:
        for i, count in enumerate(counts[: len(self.counts)]):
            self.counts[i] += count
        self.sum += total

    def observe(self, value: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        total = 0
        out: list[tuple[str, float]] = []
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self.counts, strict=True):
            total += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out


class RouterMetrics:
    def __init__(
        self,
        replica_gauges: Callable[[], list[tuple[str, int, bool]]] = list,
        queue_depth: Callable[[], int] = lambda: 0,
    ) -> None:
        self.requests: dict[tuple[str, str, str, str], int] = {}
        self.ttft: dict[tuple[str, str], Histogram] = {}
        self.e2e: dict[tuple[str, str], Histogram] = {}
        self.retries: dict[tuple[str, str], int] = {}
        self.ejections: dict[str, int] = {}
        self.decisions: dict[tuple[str, str], int] = {}
        self.queue_waits = Histogram()
        self.queue_rejections: dict[str, int] = {}
        self._replica_gauges = replica_gauges
        self._queue_depth = queue_depth
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def request_done(self, route: str, model: str, replica: str, status: str, e2e: float) -> None:
        key = (route, model, replica, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        hist = self.e2e.get((route, model))
        if hist is None:
            hist = self.e2e[(route, model)] = Histogram()
        hist.observe(e2e)

    def first_byte(self, route: str, model: str, seconds: float) -> None:
        hist = self.ttft.get((route, model))
        if hist is None:
            hist = self.ttft[(route, model)] = Histogram()
        hist.observe(seconds)

    def retried(self, model: str, reason: str) -> None:
        self.retries[(model, reason)] = self.retries.get((model, reason), 0) + 1

    def ejected(self, replica: str) -> None:
        self.ejections[replica] = self.ejections.get(replica, 0) + 1

    def decided(self, policy: str, outcome: str) -> None:
        key = (policy, outcome)
        self.decisions[key] = self.decisions.get(key, 0) + 1

    def queue_waited(self, seconds: float) -> None:
        self.queue_waits.observe(seconds)

    def queue_rejected(self, reason: str) -> None:
        self.queue_rejections[reason] = self.queue_rejections.get(reason, 0) + 1

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "fleet_router_requests",
            "Requests by route, model, replica and status",
            labels=["route", "model", "replica", "status"],
        )
        for request_labels, value in list(self.requests.items()):
            requests.add_metric(list(request_labels), value)
        yield requests
        for name, doc, hists in (
            ("fleet_router_ttft_seconds", "Time to the first byte sent to the client", self.ttft),
            ("fleet_router_e2e_seconds", "Whole-request latency seen by the router", self.e2e),
        ):
            latency = HistogramMetricFamily(name, doc, labels=["route", "model"])
            for labels, hist in list(hists.items()):
                latency.add_metric(list(labels), hist.cumulative(), hist.sum)
            yield latency
        retries = CounterMetricFamily(
            "fleet_router_retries",
            "Requests retried on another replica",
            labels=["model", "reason"],
        )
        for labels, value in list(self.retries.items()):
            retries.add_metric(list(labels), value)
        yield retries
        ejections = CounterMetricFamily(
            "fleet_router_ejections", "Replicas ejected by the circuit breaker", labels=["replica"]
        )
        for replica, value in list(self.ejections.items()):
            ejections.add_metric([replica], value)
        yield ejections
        decisions = CounterMetricFamily(
            "fleet_router_policy_decisions",
            "Routing decisions by outcome",
            labels=["policy", "outcome"],
        )
        for labels, value in list(self.decisions.items()):
            decisions.add_metric(list(labels), value)
        yield decisions
        in_flight = GaugeMetricFamily(
            "fleet_router_replica_in_flight",
            "Requests this router has open on each replica",
            labels=["replica"],
        )
        routable = GaugeMetricFamily(
            "fleet_router_replica_routable",
            "1 when the replica takes new requests",
            labels=["replica"],
        )
        for replica_id, count, ok in self._replica_gauges():
            in_flight.add_metric([replica_id], count)
            routable.add_metric([replica_id], 1 if ok else 0)
        yield in_flight
        yield routable
        yield GaugeMetricFamily(
            "fleet_router_queue_depth",
            "Requests waiting in the router queue for a replica with room",
            value=self._queue_depth(),
        )
        waits = HistogramMetricFamily(
            "fleet_router_queue_wait_seconds", "Time a request waited in the router queue"
        )
        waits.add_metric([], self.queue_waits.cumulative(), self.queue_waits.sum)
        yield waits
        rejections = CounterMetricFamily(
            "fleet_router_queue_rejections",
            "Requests that left the router queue without being sent",
            labels=["reason"],
        )
        for reason, value in list(self.queue_rejections.items()):
            rejections.add_metric([reason], value)
        yield rejections

    def exposition(self) -> bytes:
        """Ours plus the process-wide registry (the control plane's Redis health lives there)."""
        return generate_latest(self.registry) + generate_latest(REGISTRY)

    def fleet_view(self) -> RouterMetrics:
        """The metrics of the whole router: this process's own, unless it is one of several
        workers (router.workers.metrics)."""
        return self

    def state(self) -> MetricsState:
        return {
            "requests": [(*labels, value) for labels, value in list(self.requests.items())],
            "ttft": [(*labels, h.counts, h.sum) for labels, h in list(self.ttft.items())],
            "e2e": [(*labels, h.counts, h.sum) for labels, h in list(self.e2e.items())],
            "retries": [(*labels, value) for labels, value in list(self.retries.items())],
            "ejections": dict(self.ejections),
            "decisions": [(*labels, value) for labels, value in list(self.decisions.items())],
            "queue_waits": (self.queue_waits.counts, self.queue_waits.sum),
            "queue_rejections": dict(self.queue_rejections),
            "replicas": self._replica_gauges(),
            "queue_depth": self._queue_depth(),
        }

    @classmethod
    def merged(cls, states: list[MetricsState]) -> RouterMetrics:
        """Several processes' metrics as one router's: counters and histograms added, in-flight
        and queue depth added, a replica routable where any process may route to it."""
        replicas: dict[str, tuple[int, bool]] = {}
        for state in states:
            for replica_id, count, ok in state["replicas"]:
                before, was_ok = replicas.get(replica_id, (0, False))
                replicas[replica_id] = (before + count, was_ok or bool(ok))
        depth = sum(state["queue_depth"] for state in states)
        merged = cls(lambda: [(r, n, ok) for r, (n, ok) in sorted(replicas.items())], lambda: depth)
        for state in states:
            for route, model, replica, status, value in state["requests"]:
                key = (route, model, replica, status)
                merged.requests[key] = merged.requests.get(key, 0) + value
            for target, rows in ((merged.ttft, state["ttft"]), (merged.e2e, state["e2e"])):
                for route, model, counts, total in rows:
                    target.setdefault((route, model), Histogram()).add(counts, total)
            for model, reason, value in state["retries"]:
                merged.retries[(model, reason)] = merged.retries.get((model, reason), 0) + value
            _add_counts(merged.ejections, state["ejections"])
            for policy, outcome, value in state["decisions"]:
                key2 = (policy, outcome)
                merged.decisions[key2] = merged.decisions.get(key2, 0) + value
            merged.queue_waits.add(*state["queue_waits"])
            _add_counts(merged.queue_rejections, state["queue_rejections"])
        return merged

    def snapshot(self) -> MetricsSnapshot:
        """Totals for the admin stats endpoint."""
        by_status: dict[str, int] = {}
        for (_route, _model, _replica, status), value in list(self.requests.items()):
            by_status[status] = by_status.get(status, 0) + value
        return {
            "requests": sum(by_status.values()),
            "requests_by_status": by_status,
            "retries": sum(self.retries.values()),
            "ejections": dict(self.ejections),
            "policy_decisions": {f"{p}:{o}": v for (p, o), v in self.decisions.items()},
            "queue": self.queue_snapshot(),
        }

    def queue_snapshot(self) -> QueueSnapshot:
        waits = self.queue_waits
        waited = sum(waits.counts)
        return {
            "depth": self._queue_depth(),
            "waited": waited,
            "mean_wait_s": round(waits.sum / waited, 4) if waited else 0.0,
            "rejections": dict(self.queue_rejections),
        }


def _add_counts(into: dict[str, int], counts: dict[str, int]) -> None:
    for name, value in counts.items():
        into[name] = into.get(name, 0) + value
