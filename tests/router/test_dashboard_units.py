"""The dashboard's history without processes: quantiles from histogram deltas, tokens/s from
load reports, events and restarts from consecutive samples, and memory that stays bounded."""

from __future__ import annotations

import time

import pytest

from router.backends.backend import LoadReport
from router.backends.load_signals import from_load_json, from_prometheus_text
from router.backends.pool import ReplicaPool
from router.dashboard.history import FleetHistory, quantile
from router.metrics import LATENCY_BUCKETS, RouterMetrics


def history(replicas: int = 2, **kwargs) -> FleetHistory:
    pool = ReplicaPool([f"r{i}=http://127.0.0.1:{9000 + i}" for i in range(replicas)])
    return FleetHistory(pool, RouterMetrics(pool.gauges), **kwargs)


def test_quantiles_interpolate_within_buckets_like_prometheus() -> None:
    counts = [0] * (len(LATENCY_BUCKETS) + 1)
    assert quantile(0.5, counts) is None
    i = LATENCY_BUCKETS.index(0.1)
    counts[i] = 100  # all in (0.05, 0.1]
    assert quantile(0.5, counts) == pytest.approx(0.075)
    assert quantile(0.99, counts) == pytest.approx(0.0995)
    counts[-1] = 1000  # beyond the last bound: that bound is all we know
    assert quantile(0.99, counts) == LATENCY_BUCKETS[-1]


def test_ttft_and_request_rates_come_from_the_metrics_deltas() -> None:
    h = history()
    h.sample(now=100.0)
    for _ in range(9):
        h.metrics.first_byte("chat", "m", 0.02)
        h.metrics.request_done("chat", "m", "r0", "200", 0.05)
    h.metrics.first_byte("chat", "m", 2.0)
    h.metrics.request_done("chat", "m", "r0", "503", 2.0)
    sample = h.sample(now=102.0)
    assert sample.requests_per_s == pytest.approx(5.0)
    assert sample.errors_per_s == pytest.approx(0.5)
    assert 10 < sample.ttft_p50_ms <= 25
    assert 1000 < sample.ttft_p99_ms <= 2500
    assert h.sample(now=103.0).requests_per_s == 0.0


def test_tokens_per_s_follow_the_replicas_own_counter() -> None:
    h = history(1)
    replica = h.pool.replicas["r0"]
    start = time.monotonic()
    replica.load = LoadReport(generation_tokens=1000, updated_at=start - 2)
    h.sample()
    replica.load = LoadReport(generation_tokens=1500, updated_at=start - 1)
    h.sample()
    assert h.tokens_per_s("r0") == pytest.approx(500)
    h.sample()  # no new report yet: the last rate stands
    assert h.tokens_per_s("r0") == pytest.approx(500)
    replica.load = LoadReport(generation_tokens=1500, updated_at=start - 10)
    h.sample()  # a stale report says nothing is generated now
    assert h.tokens_per_s("r0") == 0.0


def test_events_and_restarts_are_found_by_comparing_samples() -> None:
    h = history(2)
    h.sample()
    r0, r1 = h.pool.replicas["r0"], h.pool.replicas["r1"]
    r0.admin_drained = True
    r1.healthy = False
    h.sample()
    r1.healthy = True
    r0.load = LoadReport(prefix_cache_queries=50, updated_at=time.monotonic())
    h.sample()
    r0.load = LoadReport(prefix_cache_queries=10, updated_at=time.monotonic())  # counters reset
    del h.pool.replicas["r1"]
    h.sample()
    kinds = [(e.kind, e.subject) for e in h.events]
    assert kinds == [
        ("joined", "r0"),
        ("joined", "r1"),
        ("draining", "r0"),
        ("unhealthy", "r1"),
        ("restarted", "r1"),
        ("left", "r1"),
        ("restarted", "r0"),
    ]
    assert h.restarts == {"r0": 1, "r1": 1}


def test_memory_is_bounded() -> None:
    h = history(1, interval_s=1.0, history_s=10.0)
    for i in range(500):
        h.sample(now=1000.0 + i)
        h.record("admin", "r0", f"event {i}")
    assert len(h.samples) == 10
    assert len(h.events) == h.events.maxlen


def test_load_reports_carry_the_generated_token_counter() -> None:
    assert from_load_json({"generation_tokens": 42}).generation_tokens == 42
    assert from_load_json({}).generation_tokens == 0
    text = (
        'vllm:generation_tokens_total{model_name="m",engine="0"} 10.0\n'
        'vllm:generation_tokens_total{model_name="m",engine="1"} 5.0\n'
        'sglang:generation_tokens_total{model_name="m"} 7.0\n'
    )
    assert from_prometheus_text(text).generation_tokens == 22
