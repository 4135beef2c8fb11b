"""The replicas the router may use: from `--replica` URLs and/or the fleet's Redis membership,
kept honest by active probes (`/health`, plus `/load` or vLLM's `/metrics` for load) and by the
circuit breaker that real requests feed (see breaker.py).

Probes use httpx (control path); the data path never waits on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import orjson

from fleet.control.errors import APIError
from fleet.control.internal import replica_key
from fleet.control.membership import MembershipEvent, MembershipWatcher, ReplicaInfo
from fleet.web_security import client_context
from router.backends.backend import TASKS, Replica
from router.backends.breaker import CircuitBreaker
from router.backends.load_signals import from_load_json, from_prometheus_text

log = logging.getLogger("router.backends.pool")


@dataclass
class PoolSettings:
    probe_interval_s: float = 1.0
    load_interval_s: float = 1.0
    probe_timeout_s: float = 1.0
    unhealthy_after: int = 2
    breaker_threshold: int = 3
    breaker_base_s: float = 1.0
    breaker_max_s: float = 30.0
    ca_certs: str | None = None  # CA bundle trusted for https:// replicas (None: the system's)


def static_replica_id(spec: str) -> tuple[str, str]:
    """`[ID=]URL` -> (id, url); without an id, the URL's host and port name the replica."""
    head, sep, tail = spec.partition("=")
    if sep and "://" not in head:
        return head, tail
    parts = urlsplit(spec)
    return f"{parts.hostname}-{parts.port or (443 if parts.scheme == 'https' else 80)}", spec


class ReplicaPool:
    def __init__(
        self,
        static: list[str],
        settings: PoolSettings | None = None,
        watcher: MembershipWatcher | None = None,
        on_eject: Callable[[Replica], None] = lambda replica: None,
        on_leave: Callable[[Replica], None] = lambda replica: None,
        on_change: Callable[[], None] = lambda: None,
        *,
        internal_secret: str | None = None,
        static_key: str | None = None,
    ) -> None:
        """`internal_secret` keys the fleet's own replicas (one key each, see
        fleet.control.internal); `static_key` goes to `--replica` URLs only. `on_change` hears
        that a replica may have become able to take requests (probes, loads, membership, drains)."""
        self.settings = settings or PoolSettings()
        self._internal_secret = internal_secret
        self.tls = client_context(self.settings.ca_certs)  # probes and the data path share it
        self.replicas: dict[str, Replica] = {}
        # Every name a request may use (each replica's model and its aliases) -> its replicas.
        self.by_model: dict[str, list[Replica]] = {}
        # The same for each task: the replicas that serve it (Replica.serves), so that a pick
        # filters nothing per request.
        self.by_task: dict[str, dict[str, list[Replica]]] = {task: {} for task in TASKS}
        self.aliases: dict[str, tuple[str, ...]] = {}  # replica id -> names beyond its model
        self._watcher = watcher
        # Tells this router's other workers of a drain that only this router records.
        self.share_drain: Callable[[str, bool], None] | None = None
        self._on_eject = on_eject
        self._on_leave = on_leave
        self._on_change = on_change
        self._client: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._uses_metrics: set[str] = set()
        for spec in static:
            replica_id, url = static_replica_id(spec)
            self._add(Replica(replica_id, url, breaker=self._new_breaker(), api_key=static_key))

    def _new_breaker(self) -> CircuitBreaker:
        s = self.settings
        return CircuitBreaker(s.breaker_threshold, s.breaker_base_s, s.breaker_max_s)

    # -- lifecycle

    async def start(self) -> None:
        self._client = httpx.AsyncClient(
            timeout=self.settings.probe_timeout_s, verify=self.tls or True
        )
        if self._watcher is not None:
            self._watcher.add_listener(self._on_membership)
            await self._watcher.start()
            for info in self._watcher.replicas.values():
                self._on_membership(MembershipEvent("join", info))
        await self.probe_all()
        self._tasks = [
            asyncio.create_task(self._every(self.settings.probe_interval_s, self.probe_all)),
            asyncio.create_task(self._every(self.settings.load_interval_s, self.poll_loads)),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._watcher is not None:
            await self._watcher.stop()
        if self._client is not None:
            await self._client.aclose()

    async def _every(self, interval: float, job: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await job()
            except Exception:
                log.exception("replica pool background job failed")

    # -- membership

    def _on_membership(self, event: MembershipEvent) -> None:
        self._apply_membership(event)
        self._on_change()

    def _apply_membership(self, event: MembershipEvent) -> None:
        info = event.replica
        if event.kind == "leave":
            replica = self.replicas.get(info.id)
            if replica is not None and replica.source == "redis":
                self._remove(replica)
            return
        replica = self.replicas.get(info.id)
        if replica is None or replica.url != info.url.rstrip("/"):
            if replica is not None:
                self._remove(replica)
            replica = Replica(
                info.id, info.url, source="redis", breaker=self._new_breaker(),
                api_key=self._key_for(info),
            )  # fmt: skip
            self._apply_info(replica, info)
            self._add(replica)
        else:
            before = (replica.model, self.aliases.get(replica.id, ()), replica.task)
            self._apply_info(replica, info)
            if before != (replica.model, self.aliases.get(replica.id, ()), replica.task):
                self._reindex()

    def _key_for(self, info: ReplicaInfo) -> str | None:
        """Our own replicas (leased fleetserve servers) get the key of their id; engines
        registered by hand get none."""
        if self._internal_secret and info.managed == "lease" and info.engine == "fleetserve":
            return replica_key(self._internal_secret, info.id)
        return None

    def _apply_info(self, replica: Replica, info: ReplicaInfo) -> None:
        replica.model = info.model
        self._set_aliases(replica, info.aliases if isinstance(info.aliases, list) else [])
        replica.engine = info.engine
        replica.task = _task_of(info)
        replica.state = info.state
        replica.admin_drained = info.admin_drained
        replica.max_model_len = info.max_model_len or None
        replica.kv_capacity_tokens = info.kv_capacity_tokens

    async def set_drained(self, replica: Replica, drained: bool) -> str:
        """An operator's drain: fleet-wide (through membership) for replicas that came from it,
        this router only for `--replica` ones. Returns the scope: "fleet" or "router"."""
        replica.admin_drained = drained
        self._on_change()
        if replica.source != "redis" or self._watcher is None:
            if self.share_drain is not None:  # this router's other workers (router.workers)
                self.share_drain(replica.id, drained)
            return "router"
        if not await self._watcher.set_admin_drained(replica.id, drained):
            raise APIError(
                503,
                "The control plane is unavailable: the drain was not recorded. Retry shortly.",
                code="control_plane_unavailable",
                headers={"Retry-After": "1"},
            )
        return "fleet"

    def apply_router_drains(self, drained: set[str]) -> None:
        """The router's drains of replicas not in membership, as another worker recorded them."""
        changed = False
        for replica in self.replicas.values():
            if replica.source != "redis" or self._watcher is None:
                wanted = replica.id in drained
                changed |= replica.admin_drained != wanted
                replica.admin_drained = wanted
        if changed:
            self._on_change()

    def _add(self, replica: Replica) -> None:
        self.replicas[replica.id] = replica
        self._reindex()

    def _remove(self, replica: Replica) -> None:
        del self.replicas[replica.id]
        self.aliases.pop(replica.id, None)
        self._reindex()
        self._on_leave(replica)

    def _reindex(self) -> None:
        by_model: dict[str, list[Replica]] = {}
        by_task: dict[str, dict[str, list[Replica]]] = {task: {} for task in TASKS}
        for replica in sorted(self.replicas.values(), key=lambda r: r.id):
            for name in self.names_of(replica):
                by_model.setdefault(name, []).append(replica)
                for task, index in by_task.items():
                    if replica.serves(task):
                        index.setdefault(name, []).append(replica)
        self.by_model = by_model
        self.by_task = by_task

    def _set_aliases(self, replica: Replica, aliases: Sequence[object]) -> None:
        names = [a for a in aliases if isinstance(a, str) and a and a != replica.model]
        self.aliases[replica.id] = tuple(dict.fromkeys(names))

    def names_of(self, replica: Replica) -> tuple[str, ...]:
        """The names requests may use for this replica: its model first, then its aliases."""
        if replica.model is None:
            return ()
        return (replica.model, *self.aliases.get(replica.id, ()))

    # -- queries

    def routable(
        self, model: str, exclude: tuple[str, ...] = (), task: str | None = None
    ) -> list[Replica]:
        """Replicas that may take a request (of `task`, when given) now, except those with ids
        in `exclude`."""
        now = time.monotonic()
        index = self.by_model if task is None else self.by_task[task]
        return [r for r in index.get(model, ()) if r.routable(now) and r.id not in exclude]

    def models(self) -> dict[str, int | None]:
        """Models with at least one replica that is not draining, with their context length."""
        out: dict[str, int | None] = {}
        for model, replicas in self.by_model.items():
            lengths = [r.max_model_len for r in replicas if not r.draining]
            if lengths:
                known = [n for n in lengths if n]
                out[model] = min(known) if known else None
        return out

    def only_model(self) -> str | None:
        """The model, when every replica serves the same one (under whatever names)."""
        models = {r.model for r in self.replicas.values() if r.model is not None}
        return models.pop() if len(models) == 1 else None

    # -- passive health (fed by the proxy)

    def succeeded(self, replica: Replica) -> None:
        if replica.breaker.state != "closed" or replica.breaker.failures:
            replica.breaker.succeeded()

    def failed(self, replica: Replica) -> None:
        replica.failures += 1
        if replica.breaker.failed():
            log.warning(
                "ejected replica %s for %.1f s after %d failures",
                replica.id,
                replica.breaker.open_until - time.monotonic(),
                replica.breaker.failures,
            )
            self._on_eject(replica)

    # -- active probes

    async def probe_all(self) -> None:
        await asyncio.gather(*(self._probe(r) for r in list(self.replicas.values())))
        self._on_change()

    async def _probe(self, replica: Replica) -> None:
        assert self._client is not None
        try:
            response = await self._client.get(replica.url + "/health")
            ok = response.status_code == 200
            if ok and replica.model is None:
                await self._discover(replica)
        except (httpx.HTTPError, OSError, ValueError, KeyError, TypeError):
            ok = False
        if ok:
            if not replica.healthy:
                log.info("replica %s is healthy again", replica.id)
            replica.healthy = True
            replica.probe_failures = 0
        else:
            replica.probe_failures += 1
            if replica.healthy and replica.probe_failures >= self.settings.unhealthy_after:
                log.warning(
                    "replica %s failed %d health probes", replica.id, replica.probe_failures
                )
                replica.healthy = False

    async def _discover(self, replica: Replica) -> None:
        """A static replica's model and context length, from its own `/v1/models`."""
        assert self._client is not None
        response = await self._client.get(replica.url + "/v1/models", headers=replica.probe_headers)
        response.raise_for_status()
        cards = orjson.loads(response.content).get("data") or []
        if cards:
            replica.model = cards[0]["id"]
            replica.max_model_len = cards[0].get("max_model_len") or None
            task = cards[0].get("task")  # ours say; vLLM's and SGLang's do not
            replica.task = task if task in TASKS else None
            # Its other base-model cards are its other served names (LoRA adapters have a parent).
            self._set_aliases(replica, [c.get("id") for c in cards[1:] if not c.get("parent")])
            self._reindex()

    async def poll_loads(self) -> None:
        await asyncio.gather(
            *(self._poll_load(r) for r in list(self.replicas.values()) if r.healthy)
        )
        self._on_change()

    async def _poll_load(self, replica: Replica) -> None:
        assert self._client is not None
        try:
            if replica.id not in self._uses_metrics and replica.engine == "fleetserve":
                response = await self._client.get(
                    replica.url + "/load", headers=replica.probe_headers
                )
                if response.status_code == 200:
                    replica.load = from_load_json(orjson.loads(response.content))
                    return
                if response.status_code != 404:
                    return
                self._uses_metrics.add(replica.id)
            response = await self._client.get(
                replica.url + "/metrics", headers=replica.probe_headers
            )
            if response.status_code == 200:
                replica.load = from_prometheus_text(response.text)
        except (httpx.HTTPError, OSError, ValueError):
            return

    def gauges(self) -> list[tuple[str, int, bool]]:
        now = time.monotonic()
        return [(r.id, r.in_flight, r.routable(now)) for r in self.replicas.values()]


def _task_of(info: ReplicaInfo) -> str | None:
    """The replica's task; a leased record without one was written by a fleetserve replica from
    before embeddings, which only generated. Engines registered by hand stay unknown."""
    if info.task in TASKS:
        return info.task
    return "generate" if info.managed == "lease" and info.engine == "fleetserve" else None
