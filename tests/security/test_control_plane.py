"""The control plane under attack or stress: Redis stalls that could leave phantom slots, Redis
without a password, TLS to Redis, and the router's internal key to replicas."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from fleet.control.errors import APIError
from fleet.control.keys import KeyAdmin, KeyRecord, KeyStore
from fleet.control.redis_conn import async_client
from fleet.embedded_redis import EmbeddedRedis

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    """A redis-server of this test's own, so it can be paused (SIGSTOP) without hurting others."""
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
async def one_at_a_time(own_redis: EmbeddedRedis) -> AsyncIterator[tuple[KeyStore, KeyRecord]]:
    """A started key store and a key with max_concurrent=1, admitted once (so Redis has the
    admission script cached, as in a running fleet)."""
    prefix = f"sec-{uuid.uuid4().hex[:8]}"
    client = async_client(own_redis.url)
    _, secret = await KeyAdmin(client, prefix).create("one-at-a-time", max_concurrent=1)
    await client.aclose()
    store = KeyStore(own_redis.url, prefix=prefix, retry_interval=0.2)
    await store.start()
    try:
        record = await store.authenticate(secret)
        await store.release(await store.admit(record))
        yield store, record
    finally:
        await store.close()


class Paused:
    """SIGSTOP the server for `seconds` (a stall), SIGCONT on leaving whatever happens."""

    def __init__(self, server: EmbeddedRedis, seconds: float) -> None:
        assert server.process is not None
        self.pid = server.process.pid
        self.until = time.monotonic() + seconds

    async def __aenter__(self) -> Paused:
        os.kill(self.pid, signal.SIGSTOP)
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await asyncio.sleep(max(0.0, self.until - time.monotonic()))
        finally:
            os.kill(self.pid, signal.SIGCONT)


async def _within(seconds: float, attempt: Callable[[], Awaitable[bool]]) -> float:
    """Seconds until `attempt()` is true; fails the test after `seconds`."""
    start = time.monotonic()
    last: object = None
    while time.monotonic() - start < seconds:
        try:
            if await attempt():
                return time.monotonic() - start
        except APIError as exc:
            last = exc.message
        await asyncio.sleep(0.05)
    pytest.fail(f"not within {seconds} s; last refusal: {last}")


def _admitted_through_redis(store: KeyStore, record: KeyRecord) -> Callable[[], Awaitable[bool]]:
    async def attempt() -> bool:
        ticket = await store.admit(record)
        await store.release(ticket)
        return not ticket.local

    return attempt


# ----------------------------------------------------------------------------- Redis stalls


async def test_admit_timed_out_in_a_stall_leaves_no_phantom_slot(
    own_redis: EmbeddedRedis, one_at_a_time: tuple[KeyStore, KeyRecord]
) -> None:
    """The admit reaches Redis, Redis stalls 3 s, the client gives up after 1 s (local counters
    decide); when Redis resumes it runs the admit anyway. That slot must not block the key."""
    store, record = one_at_a_time
    async with Paused(own_redis, 3.0):
        ticket = await store.admit(record)
        assert ticket.local
        await store.release(ticket)
    await _within(2.5, _admitted_through_redis(store, record))


async def test_admit_cancelled_in_a_stall_leaves_no_phantom_slot(
    own_redis: EmbeddedRedis, one_at_a_time: tuple[KeyStore, KeyRecord]
) -> None:
    """The client left while its admit waited on a stalled Redis: the admit still runs there."""
    store, record = one_at_a_time
    async with Paused(own_redis, 2.0):
        waiting = asyncio.create_task(store.admit(record))
        await asyncio.sleep(0.3)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    await _within(2.5, _admitted_through_redis(store, record))


async def test_release_timed_out_in_a_stall_frees_the_slot_when_redis_returns(
    own_redis: EmbeddedRedis, one_at_a_time: tuple[KeyStore, KeyRecord]
) -> None:
    """A request admitted through Redis ends during a stall, after another call has already found
    Redis down: its slot is freed once Redis is back, not left to expire a minute later."""
    store, record = one_at_a_time
    ticket = await store.admit(record)
    assert not ticket.local
    async with Paused(own_redis, 3.0):
        other = await store.admit(record)  # times out: Redis is down for this store now
        assert other.local and not store.health.up
        await store.release(other)
        await store.release(ticket)
    await _within(2.5, _admitted_through_redis(store, record))
