"""The dashboard's memory: one sample of the fleet a second for the last minutes (the plots), and
the fleet's recent events, found by comparing each sample with the one before.

It runs on a timer and reads only what the router keeps anyway (the pool's replicas, their load
reports, the metrics' counters and histograms), so proxied requests pay nothing for it. Memory is
bounded: fixed-length deques, and one small record per replica.

A restart is what this router can see of one: a replica back after failing its health probes, one
that re-joined at a new address, or one whose own counters went backwards between two reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from router.backends.backend import Replica
from router.backends.pool import ReplicaPool
from router.metrics import LATENCY_BUCKETS, RouterMetrics

log = logging.getLogger("router.dashboard")

INTERVAL_S = 1.0
HISTORY_S = 300.0
TTFT_WINDOW = 5  # samples: a second often holds too few first bytes for a p99
STALE_LOAD_S = 5.0  # a load report older than this says nothing about tokens/s now
MAX_EVENTS = 200


@dataclass(frozen=True)
class Sample:
    t: float  # unix seconds
    ttft_p50_ms: float | None  # None: no first byte in the window
    ttft_p99_ms: float | None
    requests_per_s: float
    errors_per_s: float
    tokens_per_s: dict[str, float]  # replica id -> generated tokens per second


@dataclass(frozen=True)
class Event:
    t: float
    kind: str  # joined, left, draining, undrained, unhealthy, healthy, ejected, restarted, ...
    subject: str  # a replica id or key id
    text: str


@dataclass
class _Seen:
    """What the previous sample saw of one replica."""

    replica: Replica
    healthy: bool
    draining: bool
    breaker: str
    generation_tokens: int
    prefix_queries: int
    load_at: float
    tokens_per_s: float = 0.0


@dataclass
class _Totals:
    requests: int = 0
    errors: int = 0
    ttft: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))


class FleetHistory:
    def __init__(
        self,
        pool: ReplicaPool,
        metrics: RouterMetrics,
        *,
        interval_s: float = INTERVAL_S,
        history_s: float = HISTORY_S,
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.interval_s = interval_s
        self.samples: deque[Sample] = deque(maxlen=max(int(history_s / interval_s), 2))
        self.events: deque[Event] = deque(maxlen=MAX_EVENTS)
        self.restarts: dict[str, int] = {}
        self._seen: dict[str, _Seen] = {}
        self._totals: deque[tuple[float, _Totals]] = deque(maxlen=TTFT_WINDOW + 1)
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle

    def start(self) -> None:
        self.sample()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="dashboard-history")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.sample()
            except Exception:
                log.exception("dashboard sample failed")

    # -- what the page reads

    def record(self, kind: str, subject: str, text: str) -> None:
        self.events.append(Event(time.time(), kind, subject, text))

    def tokens_per_s(self, replica_id: str) -> float:
        seen = self._seen.get(replica_id)
        return seen.tokens_per_s if seen is not None else 0.0

    def latest(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    # -- sampling

    def sample(self, now: float | None = None) -> Sample:
        now = time.time() if now is None else now
        mono = time.monotonic()
        self._diff_replicas(now, mono)
        totals = self._read_totals()
        self._totals.append((now, totals))
        first = self._totals[0][1]
        prev_t, prev = self._totals[-2] if len(self._totals) > 1 else self._totals[0]
        window = [b - a for a, b in zip(first.ttft, totals.ttft, strict=True)]
        dt = now - prev_t
        sample = Sample(
            t=now,
            ttft_p50_ms=_ms(quantile(0.5, window)),
            ttft_p99_ms=_ms(quantile(0.99, window)),
            requests_per_s=_rate(totals.requests - prev.requests, dt),
            errors_per_s=_rate(totals.errors - prev.errors, dt),
            tokens_per_s={rid: seen.tokens_per_s for rid, seen in self._seen.items()},
        )
        self.samples.append(sample)
        return sample

    def _read_totals(self) -> _Totals:
        totals = _Totals()
        metrics = self.metrics.fleet_view()  # every worker's, when the router has several
        for (_route, _model, _replica, status), count in list(metrics.requests.items()):
            totals.requests += count
            if not status.startswith(("2", "3")):
                totals.errors += count
        for hist in list(metrics.ttft.values()):
            for i, count in enumerate(hist.counts):
                totals.ttft[i] += count
        return totals

    def _diff_replicas(self, now: float, mono: float) -> None:
        current = dict(self.pool.replicas)
        for replica_id in [rid for rid in self._seen if rid not in current]:
            del self._seen[replica_id]
            self.record("left", replica_id, f"{replica_id} left the fleet")
        for replica_id, replica in current.items():
            before = self._seen.get(replica_id)
            seen = _Seen(
                replica,
                replica.healthy,
                replica.draining,
                replica.breaker.state,
                replica.load.generation_tokens,
                replica.load.prefix_cache_queries,
                replica.load.updated_at,
            )
            if before is None:
                self.restarts.setdefault(replica_id, 0)
                self.record("joined", replica_id, f"{replica_id} joined ({replica.url})")
            else:
                self._compare(before, seen)
                seen.tokens_per_s = _tokens_per_s(before, seen, mono)
            self._seen[replica_id] = seen

    def _compare(self, before: _Seen, now: _Seen) -> None:
        rid = now.replica.id
        restarted = (
            before.replica is not now.replica
            or (not before.healthy and now.healthy)
            or now.generation_tokens < before.generation_tokens
            or now.prefix_queries < before.prefix_queries
        )
        if restarted:
            self.restarts[rid] = self.restarts.get(rid, 0) + 1
            self.record("restarted", rid, f"{rid} is back (restart #{self.restarts[rid]})")
        elif before.healthy and not now.healthy:
            self.record("unhealthy", rid, f"{rid} failed its health probes")
        if now.draining != before.draining:
            if now.draining:
                self.record("draining", rid, f"{rid} is draining: no new requests")
            else:
                self.record("undrained", rid, f"{rid} takes requests again")
        if now.breaker != before.breaker:
            if now.breaker == "open":
                self.record("ejected", rid, f"{rid} ejected by the circuit breaker")
            elif before.breaker == "open":
                self.record("breaker", rid, f"{rid} on trial after its ejection")


def quantile(q: float, counts: list[int]) -> float | None:
    """The q-quantile of a histogram's per-bucket counts (LATENCY_BUCKETS plus +Inf), linear
    within a bucket as Prometheus' histogram_quantile; None for no observations."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen, lower = 0, 0.0
    for bound, count in zip(LATENCY_BUCKETS, counts, strict=False):
        if count and seen + count >= rank:
            return lower + (bound - lower) * (rank - seen) / count
        seen += count
        lower = bound
    return lower  # in the +Inf bucket: the largest finite bound is all we know


def _tokens_per_s(before: _Seen, now: _Seen, mono: float) -> float:
    """From the replica's own generated-token counter, between its last two load reports."""
    if mono - now.load_at > STALE_LOAD_S or now.generation_tokens < before.generation_tokens:
        return 0.0
    if now.load_at <= before.load_at:
        return before.tokens_per_s
    return (now.generation_tokens - before.generation_tokens) / (now.load_at - before.load_at)


def _rate(delta: int, dt: float) -> float:
    return delta / dt if dt > 0 and delta > 0 else 0.0


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
