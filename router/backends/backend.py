"""What the router knows about one backend replica: where it is, what it serves, how busy and
healthy it is.

The module is `backend` so that it is not mistaken for the `replica` package (the engine); the
class keeps the name `Replica`, the word the admin API, the metrics' labels, pinned routes
(`/replicas/{id}/...`) and the fleet's membership all use for the same thing.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import TypedDict
from urllib.parse import urlsplit

from router.backends.breaker import CircuitBreaker

DEFAULT_KV_CAPACITY_TOKENS = 65536
TASKS = ("generate", "embed")  # what a replica's engine does (`--task`)


@dataclass
class LoadReport:
    """The replica's own view of its load, polled from `/load` or parsed from vLLM's `/metrics`."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    kv_capacity_tokens: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    generation_tokens: int = 0  # generated since the replica started (the dashboard's tokens/s)
    updated_at: float = 0.0


class LoadView(TypedDict):
    running: int
    waiting: int
    kv_usage: float
    kv_capacity_tokens: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    age_s: float | None  # since the last load report; None before the first


class _PolicyView(TypedDict, total=False):
    prefix_index_chunks: int  # added by the admin API when the routing policy indexes prefixes
    kv_exact_blocks: int | None  # blocks in its exact index (KV events); None: out of sync


class ReplicaView(_PolicyView):
    """The admin API's JSON for one replica."""

    id: str
    url: str
    model: str | None
    engine: str
    task: str | None  # "generate", "embed", or None (an engine registered by hand: either)
    source: str
    state: str
    admin_drained: bool
    healthy: bool
    routable: bool
    breaker: str
    ejections: int
    in_flight: int
    pending_prefill_tokens: int
    requests: int
    failures: int
    load: LoadView


@dataclass(eq=False)
class Replica:
    id: str
    url: str
    model: str | None = None
    engine: str = "fleetserve"
    source: str = "static"
    # generate or embed, as the replica says (membership, or its /v1/models card); None where
    # unknown (engines registered by hand, `--replica` URLs that do not say): either task.
    task: str | None = None
    max_model_len: int | None = None
    kv_capacity_tokens: int | None = None
    state: str = "ready"
    admin_drained: bool = False
    healthy: bool = True
    probe_failures: int = 0
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    load: LoadReport = field(default_factory=LoadReport)
    in_flight: int = 0
    pending_prefill: int = 0
    requests: int = 0
    failures: int = 0
    # The bearer key this replica gets (fleet.control.internal): our own replicas' per-replica
    # key, a `--replica`'s static upstream key, or None (engines registered by hand).
    api_key: str | None = field(default=None, repr=False)
    id_header: bytes = field(init=False, repr=False)
    host: str = field(init=False, repr=False)
    port: int = field(init=False, repr=False)
    tls: bool = field(init=False, repr=False)
    host_header: bytes = field(init=False, repr=False)
    request_host: bytes = field(init=False, repr=False)
    base_path: str = field(init=False, repr=False)
    salt: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        self.id_header = self.id.encode()
        # The same in every router process (unlike hash()), for placements routers agree on.
        self.salt = int.from_bytes(hashlib.blake2b(self.id_header, digest_size=8).digest(), "big")
        parts = urlsplit(self.url)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.tls else 80)
        self.host_header = parts.netloc.encode("idna")
        self.request_host = self.host_header + _auth_line(self.api_key)
        self.base_path = parts.path

    @property
    def probe_headers(self) -> dict[str, str]:
        """The same key on probes (a replica may keep /load, /metrics and /v1/models private)."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def draining(self) -> bool:
        return self.admin_drained or self.state == "draining"

    def routable(self, now: float) -> bool:
        """Can take a new request: known model, healthy, not draining, breaker closed or trial."""
        return (
            self.model is not None
            and self.healthy
            and not self.draining
            and self.breaker.admits(now)
        )

    def serves(self, task: str | None) -> bool:
        """Whether requests of `task` may go here (None: any request, e.g. /tokenize)."""
        return task is None or self.task is None or self.task == task

    def queue_depth(self) -> int:
        """Requests ahead of a new one: ours, or the replica's own count when other routers add more."""
        return max(self.in_flight, self.load.running + self.load.waiting)

    def capacity_tokens(self) -> int:
        return self.kv_capacity_tokens or self.load.kv_capacity_tokens or DEFAULT_KV_CAPACITY_TOKENS

    def describe(self) -> ReplicaView:
        """The admin API's view of this replica."""
        now = time.monotonic()
        return {
            "id": self.id,
            "url": self.url,
            "model": self.model,
            "engine": self.engine,
            "task": self.task,
            "source": self.source,
            "state": "draining" if self.draining else self.state,
            "admin_drained": self.admin_drained,
            "healthy": self.healthy,
            "routable": self.routable(now),
            "breaker": self.breaker.state,
            "ejections": self.breaker.ejections,
            "in_flight": self.in_flight,
            "pending_prefill_tokens": self.pending_prefill,
            "requests": self.requests,
            "failures": self.failures,
            "load": {
                "running": self.load.running,
                "waiting": self.load.waiting,
                "kv_usage": self.load.kv_usage,
                "kv_capacity_tokens": self.capacity_tokens(),
                "prefix_cache_queries": self.load.prefix_cache_queries,
                "prefix_cache_hits": self.load.prefix_cache_hits,
                "age_s": round(now - self.load.updated_at, 3) if self.load.updated_at else None,
            },
        }


def _auth_line(api_key: str | None) -> bytes:
    """What follows the Host header's value in each request to this replica: its own key, so
    the upstream client builds one head per replica without a per-request header list."""
    if not api_key:
        return b""
    if any(c in api_key for c in "\r\n\0"):
        raise ValueError("an upstream API key cannot hold line breaks")
    return b"\r\nAuthorization: Bearer " + api_key.encode("latin-1")
