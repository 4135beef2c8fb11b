"""The per-process view of the keys: authentication from a local cache, kept fresh from Redis.

`authenticate` answers from a local cache without awaiting Redis for known keys (401 unknown,
revoked or expired; 403 model not allowed; 503 when the key is unknown here and Redis is down:
fail closed). Revocation and rotation reach every cache within a second through pub/sub
invalidation, with a periodic full resync behind it. While Redis is down or slow, known keys keep
working (limits: fleet.control.keys.limits); the outage is logged once and counted (see
fleet.control.health); recovery needs no restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import time
from collections.abc import Callable
from typing import cast

import orjson
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub

from fleet.control.background import join, sleep_or_stop
from fleet.control.errors import APIError
from fleet.control.health import RedisHealth
from fleet.control.keys.admin import KeyAdmin
from fleet.control.keys.credentials import hash_secret
from fleet.control.keys.layout import KeyLayout
from fleet.control.keys.limits import KeyLimits
from fleet.control.keys.records import KeyRecord, Ticket
from fleet.control.keys.refusals import unauthorized, unavailable
from fleet.control.keys.scripts import LOOKUP
from fleet.control.redis_conn import DEFAULT_PREFIX, REDIS_DOWN_ERRORS, async_client, url_of
from fleet.control.resp import RespClient

log = logging.getLogger("fleet.control.keys")


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
        self._fast = RespClient(redis_url or url_of(self.client))
        self.layout = KeyLayout(prefix)
        self.admin = KeyAdmin(self.client, prefix, on_change=self._changed_here)
        self.slot_ttl = slot_ttl
        self.resync_interval = resync_interval
        self.negative_ttl = negative_ttl
        self.retry_interval = retry_interval
        self.flush_interval = flush_interval
        self.health = RedisHealth("keys")
        self.limits = KeyLimits(self.client, self._fast, self.layout, self.health, slot_ttl)
        self._by_hash: dict[str, KeyRecord] = {}
        self._by_id: dict[str, KeyRecord] = {}
        self._unknown: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
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
        await self.limits.flush_pending()
        await self._fast.aclose()
        if self._own_client:
            await self.client.aclose()

    async def __aenter__(self) -> KeyStore:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- authentication

    def known(self, secret: str | None) -> KeyRecord | None:
        """The record of a key this process knows, checked (no I/O; APIError 401); None when it
        is not cached here (`authenticate` looks it up in Redis)."""
        if not secret:
            raise unauthorized("invalid", "Missing API key: send 'Authorization: Bearer <key>'.")
        return self.known_digest(hash_secret(secret))

    def known_digest(self, digest: str) -> KeyRecord | None:
        """`known`, given the secret's digest (`hash_secret`)."""
        record = self._by_hash.get(digest)
        if record is not None:
            _check(record, digest)
        return record

    async def authenticate(self, secret: str | None, model: str | None = None) -> KeyRecord:
        """The key's record, or APIError 401/403/503. Known keys never wait on Redis."""
        record = self.known(secret)
        if record is None:
            digest = hash_secret(secret)  # type: ignore[arg-type]  # `known` refused None
            record = await self._fetch(digest)
            _check(record, digest)
        if model is not None:
            record.check_model(model)
        return record

    async def _fetch(self, digest: str) -> KeyRecord:
        """Look a digest up in Redis (cache miss); fail closed when Redis is unreachable."""
        if self._unknown.get(digest, 0.0) > time.monotonic():
            raise unauthorized("invalid", "Incorrect API key provided.")
        if not self.health.up:
            raise unavailable()
        try:
            raw = await self._fast.evalsha(
                LOOKUP, [self.layout.keyhash(digest)], [self.layout.record_prefix]
            )
        except REDIS_DOWN_ERRORS as exc:
            self.health.failed(exc)
            raise unavailable() from None
        if raw is None:
            if len(self._unknown) > 10_000:
                self._unknown.clear()
            self._unknown[digest] = time.monotonic() + self.negative_ttl
            raise unauthorized("invalid", "Incorrect API key provided.")
        record = KeyRecord.from_json(cast(bytes, raw))
        self._install(record)
        return self._by_hash.get(digest) or record  # a newer local change wins over this read

    # -- limits (fleet.control.keys.limits)

    async def admit(self, record: KeyRecord, reserve_tokens: int = 0) -> Ticket:
        """Take one request (and `reserve_tokens` of the tpm budget, plus a concurrency slot).

        One EVALSHA per event-loop tick, whatever it carries; during an outage, local counters
        decide. Raises APIError 429.
        """
        return await self.limits.admit(record, reserve_tokens)

    async def settle(
        self, ticket: Ticket, prompt_tokens: int = 0, completion_tokens: int = 0
    ) -> None:
        """Charge the real usage, return unused reserved tokens, free the slot. Never raises."""
        await self.limits.settle(ticket, prompt_tokens, completion_tokens)

    def settle_soon(
        self, ticket: Ticket, prompt_tokens: int = 0, completion_tokens: int = 0
    ) -> None:
        """`settle` without waiting for Redis (for callers with nothing left to do)."""
        self.limits.settle_soon(ticket, prompt_tokens, completion_tokens)

    async def release(self, ticket: Ticket) -> None:
        """Failure path: refund the reservation and free the slot (no-op after `settle`)."""
        await self.limits.settle(ticket, 0, 0)

    def admit_soon(
        self, record: KeyRecord, reserve_tokens: int, done: Callable[[Ticket | APIError], None]
    ) -> None:
        """`admit` for callers on callbacks: `done` gets the ticket or the 429."""
        self.limits.admit_soon(record, reserve_tokens, done)

    def admitted(
        self, record: KeyRecord, reserve_tokens: int = 0
    ) -> contextlib.AbstractAsyncContextManager[Ticket]:
        """`admit` now, `release` on the way out unless the body settled (errors, cancellation)."""
        return self.limits.admitted(record, reserve_tokens)

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
            changed = by_id.get(old.id)
            if changed is not None and changed.secret_hash != old.secret_hash:
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

    # -- the background task

    async def _run(self) -> None:
        """Subscribe, resync, then follow events; on any Redis failure, retry until it is back."""
        while not self._stopping.is_set():
            pubsub = self.client.pubsub()
            try:
                await pubsub.subscribe(self.layout.channel)
                if await self.resync():
                    self.health.succeeded()
                    self._synced.set()
                    await self.limits.void_in_doubt()
                    await self.limits.flush_pending()
                    await self._follow(pubsub)
            except REDIS_DOWN_ERRORS as exc:
                self.health.failed(exc)
            except Exception:
                log.exception("key store background task failed; restarting it")
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await sleep_or_stop(self._stopping, self.retry_interval)

    async def _follow(self, pubsub: PubSub) -> None:
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
            if self.limits.in_doubt:
                await self.limits.void_in_doubt()
            now = loop.time()
            if now >= next_slots:
                await self.limits.refresh_slots()
                next_slots = now + self.slot_ttl / 3
            if now >= next_flush:
                await self.limits.flush_pending()
                next_flush = now + self.flush_interval
            if now >= next_resync:
                if not await self.resync():
                    return
                next_resync = now + self.resync_interval


def _check(record: KeyRecord, digest: str) -> None:
    """APIError 401 unless `record` is the live key of `digest`."""
    if not hmac.compare_digest(record.secret_hash, digest):
        raise unauthorized("invalid", "Incorrect API key provided.")
    if record.revoked:
        raise unauthorized("revoked", "This API key has been revoked or rotated.")
    if record.expired():
        raise unauthorized("expired", "This API key has expired.")
