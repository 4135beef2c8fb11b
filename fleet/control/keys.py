"""API keys: authentication, per-key limits shared by every router, usage accounting.

Hot path (router or replica server)::

    store = KeyStore(redis_url); await store.start()
    record = await store.authenticate(bearer_token(request.headers.get("authorization")), model)
    async with store.admitted(record, reserve_tokens=prompt_tokens + max_tokens) as ticket:
        ...                                       # run the request
        await store.settle(ticket, prompt_tokens, completion_tokens)  # real usage; frees the slot

`authenticate` answers from a local cache without awaiting Redis for known keys (401 unknown,
revoked or expired; 403 model not allowed; 503 when the key is unknown here and Redis is down:
fail closed). `admit` is one EVALSHA (on the pipelined `fleet.control.resp` client) that checks
and takes rpm, tpm and concurrency together (429 with Retry-After naming the limit); a key with
no limits costs no round trip at all (its usage is written back in batches every second). Leaving `admitted` without `settle` (error, client
disconnect, cancellation) refunds the reserved tokens and frees the slot; both are idempotent.
A concurrency slot is an entry with a deadline that live tickets keep extending, so a crashed
router's slots expire by themselves (after `slot_ttl`). A ticket whose admission or settlement
went unconfirmed (timeout in a stall, outage, caller gone) is voided once Redis answers again: its
slot is freed and an admission still queued in Redis takes nothing, so a stall leaves no phantom
slot behind.

Revocation and rotation reach every cache within a second through pub/sub invalidation, with a
periodic full resync behind it. While Redis is down or slow, known keys keep working with local
(per-process) counters, so each router allows up to the full limit on its own; usage is kept in
memory and written back when Redis returns; the outage is logged once and counted (see
fleet.control.health); recovery needs no restart.

Only SHA-256 digests of secrets are stored; digests are compared with `hmac.compare_digest`.

Redis layout (prefix default "fleet"; `{{id}}` is the id in literal braces, a cluster hash tag):
`{p}:keys` SET of ids; `{p}:key:{id}` JSON KeyRecord; `{p}:keyhash:{sha256}` -> id;
`{p}:key:{{id}}:rpm` and `:tpm` HASH (unix second -> count: a 60-second sliding window of
1-second buckets); `{p}:key:{{id}}:slots` ZSET (ticket -> deadline ms);
`{p}:key:{{id}}:usage` HASH (requests, prompt_tokens, completion_tokens, last_used_at);
`{p}:key:{{id}}:void:{ticket}` marker of a voided ticket (expires after `slot_ttl`);
channel `{p}:keys:events` (JSON {"id", "old_hash"}).

Metrics: fleet_control_key_rejections_total{reason} (reason: invalid, revoked, expired, model,
rpm, tpm, concurrency, unavailable), fleet_control_local_admissions_total.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import logging
import math
import os
import re
import secrets
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import quote, urlencode

import orjson
import redis.asyncio as aioredis
from prometheus_client import Counter

from fleet.control.background import join, sleep_or_stop
from fleet.control.errors import APIError
from fleet.control.health import RedisHealth
from fleet.control.redis_conn import DEFAULT_PREFIX, REDIS_DOWN_ERRORS, async_client
from fleet.control.resp import LuaScript, RespClient

log = logging.getLogger("fleet.control.keys")

ADMIN_KEY_ENV = "FLEET_ADMIN_KEY"
SECRET_PREFIX = "sk-"
WINDOW_S = 60

KEY_REJECTIONS = Counter(
    "fleet_control_key_rejections", "Requests refused by API key checks and limits", ["reason"]
)
LOCAL_ADMISSIONS = Counter(
    "fleet_control_local_admissions", "Admissions decided by local counters during a Redis outage"
)


# ----------------------------------------------------------------------------- plain data


@dataclass(frozen=True)
class KeyRecord:
    """One API key as stored in Redis (never the secret: only its SHA-256 digest)."""

    id: str
    name: str
    secret_hash: str
    models: tuple[str, ...] = ()
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    created_at: float = field(default_factory=time.time)
    expires_at: float | None = None
    revoked: bool = False
    rotated_at: float | None = None
    version: int = 1  # bumped on every change, so a stale read never overwrites a newer record

    def allows_model(self, model: str | None) -> bool:
        """An empty model list means every model."""
        return not self.models or model is None or model in self.models

    def check_model(self, model: str | None) -> None:
        if not self.allows_model(model):
            KEY_REJECTIONS.labels("model").inc()
            raise APIError(
                403,
                f"The API key '{self.name}' may not use the model '{model}'.",
                param="model",
                code="model_not_allowed",
            )

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at is not None and (now or time.time()) >= self.expires_at

    def status(self, now: float | None = None) -> str:
        if self.revoked:
            return "revoked"
        return "expired" if self.expired(now) else "active"

    def public(self) -> dict:
        """The record without its digest, for listings and the admin API."""
        data = dataclasses.asdict(self)
        del data["secret_hash"]
        data["models"] = list(self.models)
        data["status"] = self.status()
        return data

    def to_json(self) -> bytes:
        return orjson.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, data: bytes | str) -> KeyRecord:
        raw = orjson.loads(data)
        names = {f.name for f in dataclasses.fields(cls)}
        raw = {k: v for k, v in raw.items() if k in names}
        raw["models"] = tuple(raw.get("models") or ())
        return cls(**raw)


@dataclass
class KeyUsage:
    """Totals since creation plus what the current minute window holds."""

    key_id: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    last_used_at: float | None = None
    window_requests: int = 0
    window_tokens: int = 0
    concurrent: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(eq=False)
class Ticket:
    """One admitted request's hold on its key's limits; settle or release it (idempotent).

    A ticket dropped without either stops being kept alive (weakly tracked), so its concurrency
    slot still expires.
    """

    key_id: str
    id: str
    reserved_tokens: int
    bucket: int
    local: bool = False
    counts_slot: bool = False
    unlimited: bool = False
    done: bool = False


# ----------------------------------------------------------------------------- secrets, admin key


def new_secret() -> str:
    """`sk-` and 256 random bits."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def new_admin_key() -> str:
    return SECRET_PREFIX + "admin-" + secrets.token_urlsafe(32)


def admin_key_from_env() -> str | None:
    return os.environ.get(ADMIN_KEY_ENV) or None


def is_admin_key(presented: str | None, expected: str | None) -> bool:
    """Constant-time check (digests of equal length are compared, whatever the inputs' lengths)."""
    if not presented or not expected:
        return False
    return hmac.compare_digest(hash_secret(presented), hash_secret(expected))


def require_admin(authorization: str | None, expected: str | None) -> None:
    """Raise the right APIError unless the `Authorization` header carries the admin key."""
    if not expected:
        raise APIError(
            403, "The admin API is disabled: no admin key is set.", code="admin_disabled"
        )
    if not is_admin_key(bearer_token(authorization), expected):
        raise APIError(401, "A valid admin key is required.", code="invalid_admin_key")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """'30d', '12h', '90m', '45s', '2w' or plain seconds -> seconds."""
    match = _DURATION.match(text.lower())
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30d, 12h, 90m)")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


# ----------------------------------------------------------------------------- Redis scripts

# Sliding window of 1-second buckets in a HASH. Returns total, and (when over) the ms until
# enough buckets age out for `need` more to fit under `limit`.
_WINDOW_LUA = """
local function window(key, sec, now_ms, limit, need)
  local flat = redis.call('HGETALL', key)
  local total, stale, live = 0, {}, {}
  for i = 1, #flat, 2 do
    local s, v = tonumber(flat[i]), tonumber(flat[i + 1])
    if s <= sec - 60 then
      stale[#stale + 1] = flat[i]
    else
      total = total + v
      live[#live + 1] = {s, v}
    end
  end
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  if limit <= 0 or total + need <= limit then return total, 0 end
  table.sort(live, function(a, b) return a[1] < b[1] end)
  local excess, freed = total + need - limit, 0
  for _, b in ipairs(live) do
    freed = freed + b[2]
    if freed >= excess then return total, math.max(1, (b[1] + 60) * 1000 - now_ms) end
  end
  return total, 60000
end
"""

# KEYS: rpm, tpm, slots, usage, the ticket's void marker. ARGV: rpm, tpm, max_concurrent
# (0 = none), reserve, ticket, slot_ttl_ms. Returns {0, bucket, reserved} on admission,
# {code, retry_ms, limit} when refused (code 1 rpm, 2 tpm, 3 concurrency), {4, 0, 0} for a ticket
# voided already (its caller gave up on it, so nobody reads that reply).
_ADMIT_LUA = (
    _WINDOW_LUA
    + """
if redis.call('EXISTS', KEYS[5]) == 1 then return {4, 0, 0} end
local t = redis.call('TIME')
local sec = tonumber(t[1])
local now_ms = sec * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm, tpm, maxc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local reserve = tonumber(ARGV[4])
if tpm > 0 and reserve > tpm then reserve = tpm end
if rpm > 0 then
  local _, wait = window(KEYS[1], sec, now_ms, rpm, 1)
  if wait > 0 then return {1, wait, rpm} end
end
if tpm > 0 then
  local _, wait = window(KEYS[2], sec, now_ms, tpm, reserve)
  if wait > 0 then return {2, wait, tpm} end
end
if maxc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now_ms)
  if redis.call('ZCARD', KEYS[3]) >= maxc then return {3, 1000, maxc} end
  redis.call('ZADD', KEYS[3], now_ms + tonumber(ARGV[6]), ARGV[5])
end
if rpm > 0 then
  redis.call('HINCRBY', KEYS[1], sec, 1)
  redis.call('PEXPIRE', KEYS[1], 61000)
end
if tpm > 0 and reserve > 0 then
  redis.call('HINCRBY', KEYS[2], sec, reserve)
  redis.call('PEXPIRE', KEYS[2], 61000)
end
redis.call('HINCRBY', KEYS[4], 'requests', 1)
return {0, sec, reserve}
"""
)

# KEYS: tpm, slots, usage. ARGV: ticket, bucket, token delta (real - reserved), prompt,
# completion, now (float seconds, for last_used_at).
_SETTLE_LUA = """
redis.call('ZREM', KEYS[2], ARGV[1])
local delta = tonumber(ARGV[3])
if delta ~= 0 then
  local v = redis.call('HGET', KEYS[1], ARGV[2])
  if v then
    redis.call('HSET', KEYS[1], ARGV[2], math.max(0, tonumber(v) + delta))
  elseif delta > 0 then
    redis.call('HINCRBY', KEYS[1], ARGV[2], delta)
    redis.call('PEXPIRE', KEYS[1], 61000)
  end
end
local p, c = tonumber(ARGV[4]), tonumber(ARGV[5])
if p > 0 then redis.call('HINCRBY', KEYS[3], 'prompt_tokens', p) end
if c > 0 then redis.call('HINCRBY', KEYS[3], 'completion_tokens', c) end
if p > 0 or c > 0 then redis.call('HSET', KEYS[3], 'last_used_at', ARGV[6]) end
return 1
"""

# A ticket whose admission or settlement the client could not confirm (timeout, outage, caller
# gone): free its slot if the admission ran, and mark it void so an admission still on its way
# (queued behind a stall) takes nothing. KEYS: slots, void marker. ARGV: ticket, marker ttl ms.
_VOID_LUA = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
return 1
"""

# KEYS: keyhash. ARGV: record key prefix. -> record JSON or nil.
_LOOKUP_LUA = """
local id = redis.call('GET', KEYS[1])
if not id then return false end
return redis.call('GET', ARGV[1] .. id)
"""

# Compare-and-set of a record. KEYS: record, old keyhash, new keyhash, index SET, channel.
# ARGV: expected JSON ('' = must not exist), new JSON, id, old hash for the event ('' = none).
_REPLACE_LUA = """
local cur = redis.call('GET', KEYS[1])
if ARGV[1] == '' then
  if cur then return 0 end
elseif cur ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SADD', KEYS[4], ARGV[3])
if KEYS[2] ~= KEYS[3] then redis.call('DEL', KEYS[2]) end
if KEYS[3] ~= '' then redis.call('SET', KEYS[3], ARGV[3]) end
redis.call('PUBLISH', KEYS[5], cjson.encode({id = ARGV[3], old_hash = ARGV[4]}))
return 1
"""


_ADMIT = LuaScript(_ADMIT_LUA)
_SETTLE = LuaScript(_SETTLE_LUA)
_LOOKUP = LuaScript(_LOOKUP_LUA)
_VOID = LuaScript(_VOID_LUA)

# Tickets in doubt kept for voiding; beyond this their slots are left to expire (slot_ttl).
MAX_IN_DOUBT = 10_000


def _url_of(client: aioredis.Redis) -> str:
    """A URL for the hot-path client from a redis-py client's connection settings (TLS kept)."""
    pool = client.connection_pool
    kw = pool.connection_kwargs
    if kw.get("path"):
        return f"unix://{kw['path']}"
    auth = ""
    if kw.get("password"):
        auth = f"{quote(kw.get('username') or '')}:{quote(kw['password'], safe='')}@"
    tls = issubclass(pool.connection_class, aioredis.SSLConnection)
    query = {k: kw[k] for k in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile") if kw.get(k)}
    where = f"{kw.get('host', '127.0.0.1')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"
    url = f"{'rediss' if tls else 'redis'}://{auth}{where}"
    return f"{url}?{urlencode(query)}" if query else url


class _Layout:
    """Redis key names under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.index = f"{prefix}:keys"
        self.channel = f"{prefix}:keys:events"
        self.record_prefix = f"{prefix}:key:"
        self._limit_keys: dict[str, tuple[str, str, str, str]] = {}

    def record(self, key_id: str) -> str:
        return self.record_prefix + key_id

    def keyhash(self, digest: str) -> str:
        return f"{self.prefix}:keyhash:{digest}"

    def limits(self, key_id: str) -> tuple[str, str, str, str]:
        """(rpm, tpm, slots, usage), cached: they are built on every admission."""
        names = self._limit_keys.get(key_id)
        if names is None:
            base = f"{self.prefix}:key:{{{key_id}}}"
            names = (f"{base}:rpm", f"{base}:tpm", f"{base}:slots", f"{base}:usage")
            self._limit_keys[key_id] = names
        return names

    def void(self, key_id: str, ticket_id: str) -> str:
        """The marker that voids one ticket (same hash tag as the key's limits)."""
        return f"{self.prefix}:key:{{{key_id}}}:void:{ticket_id}"


def _rate_limited(record: KeyRecord, code: int, retry_ms: int, limit: int) -> APIError:
    reason, what = {
        1: ("rpm", f"requests per minute (rpm): {limit}"),
        2: ("tpm", f"tokens per minute (tpm): {limit}"),
        3: ("concurrency", f"concurrent requests (max_concurrent): {limit}"),
    }[code]
    KEY_REJECTIONS.labels(reason).inc()
    retry_s = max(1, math.ceil(retry_ms / 1000))
    return APIError(
        429,
        f"Rate limit reached for API key '{record.name}' ({record.id}) on {what}. "
        f"Retry after {retry_s} s.",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(retry_s)},
    )


def _unauthorized(reason: str, message: str) -> APIError:
    KEY_REJECTIONS.labels(reason).inc()
    return APIError(401, message, code="invalid_api_key")


# ----------------------------------------------------------------------------- admin operations


class KeyNotFound(APIError):
    def __init__(self, key_id: str) -> None:
        super().__init__(404, f"No API key with id '{key_id}'.", param="id", code="key_not_found")


class KeyAdmin:
    """Create, list, revoke, rotate keys and read usage; used by `fleet keys` and the admin API.

    These talk to Redis directly (no cache) and raise redis errors when it is unreachable.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str = DEFAULT_PREFIX,
        on_change: Callable[[KeyRecord | None, KeyRecord], None] | None = None,
    ) -> None:
        self.client = client
        self.layout = _Layout(prefix)
        self._replace = client.register_script(_REPLACE_LUA)
        self._on_change = on_change

    async def create(
        self,
        name: str,
        *,
        models: Iterable[str] = (),
        rpm: int | None = None,
        tpm: int | None = None,
        max_concurrent: int | None = None,
        expires_in: float | None = None,
    ) -> tuple[KeyRecord, str]:
        """A new key; returns its record and the secret (shown once, stored only as a digest)."""
        for label, value in (("rpm", rpm), ("tpm", tpm), ("max_concurrent", max_concurrent)):
            if value is not None and value <= 0:
                raise ValueError(f"{label} must be a positive integer")
        secret = new_secret()
        now = time.time()
        record = KeyRecord(
            id=new_key_id(),
            name=name,
            secret_hash=hash_secret(secret),
            models=tuple(m for m in models if m),
            rpm=rpm,
            tpm=tpm,
            max_concurrent=max_concurrent,
            created_at=now,
            expires_at=now + expires_in if expires_in else None,
        )
        return await self._write(None, record), secret

    async def get(self, key_id: str) -> KeyRecord:
        raw = await self.client.get(self.layout.record(key_id))
        if raw is None:
            raise KeyNotFound(key_id)
        return KeyRecord.from_json(raw)

    async def list(self) -> list[KeyRecord]:
        ids = sorted(i.decode() for i in await self.client.smembers(self.layout.index))
        if not ids:
            return []
        raws = await self.client.mget([self.layout.record(i) for i in ids])
        records = [KeyRecord.from_json(r) for r in raws if r is not None]
        return sorted(records, key=lambda r: r.created_at)

    async def revoke(self, key_id: str) -> KeyRecord:
        """Permanently disable the key; every cache drops it within a second."""
        old = await self.get(key_id)
        return await self._write(old, dataclasses.replace(old, revoked=True))

    async def rotate(self, key_id: str) -> tuple[KeyRecord, str]:
        """A new secret for the same id and limits; the old secret stops working at once."""
        old = await self.get(key_id)
        if old.revoked:
            raise APIError(409, f"API key '{key_id}' is revoked.", code="key_revoked")
        secret = new_secret()
        new = dataclasses.replace(old, secret_hash=hash_secret(secret), rotated_at=time.time())
        return await self._write(old, new), secret

    async def usage(self, key_id: str) -> KeyUsage:
        await self.get(key_id)
        rpm_key, tpm_key, slots_key, usage_key = self.layout.limits(key_id)
        sec, usec = await self.client.time()
        now_ms = sec * 1000 + usec // 1000
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(usage_key)
        pipe.hgetall(rpm_key)
        pipe.hgetall(tpm_key)
        pipe.zcount(slots_key, now_ms, "+inf")
        totals, rpm_buckets, tpm_buckets, concurrent = await pipe.execute()

        def window(buckets: dict[bytes, bytes]) -> int:
            return sum(int(v) for s, v in buckets.items() if int(s) > sec - WINDOW_S)

        last = totals.get(b"last_used_at")
        return KeyUsage(
            key_id=key_id,
            requests=int(totals.get(b"requests", 0)),
            prompt_tokens=int(totals.get(b"prompt_tokens", 0)),
            completion_tokens=int(totals.get(b"completion_tokens", 0)),
            last_used_at=float(last) if last else None,
            window_requests=window(rpm_buckets),
            window_tokens=window(tpm_buckets),
            concurrent=int(concurrent),
        )

    async def _write(self, old: KeyRecord | None, new: KeyRecord) -> KeyRecord:
        """Compare-and-set `old` -> `new` (version bumped), publish the change, return `new`."""
        new = dataclasses.replace(new, version=old.version + 1 if old else 1)
        layout = self.layout
        old_hash = old.secret_hash if old else ""
        keys = [
            layout.record(new.id),
            layout.keyhash(old_hash) if old else "",
            "" if new.revoked else layout.keyhash(new.secret_hash),
            layout.index,
            layout.channel,
        ]
        expected = old.to_json() if old else b""
        ok = await self._replace(keys=keys, args=[expected, new.to_json(), new.id, old_hash])
        if not ok:
            raise APIError(
                409, f"API key '{new.id}' changed concurrently; try again.", code="conflict"
            )
        if self._on_change is not None:
            self._on_change(old, new)
        return new


# ----------------------------------------------------------------------------- local fallback


class _LocalWindow:
    """The same 1-second-bucket sliding window as the Lua script, in this process only."""

    __slots__ = ("buckets",)

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}

    def wait_ms(self, now: float, limit: int, need: int) -> int:
        sec = int(now)
        for s in [s for s in self.buckets if s <= sec - WINDOW_S]:
            del self.buckets[s]
        total = sum(self.buckets.values())
        if total + need <= limit:
            return 0
        excess, freed = total + need - limit, 0
        for s in sorted(self.buckets):
            freed += self.buckets[s]
            if freed >= excess:
                return max(1, int((s + WINDOW_S - now) * 1000))
        return WINDOW_S * 1000

    def add(self, sec: int, amount: int) -> None:
        self.buckets[sec] = self.buckets.get(sec, 0) + amount

    def adjust(self, sec: int, delta: int) -> None:
        if sec in self.buckets:
            self.buckets[sec] = max(0, self.buckets[sec] + delta)


@dataclass
class _LocalKeyState:
    rpm: _LocalWindow = field(default_factory=_LocalWindow)
    tpm: _LocalWindow = field(default_factory=_LocalWindow)
    live: weakref.WeakSet = field(default_factory=weakref.WeakSet)


# ----------------------------------------------------------------------------- the store


class KeyStore:
    """Per-process view of the keys: cached authentication, shared limits, usage accounting."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        client: aioredis.Redis | None = None,
        prefix: str = DEFAULT_PREFIX,
        slot_ttl: float = 60.0,
        resync_interval: float = 30.0,
        negative_ttl: float = 1.0,
        retry_interval: float = 0.5,
        flush_interval: float = 1.0,
    ) -> None:
        self._own_client = client is None
        self.client = client or async_client(redis_url)
        self._fast = RespClient(redis_url or _url_of(self.client))
        self.layout = _Layout(prefix)
        self.admin = KeyAdmin(self.client, prefix, on_change=self._changed_here)
        self.slot_ttl = slot_ttl
        self.resync_interval = resync_interval
        self.negative_ttl = negative_ttl
        self.retry_interval = retry_interval
        self.flush_interval = flush_interval
        self.health = RedisHealth("keys")
        self._by_hash: dict[str, KeyRecord] = {}
        self._by_id: dict[str, KeyRecord] = {}
        self._unknown: dict[str, float] = {}
        self._live: weakref.WeakValueDictionary[str, Ticket] = weakref.WeakValueDictionary()
        self._local: dict[str, _LocalKeyState] = {}
        self._pending: dict[str, list[int]] = {}
        self._in_doubt: dict[str, str] = {}  # ticket id -> key id, to void once Redis answers
        self._task: asyncio.Task | None = None
        self._synced = asyncio.Event()
        self._stopping = asyncio.Event()

    # -- lifecycle

    async def start(self, wait: float = 1.0) -> None:
        """Load every key into the cache and follow invalidations; never raises on Redis trouble."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="keystore")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._synced.wait(), wait)

    async def close(self) -> None:
        self._stopping.set()
        await join(self._task)
        self._task = None
        await self._flush_pending()
        await self._fast.aclose()
        if self._own_client:
            await self.client.aclose()

    async def __aenter__(self) -> KeyStore:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- authentication

    def cached(self, secret: str) -> KeyRecord | None:
        """The cached record for a secret (no checks, no I/O)."""
        return self._by_hash.get(hash_secret(secret))

    async def authenticate(self, secret: str | None, model: str | None = None) -> KeyRecord:
        """The key's record, or APIError 401/403/503. Known keys never wait on Redis."""
        if not secret:
            raise _unauthorized("invalid", "Missing API key: send 'Authorization: Bearer <key>'.")
        digest = hash_secret(secret)
        record = self._by_hash.get(digest)
        if record is None:
            record = await self._fetch(digest)
        if not hmac.compare_digest(record.secret_hash, digest):
            raise _unauthorized("invalid", "Incorrect API key provided.")
        if record.revoked:
            raise _unauthorized("revoked", "This API key has been revoked or rotated.")
        if record.expired():
            raise _unauthorized("expired", "This API key has expired.")
        if model is not None:
            record.check_model(model)
        return record

    async def _fetch(self, digest: str) -> KeyRecord:
        """Look a digest up in Redis (cache miss); fail closed when Redis is unreachable."""
        if self._unknown.get(digest, 0.0) > time.monotonic():
            raise _unauthorized("invalid", "Incorrect API key provided.")
        if not self.health.up:
            raise self._unavailable()
        try:
            raw = await self._fast.evalsha(
                _LOOKUP, [self.layout.keyhash(digest)], [self.layout.record_prefix]
            )
        except REDIS_DOWN_ERRORS as exc:
            self.health.failed(exc)
            raise self._unavailable() from None
        if raw is None:
            if len(self._unknown) > 10_000:
                self._unknown.clear()
            self._unknown[digest] = time.monotonic() + self.negative_ttl
            raise _unauthorized("invalid", "Incorrect API key provided.")
        record = KeyRecord.from_json(raw)
        self._install(record)
        return self._by_hash.get(digest) or record  # a newer local change wins over this read

    @staticmethod
    def _unavailable() -> APIError:
        KEY_REJECTIONS.labels("unavailable").inc()
        return APIError(
            503,
            "The API key could not be verified: the control plane is unavailable. Retry shortly.",
            code="control_plane_unavailable",
            headers={"Retry-After": "1"},
        )

    # -- limits

    async def admit(self, record: KeyRecord, reserve_tokens: int = 0) -> Ticket:
        """Take one request (and `reserve_tokens` of the tpm budget, plus a concurrency slot).

        One EVALSHA round-trip; during an outage, local counters decide. Raises APIError 429.
        """
        ticket_id = secrets.token_hex(8)
        if not (record.rpm or record.tpm or record.max_concurrent):
            # Nothing to enforce: count the request, written back in batches (no round trip).
            self._count_pending(record.id, 1, 0, 0)
            return Ticket(record.id, ticket_id, 0, 0, unlimited=True)
        reserve = max(0, int(reserve_tokens))
        if self.health.up:
            rpm_key, tpm_key, slots_key, usage_key = self.layout.limits(record.id)
            void_key = self.layout.void(record.id, ticket_id)
            try:
                code, a, b = await self._fast.evalsha(
                    _ADMIT,
                    [rpm_key, tpm_key, slots_key, usage_key, void_key],
                    [
                        record.rpm or 0,
                        record.tpm or 0,
                        record.max_concurrent or 0,
                        reserve,
                        ticket_id,
                        int(self.slot_ttl * 1000),
                    ],
                )
            except REDIS_DOWN_ERRORS as exc:
                self._doubt(record.id, ticket_id)  # it may have run, or still run, in Redis
                self.health.failed(exc)
            except asyncio.CancelledError:
                self._doubt(record.id, ticket_id)
                raise
            else:
                if code:
                    raise _rate_limited(record, code, a, b)
                ticket = Ticket(record.id, ticket_id, b, a, counts_slot=bool(record.max_concurrent))
                if ticket.counts_slot:
                    self._live[ticket_id] = ticket
                return ticket
        return self._admit_locally(record, ticket_id, reserve)

    def _admit_locally(self, record: KeyRecord, ticket_id: str, reserve: int) -> Ticket:
        state = self._local.get(record.id)
        if state is None:
            state = self._local[record.id] = _LocalKeyState()
        now = time.time()
        if record.tpm and reserve > record.tpm:
            reserve = record.tpm
        if record.rpm and (wait := state.rpm.wait_ms(now, record.rpm, 1)):
            raise _rate_limited(record, 1, wait, record.rpm)
        if record.tpm and (wait := state.tpm.wait_ms(now, record.tpm, reserve)):
            raise _rate_limited(record, 2, wait, record.tpm)
        if record.max_concurrent and len(state.live) >= record.max_concurrent:
            raise _rate_limited(record, 3, 1000, record.max_concurrent)
        sec = int(now)
        state.rpm.add(sec, 1)
        if record.tpm:
            state.tpm.add(sec, reserve)
        ticket = Ticket(record.id, ticket_id, reserve, sec, local=True, counts_slot=True)
        state.live.add(ticket)
        self._count_pending(record.id, 1, 0, 0)
        LOCAL_ADMISSIONS.inc()
        return ticket

    async def settle(
        self, ticket: Ticket, prompt_tokens: int = 0, completion_tokens: int = 0
    ) -> None:
        """Charge the real usage, return unused reserved tokens, free the slot. Never raises."""
        if ticket.done:
            return
        ticket.done = True
        self._live.pop(ticket.id, None)
        used = max(0, int(prompt_tokens)) + max(0, int(completion_tokens))
        delta = used - ticket.reserved_tokens  # usage counts even when nothing was reserved
        if ticket.local or ticket.unlimited:
            state = self._local.get(ticket.key_id)
            if state is not None:
                state.live.discard(ticket)
                state.tpm.adjust(ticket.bucket, delta)
            self._count_pending(ticket.key_id, 0, prompt_tokens, completion_tokens)
            return
        if not self.health.up:
            self._doubt(ticket.key_id, ticket.id)  # its slot is in Redis: free it when back
        else:
            _, tpm_key, slots_key, usage_key = self.layout.limits(ticket.key_id)
            try:
                await self._fast.evalsha(
                    _SETTLE,
                    [tpm_key, slots_key, usage_key],
                    [
                        ticket.id,
                        ticket.bucket,
                        delta,
                        max(0, int(prompt_tokens)),
                        max(0, int(completion_tokens)),
                        repr(time.time()),
                    ],
                )
                return
            except REDIS_DOWN_ERRORS as exc:
                self._doubt(ticket.key_id, ticket.id)
                self.health.failed(exc)
        self._count_pending(ticket.key_id, 0, prompt_tokens, completion_tokens)

    async def release(self, ticket: Ticket) -> None:
        """Failure path: refund the reservation and free the slot (no-op after `settle`)."""
        await self.settle(ticket, 0, 0)

    @contextlib.asynccontextmanager
    async def admitted(self, record: KeyRecord, reserve_tokens: int = 0) -> AsyncIterator[Ticket]:
        """`admit` now, `release` on the way out unless the body settled (errors, cancellation)."""
        ticket = await self.admit(record, reserve_tokens)
        try:
            yield ticket
        finally:
            await self.release(ticket)

    def _doubt(self, key_id: str, ticket_id: str) -> None:
        """Remember a ticket Redis may hold without anyone settling it (see `_void_in_doubt`)."""
        if len(self._in_doubt) < MAX_IN_DOUBT:
            self._in_doubt[ticket_id] = key_id

    async def _void_in_doubt(self) -> None:
        """Free the slots of tickets in doubt and void them (idempotent), so an admission that
        timed out here but ran in Redis later leaves no phantom slot behind."""
        batch = list(self._in_doubt.items())
        ttl_ms = int(self.slot_ttl * 1000)
        await asyncio.gather(
            *(
                self._fast.evalsha(
                    _VOID,
                    [self.layout.limits(key_id)[2], self.layout.void(key_id, ticket_id)],
                    [ticket_id, ttl_ms],
                )
                for ticket_id, key_id in batch
            )
        )
        for ticket_id, _ in batch:
            self._in_doubt.pop(ticket_id, None)

    def _count_pending(self, key_id: str, requests: int, prompt: int, completion: int) -> None:
        counts = self._pending.setdefault(key_id, [0, 0, 0])
        counts[0] += requests
        counts[1] += max(0, int(prompt))
        counts[2] += max(0, int(completion))

    async def _flush_pending(self) -> None:
        """Write usage counted in this process (unlimited keys, outages) back to Redis."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        pipe = self.client.pipeline(transaction=False)
        for key_id, (requests, prompt, completion) in pending.items():
            usage_key = self.layout.limits(key_id)[3]
            for name, value in (
                ("requests", requests),
                ("prompt_tokens", prompt),
                ("completion_tokens", completion),
            ):
                if value:
                    pipe.hincrby(usage_key, name, value)
            if prompt or completion:
                pipe.hset(usage_key, "last_used_at", repr(time.time()))
        try:
            await pipe.execute()
        except REDIS_DOWN_ERRORS as exc:
            self.health.failed(exc)
            for key_id, counts in pending.items():
                self._count_pending(key_id, *counts)

    # -- cache maintenance

    def _changed_here(self, old: KeyRecord | None, new: KeyRecord) -> None:
        """This process changed a key through `self.admin`: apply it before the event echoes back."""
        if old is not None and old.secret_hash != new.secret_hash:
            self._by_hash[old.secret_hash] = dataclasses.replace(old, revoked=True)
        self._install(new)

    def _install(self, record: KeyRecord) -> None:
        previous = self._by_id.get(record.id)
        if previous is not None and previous.version > record.version:
            return  # a stale read (e.g. an event's refetch racing a newer local change)
        if previous is not None and previous.secret_hash != record.secret_hash:
            self._by_hash[previous.secret_hash] = dataclasses.replace(previous, revoked=True)
        self._by_id[record.id] = record
        self._by_hash[record.secret_hash] = record
        self._unknown.pop(record.secret_hash, None)

    async def resync(self) -> bool:
        """Reload every key (after a reconnect, and periodically); False if Redis is down."""
        try:
            records = await self.admin.list()
        except REDIS_DOWN_ERRORS as exc:
            self.health.failed(exc)
            return False
        # Keys are revoked, never deleted: a cached key Redis no longer lists means Redis lost
        # its data (restarted without persistence), and its clients keep being served.
        by_id = dict(self._by_id)
        for new in records:
            cached = self._by_id.get(new.id)
            by_id[new.id] = cached if cached is not None and cached.version > new.version else new
        # Refused secrets stay refused: revoked keys and the old secrets of rotated ones.
        by_hash = {digest: r for digest, r in self._by_hash.items() if r.revoked}
        for old in self._by_id.values():
            new = by_id.get(old.id)
            if new is not None and new.secret_hash != old.secret_hash:
                by_hash[old.secret_hash] = dataclasses.replace(old, revoked=True)
        for record in by_id.values():
            by_hash[record.secret_hash] = record
        self._by_id, self._by_hash = by_id, by_hash
        self._unknown.clear()
        return True

    async def _on_event(self, data: bytes) -> None:
        try:
            event = orjson.loads(data)
            key_id, old_hash = event["id"], event.get("old_hash") or ""
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring malformed key event %r", data)
            return
        if old_hash:
            # Refuse the old secret at once, before the refetch that may fail.
            old = self._by_hash.get(old_hash) or self._by_id.get(key_id)
            if old is not None:
                self._by_hash[old_hash] = dataclasses.replace(
                    old, revoked=True, secret_hash=old_hash
                )
        self._unknown.clear()
        raw = await self.client.get(self.layout.record(key_id))
        if raw is not None:
            self._install(KeyRecord.from_json(raw))

    async def _refresh_slots(self) -> None:
        """Extend the deadline of every live ticket's concurrency slot."""
        tickets = [t for t in list(self._live.values()) if not t.done]
        if not tickets:
            return
        sec, usec = await self.client.time()
        deadline = sec * 1000 + usec // 1000 + int(self.slot_ttl * 1000)
        pipe = self.client.pipeline(transaction=False)
        for t in tickets:
            pipe.zadd(self.layout.limits(t.key_id)[2], {t.id: deadline}, xx=True)
        await pipe.execute()

    async def _run(self) -> None:
        """Subscribe, resync, then follow events; on any Redis failure, retry until it is back."""
        while not self._stopping.is_set():
            pubsub = self.client.pubsub()
            try:
                await pubsub.subscribe(self.layout.channel)
                if await self.resync():
                    self.health.succeeded()
                    self._synced.set()
                    await self._void_in_doubt()
                    await self._flush_pending()
                    await self._follow(pubsub)
            except REDIS_DOWN_ERRORS as exc:
                self.health.failed(exc)
            except Exception:
                log.exception("key store background task failed; restarting it")
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await sleep_or_stop(self._stopping, self.retry_interval)

    async def _follow(self, pubsub: aioredis.client.PubSub) -> None:
        loop = asyncio.get_running_loop()
        next_resync = loop.time() + self.resync_interval
        next_slots = loop.time() + self.slot_ttl / 3
        next_flush = loop.time() + self.flush_interval
        while not self._stopping.is_set():
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
            if message is not None and message.get("type") == "message":
                await self._on_event(message["data"])
            if not self.health.up:
                return  # a hot-path call failed: reconnect, resync and flush before trusting Redis
            if self._in_doubt:
                await self._void_in_doubt()
            now = loop.time()
            if now >= next_slots:
                await self._refresh_slots()
                next_slots = now + self.slot_ttl / 3
            if now >= next_flush:
                await self._flush_pending()
                next_flush = now + self.flush_interval
            if now >= next_resync:
                if not await self.resync():
                    return
                next_resync = now + self.resync_interval
