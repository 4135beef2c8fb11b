"""Redis stopped, stalled and restarted under a running key store, watcher and lease."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client import REGISTRY

from fleet.control.errors import APIError
from fleet.control.keys import KeyAdmin, KeyStore
from fleet.control.membership import MembershipLease, MembershipWatcher, ReplicaInfo
from fleet.control.redis_conn import async_client
from fleet.embedded_redis import EmbeddedRedis, free_port

PREFIX = "outage"


class RestartableRedis:
    """A redis-server on a fixed port whose data survives stop/start (SAVE into a kept folder)."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.server: EmbeddedRedis | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.server = EmbeddedRedis(port=self.port, data_dir=self.data_dir).start()

    def stop(self) -> None:
        assert self.server is not None
        with redis.Redis(port=self.port) as client:
            client.save()
        self.server.stop()
        self.server = None

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RestartableRedis]:
    srv = RestartableRedis(tmp_path / "redis")
    srv.start()
    yield srv
    srv.close()


def _outages(component: str) -> float:
    return (
        REGISTRY.get_sample_value("fleet_control_redis_outages_total", {"component": component})
        or 0.0
    )


async def _eventually(check, timeout: float) -> float:
    start = time.monotonic()
    while True:
        try:
            if await check():
                return time.monotonic() - start
        except APIError:
            pass
        assert time.monotonic() - start < timeout, "not recovered in time"
        await asyncio.sleep(0.02)


async def test_redis_stopped_and_restarted(
    server: RestartableRedis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fleet.control")
    escaped: list[dict] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: escaped.append(ctx))
    outages_before = _outages("keys")

    admin_client = async_client(server.url)
    admin = KeyAdmin(admin_client, PREFIX)
    known, known_secret = await admin.create("known", rpm=10, tpm=1000, max_concurrent=2)
    store = KeyStore(server.url, prefix=PREFIX, retry_interval=0.2)
    watcher = MembershipWatcher(server.url, prefix=PREFIX, resync_interval=0.2)
    lease = MembershipLease(
        ReplicaInfo(id="r1", url="http://127.0.0.1:9", model="tiny"),
        server.url,
        prefix=PREFIX,
        ttl=2.0,
        heartbeat_interval=0.3,
    )
    await store.start()
    await watcher.start()
    await lease.register()
    try:
        record = await store.authenticate(known_secret)
        first = await store.admit(record, reserve_tokens=100)
        await store.settle(first, 10, 20)
        await _eventually(lambda: _has(watcher, "r1"), 1.0)

        server.stop()
        # Known key: served from the cache, limited by local counters, never waiting on Redis.
        start = time.monotonic()
        tickets = []
        for _ in range(4):  # local counters start empty
            await store.authenticate(known_secret)
            tickets.append(await store.admit(record, reserve_tokens=50))
            await store.settle(tickets[-1], 5, 5)
        assert all(t.local for t in tickets)
        assert time.monotonic() - start < 1.5
        held = [await store.admit(record), await store.admit(record)]
        with pytest.raises(APIError) as err:  # the local concurrency cap (2) still holds
            await store.admit(record)
        assert err.value.status == 429 and "max_concurrent" in err.value.message
        for ticket in held:
            await store.release(ticket)
        # Unknown key: fail closed.
        with pytest.raises(APIError) as err:
            await store.authenticate("sk-never-seen-before")
        assert err.value.status == 503 and err.value.headers["Retry-After"] == "1"
        # The watcher keeps its last view; the lease keeps trying quietly.
        await asyncio.sleep(0.6)
        assert "r1" in watcher.replicas
        assert not store.health.up and not watcher._health.up
        assert _outages("keys") == outages_before + 1

        server.start()
        await _eventually(lambda: _up(store), 5.0)
        # Pub/sub is back: a key revoked now is refused within a second...
        await admin_client.aclose()
        admin_client = async_client(server.url)
        admin = KeyAdmin(admin_client, PREFIX)
        await admin.revoke(known.id)
        assert await _eventually(lambda: _refused(store, known_secret), 1.0) < 1.0
        # ...a key created now is found, and limits are shared in Redis again.
        _, fresh_secret = await admin.create("fresh", rpm=1)
        fresh = await store.authenticate(fresh_secret)
        ticket = await store.admit(fresh)
        assert not ticket.local
        with pytest.raises(APIError) as err:
            await store.admit(fresh)
        assert err.value.status == 429 and "rpm" in err.value.message
        # Usage counted during the outage was written back.
        usage = await admin.usage(known.id)
        assert usage.requests >= 1 + 4 and usage.prompt_tokens == 10 + 4 * 5
        # The watcher follows changes again and the lease is still (or again) there.
        await _eventually(lambda: _has(watcher, "r1"), 3.0)
        await lease.set_state("draining")
        await _eventually(lambda: _draining(watcher, "r1"), 1.0)
    finally:
        await lease.close()
        await watcher.stop()
        await store.close()
        await admin_client.aclose()
    assert escaped == []
    warnings = [
        r.getMessage() for r in caplog.records if "keys: Redis unavailable" in r.getMessage()
    ]
    assert len(warnings) == 1


async def _has(watcher: MembershipWatcher, replica_id: str) -> bool:
    return replica_id in watcher.replicas


async def _draining(watcher: MembershipWatcher, replica_id: str) -> bool:
    return watcher.replicas.get(replica_id, None) is not None and (
        watcher.replicas[replica_id].state == "draining"
    )


async def _up(store: KeyStore) -> bool:
    return store.health.up


async def _refused(store: KeyStore, secret: str) -> bool:
    try:
        await store.authenticate(secret)
    except APIError as exc:
        return exc.status == 401
    return False


async def test_stalled_redis_never_hangs_a_request(server: RestartableRedis) -> None:
    admin_client = async_client(server.url)
    _, secret = await KeyAdmin(admin_client, PREFIX).create("patient", rpm=1000)
    await admin_client.aclose()
    store = KeyStore(server.url, prefix=PREFIX, retry_interval=0.2)
    await store.start()
    try:
        record = await store.authenticate(secret)
        stall = threading.Thread(
            target=lambda: redis.Redis(port=server.port).execute_command("DEBUG", "SLEEP", "2.5")
        )
        stall.start()
        await asyncio.sleep(0.1)
        start = time.monotonic()
        tickets = await asyncio.gather(*(store.admit(record) for _ in range(20)))
        assert time.monotonic() - start < 1.8  # one socket timeout (1 s), then local counters
        assert all(t.local for t in tickets)
        with pytest.raises(APIError) as err:
            await store.authenticate("sk-unknown-while-stalled")
        assert err.value.status == 503
        stall.join()
        await _eventually(lambda: _up(store), 3.0)
        assert not (await store.admit(record)).local
    finally:
        await store.close()
