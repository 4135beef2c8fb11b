"""Fleet membership in Redis: which replicas exist, where, and whether they take new work.

Replica side: `MembershipLease` writes the replica's `ReplicaInfo` once it is healthy, refreshes
it by heartbeat (a replica that dies without deregistering vanishes when its TTL runs out), flips
it to "draining" and deletes it on clean shutdown. Redis outages never raise: the heartbeat keeps
trying and re-creates the lease when Redis returns.

Router side: `MembershipWatcher.replicas` is a dict kept fresh within a second: a pub/sub
notification triggers an immediate full read, and a periodic full read is the safety net (and
notices expired leases). Listeners get a `MembershipEvent` per join / update / drain / leave.

External engines (vLLM, SGLang) are registered by hand with `register_external` (no TTL); the
router's health checks decide whether they get traffic.

An operator's drain (`set_admin_drained`, from any router's admin API or the CLI) is kept apart
from the replica's own entry, so the replica's heartbeats cannot undo it, and every router reads
it with the entry (`ReplicaInfo.admin_drained`): a replica drained through one router is drained
for all of them.

Redis layout: `{prefix}:replicas` ZSET (id -> last write, ms) indexes `{prefix}:replica:{id}`
(JSON of ReplicaInfo, with a TTL for leases); `{prefix}:drained` SET of admin-drained ids; changes
are announced on `{prefix}:replicas:events`. Index entries whose key has expired are pruned
atomically by every full read (no KEYS scans).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
import redis.asyncio as aioredis

from fleet.control.background import join, sleep_or_stop
from fleet.control.health import RedisHealth
from fleet.control.redis_conn import DEFAULT_PREFIX, REDIS_DOWN_ERRORS, async_client, sync_client

log = logging.getLogger("fleet.control.membership")

ReplicaState = Literal["ready", "draining"]
EventKind = Literal["join", "update", "drain", "leave"]

DEFAULT_TTL_S = 10.0
DEFAULT_HEARTBEAT_S = 3.0
DEFAULT_RESYNC_S = 0.5


@dataclass
class ReplicaInfo:
    """What a router needs to know about one replica to route to it directly."""

    id: str
    url: str
    model: str
    device: str = "cpu"
    host: str = field(default_factory=socket.gethostname)
    max_model_len: int = 0
    block_size: int = 16
    state: ReplicaState = "ready"
    started_at: float = field(default_factory=time.time)
    engine: str = "fleetserve"
    managed: Literal["lease", "external"] = "lease"
    kv_capacity_tokens: int | None = None
    admin_drained: bool = False  # set by readers from `{prefix}:drained`, not by the replica
    # Further names the replica answers to (`--served-model-name a b`: `model` is "a"). Records
    # written before this field read as none; older readers ignore it (see from_json).
    aliases: list[str] = field(default_factory=list)
    # "generate" or "embed" (`--task`); None where not said: records written before this field
    # (fleetserve replicas then only generated) and engines registered by hand without --task.
    task: str | None = None
    # The prefix cache's events (fleet/control/kv_events.py): their scheme, where this replica
    # publishes them; None for replicas that publish nothing (vLLM, SGLang, older ours). With
    # them, what a router needs to hash a request as the replica does: the tokenizer's folder or
    # Hugging Face id and the `--chat-template` file, if one replaces the tokenizer's.
    kv_events: dict[str, Any] | None = None
    tokenizer: str | None = None
    chat_template: str | None = None

    @property
    def takes_work(self) -> bool:
        return self.state == "ready" and not self.admin_drained

    @property
    def names(self) -> list[str]:
        """Every name requests may use for this replica's model, the primary first."""
        return [self.model, *(a for a in self.aliases if a != self.model)]

    def to_json(self) -> bytes:
        return orjson.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, data: bytes | str) -> ReplicaInfo:
        """Unknown fields (from a newer writer) are ignored so mixed versions interoperate."""
        raw = orjson.loads(data)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


@dataclass(frozen=True)
class MembershipEvent:
    """One change seen by a watcher; `replica` is the new info (the last known one for "leave")."""

    kind: EventKind
    replica: ReplicaInfo


def new_replica_id(prefix: str = "r") -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


def _keys(prefix: str) -> tuple[str, str, str, str]:
    """(index, replica key prefix, channel, admin-drained set)."""
    return (
        f"{prefix}:replicas",
        f"{prefix}:replica:",
        f"{prefix}:replicas:events",
        f"{prefix}:drained",
    )


# KEYS: index, replica key, channel. ARGV: id, json, ttl_ms (0 = no TTL), event ("" = join if new).
_WRITE_LUA = """
local existed = redis.call('EXISTS', KEYS[2])
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
else
  redis.call('SET', KEYS[2], ARGV[2])
end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], t[1] * 1000 + math.floor(t[2] / 1000), ARGV[1])
local event = ARGV[4]
if event == '' and existed == 0 then event = 'join' end
if event ~= '' then
  redis.call('PUBLISH', KEYS[3], cjson.encode({event = event, id = ARGV[1]}))
end
return existed
"""

# KEYS: index, replica key, channel, drained set. ARGV: id.
_DELETE_LUA = """
local n = redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[4], ARGV[1])
redis.call('PUBLISH', KEYS[3], cjson.encode({event = 'leave', id = ARGV[1]}))
return n
"""

# KEYS: index, drained set. ARGV: replica key prefix.
# Returns {{id, json, id, json, ...}, {drained ids}}; prunes expired ids.
_READ_ALL_LUA = """
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
local out = {}
for _, id in ipairs(ids) do
  local v = redis.call('GET', ARGV[1] .. id)
  if v then
    out[#out + 1] = id
    out[#out + 1] = v
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return {out, redis.call('SMEMBERS', KEYS[2])}
"""

# KEYS: drained set, channel. ARGV: id, "1" to drain or "0" to undrain.
_ADMIN_DRAIN_LUA = """
if ARGV[2] == '1' then
  redis.call('SADD', KEYS[1], ARGV[1])
else
  redis.call('SREM', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[2], cjson.encode({event = 'drain', id = ARGV[1]}))
return 1
"""


def _parse_all(result: list[list[bytes]]) -> dict[str, ReplicaInfo]:
    flat, drained_ids = result
    drained = {d.decode() if isinstance(d, bytes) else d for d in drained_ids}
    replicas: dict[str, ReplicaInfo] = {}
    for i in range(0, len(flat), 2):
        try:
            info = ReplicaInfo.from_json(flat[i + 1])
        except (ValueError, TypeError) as exc:
            log.warning("skipping unreadable replica entry %r: %s", flat[i], exc)
            continue
        info.admin_drained = info.id in drained
        replicas[info.id] = info
    return replicas


class _Scripts:
    """The Lua scripts bound to one client (EVALSHA, reloaded by redis-py after a Redis restart)."""

    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self.client = client
        self.index, self.key_prefix, self.channel, self.drained = _keys(prefix)
        self.write = client.register_script(_WRITE_LUA)
        self.delete = client.register_script(_DELETE_LUA)
        self.read_all = client.register_script(_READ_ALL_LUA)
        self.admin_drain = client.register_script(_ADMIN_DRAIN_LUA)

    async def put(self, info: ReplicaInfo, ttl_s: float | None, event: str = "") -> bool:
        ttl_ms = int(ttl_s * 1000) if ttl_s else 0
        keys = [self.index, self.key_prefix + info.id, self.channel]
        existed = await self.write(keys=keys, args=[info.id, info.to_json(), ttl_ms, event])
        return bool(existed)

    async def remove(self, replica_id: str) -> bool:
        keys = [self.index, self.key_prefix + replica_id, self.channel, self.drained]
        return bool(await self.delete(keys=keys, args=[replica_id]))

    async def all(self) -> dict[str, ReplicaInfo]:
        keys = [self.index, self.drained]
        return _parse_all(await self.read_all(keys=keys, args=[self.key_prefix]))

    async def set_admin_drained(self, replica_id: str, drained: bool) -> None:
        keys = [self.drained, self.channel]
        await self.admin_drain(keys=keys, args=[replica_id, "1" if drained else "0"])


class MembershipLease:
    """A replica's own entry: `register()` once healthy, heartbeats, `set_state`, `deregister()`.

    None of its methods raise on Redis trouble; they return False and the heartbeat retries.
    Use as `async with MembershipLease(info, redis_url): ...` or call register/deregister.
    """

    def __init__(
        self,
        info: ReplicaInfo,
        redis_url: str | None = None,
        *,
        client: aioredis.Redis | None = None,
        prefix: str = DEFAULT_PREFIX,
        ttl: float = DEFAULT_TTL_S,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_S,
    ) -> None:
        self.info = dataclasses.replace(info, managed="lease")
        self.ttl = ttl
        self.heartbeat_interval = heartbeat_interval
        self._own_client = client is None
        self._client = client or async_client(redis_url)
        self._scripts = _Scripts(self._client, prefix)
        self._health = RedisHealth("membership-lease")
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    async def register(self) -> bool:
        """Write the lease and start heartbeating; False if Redis is down (the heartbeat retries)."""
        ok = await self._write(event="join")
        if self._task is None:
            self._stopping.clear()
            self._task = asyncio.create_task(self._heartbeat(), name=f"lease-{self.info.id}")
        return ok

    async def set_state(self, state: ReplicaState) -> bool:
        """Announce "draining" (no new work) or "ready"; routers see it within a second."""
        self.info.state = state
        return await self._write(event="drain" if state == "draining" else "update")

    async def update(self, **fields: Any) -> bool:  # any ReplicaInfo field, each its own type
        """Change other published fields (e.g. kv_capacity_tokens) and announce it."""
        self.info = dataclasses.replace(self.info, **fields)
        return await self._write(event="update")

    async def deregister(self) -> bool:
        """Stop heartbeating and delete the entry; routers see the leave at once."""
        self._stopping.set()
        await join(self._task)
        self._task = None
        try:
            await self._scripts.remove(self.info.id)
            return True
        except REDIS_DOWN_ERRORS as exc:
            self._health.failed(exc)
            return False

    async def close(self) -> None:
        """Deregister and release the connection pool if this lease created it."""
        await self.deregister()
        if self._own_client:
            await self._client.aclose()

    async def _write(self, event: str = "") -> bool:
        try:
            await self._scripts.put(self.info, self.ttl, event)
        except REDIS_DOWN_ERRORS as exc:
            self._health.failed(exc)
            return False
        self._health.succeeded()
        return True

    async def _heartbeat(self) -> None:
        while not await sleep_or_stop(self._stopping, self.heartbeat_interval):
            await self._write()

    async def __aenter__(self) -> MembershipLease:
        await self.register()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


Listener = Callable[[MembershipEvent], None]


class MembershipWatcher:
    """The router's live view: `replicas` (id -> ReplicaInfo), fresh within `resync_interval`.

    Pub/sub notifications make changes visible in milliseconds; the periodic full read catches
    anything missed (expired leases, messages lost during an outage). During a Redis outage the
    last known view is kept; it reconnects and resyncs by itself. For `lease_ttl` after an outage,
    leases missing from Redis are kept too: a Redis that lost its data (or whose leases expired
    while it was down) gets them back from the replicas' next heartbeats, and until then their
    model would have no replica at all.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        client: aioredis.Redis | None = None,
        prefix: str = DEFAULT_PREFIX,
        resync_interval: float = DEFAULT_RESYNC_S,
        lease_ttl: float = DEFAULT_TTL_S,
    ) -> None:
        self.replicas: dict[str, ReplicaInfo] = {}
        self.resync_interval = resync_interval
        self.lease_ttl = lease_ttl
        self._keep_leases_until = 0.0  # monotonic; see the class docstring
        self._own_client = client is None
        self._client = client or async_client(redis_url)
        self._scripts = _Scripts(self._client, prefix)
        self._health = RedisHealth("membership-watcher")
        self._listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None
        self._synced = asyncio.Event()
        self._stopping = asyncio.Event()

    def add_listener(self, listener: Listener) -> None:
        """Called on the event loop for every change; exceptions are logged, not raised."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        self._listeners.remove(listener)

    def ready(self, model: str | None = None) -> list[ReplicaInfo]:
        """Replicas taking new work, optionally only those serving `model`."""
        return [
            r
            for r in self.replicas.values()
            if r.takes_work and (model is None or model in r.names)
        ]

    async def start(self, wait: float = 1.0) -> None:
        """Begin watching; waits up to `wait` s for the first full read (never raises)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="membership-watcher")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._synced.wait(), wait)

    async def stop(self) -> None:
        self._stopping.set()
        await join(self._task)
        self._task = None
        if self._own_client:
            await self._client.aclose()

    async def refresh(self) -> bool:
        """One full read now; applies the differences and notifies listeners. False if Redis is down."""
        try:
            fresh = await self._scripts.all()
        except REDIS_DOWN_ERRORS as exc:
            self._health.failed(exc)
            return False
        if self._health.succeeded():
            self._keep_leases_until = time.monotonic() + self.lease_ttl
        if time.monotonic() < self._keep_leases_until:
            kept = {rid: r for rid, r in self.replicas.items() if r.managed == "lease"}
            fresh = {**kept, **fresh}
        self._apply(fresh)
        self._synced.set()
        return True

    def _apply(self, fresh: dict[str, ReplicaInfo]) -> None:
        old = self.replicas
        events: list[MembershipEvent] = []
        for rid, info in fresh.items():
            before = old.get(rid)
            if before is None:
                events.append(MembershipEvent("join", info))
            elif before != info:
                drained = before.takes_work and not info.takes_work
                events.append(MembershipEvent("drain" if drained else "update", info))
        events.extend(
            MembershipEvent("leave", info) for rid, info in old.items() if rid not in fresh
        )
        self.replicas = fresh
        for event in events:
            for listener in list(self._listeners):
                try:
                    listener(event)
                except Exception:
                    log.exception("membership listener failed on %s", event.kind)

    async def set_admin_drained(self, replica_id: str, drained: bool) -> bool:
        """Drain (or undrain) a replica for every router; False if Redis is unreachable. Every
        watcher, this one included, picks the change up from the notification it publishes."""
        try:
            await self._scripts.set_admin_drained(replica_id, drained)
        except REDIS_DOWN_ERRORS as exc:
            self._health.failed(exc)
            return False
        return True

    async def _run(self) -> None:
        while not self._stopping.is_set():
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(self._scripts.channel)
                await self.refresh()
                await self._listen(pubsub)
            except REDIS_DOWN_ERRORS as exc:
                self._health.failed(exc)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await sleep_or_stop(self._stopping, self.resync_interval)

    async def _listen(self, pubsub: aioredis.client.PubSub) -> None:
        """Full read on every notification and at least every `resync_interval`."""
        next_full = time.monotonic() + self.resync_interval
        while not self._stopping.is_set():
            timeout = min(0.1, max(0.0, next_full - time.monotonic()))
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
            if message is not None or time.monotonic() >= next_full:
                if not await self.refresh():
                    return
                next_full = time.monotonic() + self.resync_interval


async def register_external(
    client: aioredis.Redis, info: ReplicaInfo, prefix: str = DEFAULT_PREFIX
) -> ReplicaInfo:
    """Add an engine we do not run (vLLM, SGLang): no TTL, kept or ejected by router health checks."""
    info = dataclasses.replace(info, managed="external")
    await _Scripts(client, prefix).put(info, None, event="join")
    return info


async def unregister(client: aioredis.Redis, replica_id: str, prefix: str = DEFAULT_PREFIX) -> bool:
    """Remove any replica entry (lease or external); True if it existed."""
    return await _Scripts(client, prefix).remove(replica_id)


async def list_replicas(client: aioredis.Redis, prefix: str = DEFAULT_PREFIX) -> list[ReplicaInfo]:
    """Every live entry, sorted by model then id (prunes expired index entries on the way)."""
    replicas = await _Scripts(client, prefix).all()
    return sorted(replicas.values(), key=lambda r: (r.model, r.id))


def list_replicas_sync(
    redis_url: str | None = None, prefix: str = DEFAULT_PREFIX
) -> list[ReplicaInfo]:
    """Blocking variant for `fleet status`; raises redis errors so the CLI can report them."""
    client = sync_client(redis_url)
    try:
        index, key_prefix, _, drained = _keys(prefix)
        result = client.eval(_READ_ALL_LUA, 2, index, drained, key_prefix)
    finally:
        client.close()
    return sorted(_parse_all(result).values(), key=lambda r: (r.model, r.id))
