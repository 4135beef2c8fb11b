"""Every knob of one router process, with the defaults `python -m router` uses."""

from __future__ import annotations

from dataclasses import dataclass, field

from fleet.control.redis_conn import DEFAULT_PREFIX
from fleet.json_body import DEFAULT_MAX_BODY_BYTES
from fleet.web_security import CORSSettings, TLSSettings
from router.backends.pool import PoolSettings
from router.queueing.request_queue import QueueSettings
from router.workers.shared import WorkerSlot


@dataclass
class RouterConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    redis_url: str | None = None
    redis_prefix: str = DEFAULT_PREFIX
    policy: str = "prefix"
    replicas: list[str] = field(default_factory=list)
    admin_key: str | None = None
    api_keys: list[str] = field(default_factory=list)
    upstream_api_key: str | None = None  # for `--replica` URLs only
    internal_secret: str | None = None  # keys the fleet's own replicas (fleet.control.internal)
    fleet_keys: bool = True
    connect_timeout_s: float = 3.0
    ttfb_timeout_s: float = 300.0
    idle_timeout_s: float = 60.0
    max_attempts: int = 3
    retry_budget_ratio: float = 0.2
    retry_budget_min_per_s: float = 5.0
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_answer_bytes: int = 64 * 1024 * 1024
    metrics_key: str | None = None
    prefix_queue_weight: float = 64.0
    kv_events: bool = True  # exact prefix affinity where replicas publish KV events (Redis only)
    tokenizers: dict[str, str] = field(default_factory=dict)  # model -> tokenizer, for kv_events
    pool: PoolSettings = field(default_factory=PoolSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    max_connections: int = 10_000
    tls: TLSSettings | None = None  # HTTPS for clients
    cors: CORSSettings | None = None  # off unless origins are given
    otlp_endpoint: str | None = None  # export spans there (router.tracing); None: no tracing
    worker: WorkerSlot | None = None  # one of `--workers N` processes (router.workers)
