"""The fleet as the dashboard shows it: one JSON-ready dict per poll, from the router's live
objects, the history's samples and (when the fleet has a key store) the keys' usage in Redis."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, TypedDict

from fleet.control.keys import KeyNotFound, KeyRecord, KeyStore, KeyUsage
from fleet.control.redis_conn import REDIS_DOWN_ERRORS
from router.backends.backend import Replica
from router.dashboard.history import FleetHistory

if TYPE_CHECKING:
    from router.app import RouterApp

MAX_KEYS = 100  # the page lists this many keys, newest first
MAX_EVENTS_SHOWN = 50
KEYS_TTL_S = 2.0  # several open pages share one Redis read
KEYS_TIMEOUT_S = 2.0


class ReplicaRow(TypedDict):
    id: str
    model: str | None
    engine: str
    source: str
    state: str
    admin_drained: bool
    breaker: str
    in_flight: int
    running: int
    waiting: int
    kv_usage: float
    prefix_hit_rate: float | None
    requests: int
    failures: int
    tokens_per_s: float
    restarts: int
    ejections: int


class QueueTotals(TypedDict):
    in_flight: int
    running: int
    waiting: int
    queued: int


class RouterRow(TypedDict):
    policy: str
    uptime_s: float
    auth: str
    models: list[str]
    requests: int
    requests_by_status: dict[str, int]
    requests_per_s: float
    errors_per_s: float
    retries: int
    retry_budget: float
    routing: dict[str, int]
    queue: QueueTotals


class Series(TypedDict):
    t: list[float]
    ttft_p50_ms: list[float | None]
    ttft_p99_ms: list[float | None]
    requests_per_s: list[float]
    errors_per_s: list[float]
    tokens_per_s: dict[str, list[float | None]]


class Use(TypedDict):
    used: int
    limit: int | None


class KeyRow(TypedDict):
    id: str
    name: str
    status: str
    models: list[str]
    expires_at: float | None
    rpm: Use
    tpm: Use
    concurrent: Use
    requests: int
    tokens: int
    last_used_at: float | None


class KeysPage(TypedDict):
    mode: str  # keystore, static or none
    static_keys: int
    data: list[KeyRow]
    error: str | None


def replica_view(replica: Replica, history: FleetHistory, now: float) -> ReplicaRow:
    load = replica.load
    hit_rate = (
        load.prefix_cache_hits / load.prefix_cache_queries if load.prefix_cache_queries else None
    )
    if replica.draining:
        state = "draining"
    elif not replica.healthy:
        state = "unhealthy"
    elif replica.breaker.state == "open":
        state = "ejected"
    else:
        state = "ready" if replica.routable(now) else "unavailable"
    return {
        "id": replica.id,
        "model": replica.model,
        "engine": replica.engine,
        "source": replica.source,
        "state": state,
        "admin_drained": replica.admin_drained,
        "breaker": replica.breaker.state,
        "in_flight": replica.in_flight,
        "running": load.running,
        "waiting": load.waiting,
        "kv_usage": load.kv_usage,
        "prefix_hit_rate": hit_rate,
        "requests": replica.requests,
        "failures": replica.failures,
        "tokens_per_s": round(history.tokens_per_s(replica.id), 2),
        "restarts": history.restarts.get(replica.id, 0),
        "ejections": replica.breaker.ejections,
    }


def router_view(app: RouterApp, history: FleetHistory) -> RouterRow:
    replicas = list(app.pool.replicas.values())
    stats = app.metrics.snapshot()
    latest = history.latest()
    return {
        "policy": app.policy.name,
        "uptime_s": round(time.time() - app.started_at, 1),
        "auth": "open" if app.gate.open else ("keystore" if app.key_store else "static keys"),
        "models": sorted(app.pool.models()),
        "requests": stats["requests"],
        "requests_by_status": stats["requests_by_status"],
        "requests_per_s": round(latest.requests_per_s, 2) if latest else 0.0,
        "errors_per_s": round(latest.errors_per_s, 2) if latest else 0.0,
        "retries": stats["retries"],
        "retry_budget": round(app.proxy.budget.tokens, 2),
        "routing": stats["policy_decisions"],
        "queue": {
            "in_flight": sum(r.in_flight for r in replicas),
            "running": sum(r.load.running for r in replicas),
            "waiting": sum(r.load.waiting for r in replicas),
            "queued": stats["queue"]["depth"],  # in the router's own queue (router.queueing)
        },
    }


def series_view(history: FleetHistory) -> Series:
    """Column-wise, as the page's plots take them; a replica's missing samples are null."""
    samples = list(history.samples)
    replica_ids = sorted({rid for s in samples for rid in s.tokens_per_s})
    return {
        "t": [round(s.t, 3) for s in samples],
        "ttft_p50_ms": [s.ttft_p50_ms for s in samples],
        "ttft_p99_ms": [s.ttft_p99_ms for s in samples],
        "requests_per_s": [round(s.requests_per_s, 3) for s in samples],
        "errors_per_s": [round(s.errors_per_s, 3) for s in samples],
        "tokens_per_s": {
            rid: [_round(s.tokens_per_s.get(rid)) for s in samples] for rid in replica_ids
        },
    }


def events_view(history: FleetHistory) -> list[dict[str, object]]:
    return [asdict(e) for e in reversed(list(history.events)[-MAX_EVENTS_SHOWN:])]


class KeysView:
    """API keys with their usage against their limits, read from Redis at most every KEYS_TTL_S."""

    def __init__(self, store: KeyStore | None, static_keys: int) -> None:
        self.store = store
        self.static_keys = static_keys
        self._cached: KeysPage | None = None
        self._cached_at = 0.0
        self._lock = asyncio.Lock()

    def forget(self) -> None:
        self._cached = None

    async def view(self) -> KeysPage:
        if self.store is None:
            return {"mode": "static" if self.static_keys else "none",
                    "static_keys": self.static_keys, "data": [], "error": None}  # fmt: skip
        async with self._lock:
            if self._cached is None or time.monotonic() - self._cached_at > KEYS_TTL_S:
                self._cached = await self._read(self.store)
                self._cached_at = time.monotonic()
            return self._cached

    async def _read(self, store: KeyStore) -> KeysPage:
        try:
            pairs = await asyncio.wait_for(_keys_with_usage(store), KEYS_TIMEOUT_S)
        except REDIS_DOWN_ERRORS:
            return {"mode": "keystore", "static_keys": 0, "data": [],
                    "error": "The control plane (Redis) is unreachable."}  # fmt: skip
        return {
            "mode": "keystore",
            "static_keys": 0,
            "data": [key_view(record, usage) for record, usage in pairs],
            "error": None,
        }


async def _keys_with_usage(store: KeyStore) -> list[tuple[KeyRecord, KeyUsage]]:
    """The newest keys with their usage; a key deleted meanwhile is left out."""
    records = (await store.admin.list())[-MAX_KEYS:][::-1]
    usages = await asyncio.gather(
        *(store.admin.usage(r.id) for r in records), return_exceptions=True
    )
    pairs = []
    for record, usage in zip(records, usages, strict=True):
        if isinstance(usage, KeyNotFound):
            continue
        if isinstance(usage, BaseException):
            raise usage
        pairs.append((record, usage))
    return pairs


def key_view(record: KeyRecord, usage: KeyUsage) -> KeyRow:
    return {
        "id": record.id,
        "name": record.name,
        "status": record.status(),
        "models": list(record.models),
        "expires_at": record.expires_at,
        "rpm": {"used": usage.window_requests, "limit": record.rpm},
        "tpm": {"used": usage.window_tokens, "limit": record.tpm},
        "concurrent": {"used": usage.concurrent, "limit": record.max_concurrent},
        "requests": usage.requests,
        "tokens": usage.total_tokens,
        "last_used_at": usage.last_used_at,
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
