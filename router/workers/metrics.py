"""One worker's metrics, answered for the whole router: whichever worker the kernel hands a scrape
(or the admin stats, or the dashboard's poll) adds its own live counters to the other workers'
last files (router.workers.shared, written every FLUSH_S) and to those of workers that exited.

Why not prometheus_client's multiprocess mode: it counts through its own metric objects (a lock
and a label lookup per call, the cost router.metrics avoids on the data path) and memory-mapped
files per process. Here the data path is unchanged; a worker serialises its few dicts once a
second, and a scrape reads N small files. The other workers' figures are up to FLUSH_S old.

Per worker, for the operator (and the benchmark) to see how evenly the kernel spreads the work:
  fleet_router_worker_requests_total{worker}      requests it finished
  fleet_router_worker_connections_total{worker}   connections it accepted
  fleet_router_worker_cpu_seconds_total{worker}   its CPU time (user + system)
  fleet_router_worker_pid{worker}                 its process id
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from router.metrics import MetricsSnapshot, RouterMetrics
from router.workers.shared import SharedFolder, WorkerSlot, WorkerState

FLUSH_S = 1.0


class WorkerMetrics(RouterMetrics):
    def __init__(
        self,
        slot: WorkerSlot,
        replica_gauges: Callable[[], list[tuple[str, int, bool]]] = list,
        queue_depth: Callable[[], int] = lambda: 0,
    ) -> None:
        super().__init__(replica_gauges, queue_depth)
        self.slot = slot
        self.folder = SharedFolder(slot.folder)
        self.connections: Callable[[], int] = lambda: 0  # the HTTP server's, once it exists
        self._workers = CollectorRegistry(auto_describe=False)
        self._workers.register(_PerWorker(self))

    def worker_state(self) -> WorkerState:
        times = os.times()
        return {
            "index": self.slot.index,
            "pid": os.getpid(),
            "connections": self.connections(),
            "cpu_s": times.user + times.system,
            "metrics": self.state(),
        }

    def flush(self) -> None:
        self.folder.write_worker(self.worker_state())

    def all_workers(self) -> list[WorkerState]:
        """This worker now, and the others as they last wrote."""
        return [self.worker_state(), *self.folder.workers(skip=self.slot.index)]

    def fleet_view(self) -> RouterMetrics:
        states = [worker["metrics"] for worker in self.all_workers()]
        exited = self.folder.exited()
        if exited is not None:
            states.append(exited)
        return RouterMetrics.merged(states)

    def exposition(self) -> bytes:
        return (
            generate_latest(self.fleet_view().registry)
            + generate_latest(self._workers)
            + generate_latest(REGISTRY)
        )

    def snapshot(self) -> MetricsSnapshot:
        return self.fleet_view().snapshot()


class _PerWorker:
    """The per-worker families (see the module's docstring)."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "fleet_router_worker_requests", "Requests each worker finished", labels=["worker"]
        )
        connections = CounterMetricFamily(
            "fleet_router_worker_connections",
            "Client connections each worker accepted",
            labels=["worker"],
        )
        cpu = CounterMetricFamily(
            "fleet_router_worker_cpu_seconds", "CPU time of each worker", labels=["worker"]
        )
        pid = GaugeMetricFamily(
            "fleet_router_worker_pid", "Each worker's process id", labels=["worker"]
        )
        for state in sorted(self.metrics.all_workers(), key=lambda s: s["index"]):
            worker = [str(state["index"])]
            served = sum(row[-1] for row in state["metrics"]["requests"])
            requests.add_metric(worker, served)
            connections.add_metric(worker, state["connections"])
            cpu.add_metric(worker, state["cpu_s"])
            pid.add_metric(worker, state["pid"])
        yield from (requests, connections, cpu, pid)
