"""Membership against a real Redis: leases, expiry of dead replicas, watcher latency, externals."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import redis.asyncio as aioredis

from fleet.control.membership import (
    MembershipEvent,
    MembershipLease,
    MembershipWatcher,
    ReplicaInfo,
    list_replicas,
    list_replicas_sync,
    register_external,
    unregister,
)

_LEASE_PROCESS = """
import asyncio, sys
from fleet.control.membership import MembershipLease, ReplicaInfo

async def main():
    info = ReplicaInfo(id=sys.argv[3], url="http://127.0.0.1:9", model="tiny")
    lease = MembershipLease(info, sys.argv[1], prefix=sys.argv[2], ttl=1.0, heartbeat_interval=0.3)
    await lease.register()
    print("registered", flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""


class Recorder:
    """Collects watcher events with the time they arrived."""

    def __init__(self) -> None:
        self.events: list[tuple[float, MembershipEvent]] = []

    def __call__(self, event: MembershipEvent) -> None:
        self.events.append((time.monotonic(), event))

    async def wait_for(self, kind: str, replica_id: str, timeout: float = 3.0) -> float:
        """Seconds from now until that event (already seen counts as 0)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            for at, event in self.events:
                if event.kind == kind and event.replica.id == replica_id:
                    return max(0.0, at - start)
            await asyncio.sleep(0.005)
        raise AssertionError(f"no {kind} of {replica_id} within {timeout} s: {self.events}")


def _info(replica_id: str, **fields: object) -> ReplicaInfo:
    return ReplicaInfo(
        id=replica_id, url=f"http://127.0.0.1:1/{replica_id}", model="tiny", **fields
    )


async def test_watcher_sees_join_drain_leave_within_a_second(redis_url: str, prefix: str) -> None:
    # A long resync interval: the pub/sub notification alone must carry each change.
    watcher = MembershipWatcher(redis_url, prefix=prefix, resync_interval=30.0)
    recorder = Recorder()
    watcher.add_listener(recorder)
    await watcher.start()
    lease = MembershipLease(
        _info("r1", max_model_len=2048, block_size=16), redis_url, prefix=prefix
    )
    try:
        await lease.register()
        assert await recorder.wait_for("join", "r1") < 1.0
        assert watcher.replicas["r1"].max_model_len == 2048
        assert [r.id for r in watcher.ready("tiny")] == ["r1"]
        await lease.set_state("draining")
        assert await recorder.wait_for("drain", "r1") < 1.0
        assert watcher.ready() == [] and watcher.replicas["r1"].state == "draining"
        await lease.update(kv_capacity_tokens=4096)
        assert await recorder.wait_for("update", "r1") < 1.0
        assert watcher.replicas["r1"].kv_capacity_tokens == 4096
        await lease.deregister()
        assert await recorder.wait_for("leave", "r1") < 1.0
        assert watcher.replicas == {}
    finally:
        await lease.close()
        await watcher.stop()


async def test_admin_drain_reaches_every_watcher_and_outlives_heartbeats(
    redis_url: str, prefix: str
) -> None:
    operator = MembershipWatcher(redis_url, prefix=prefix, resync_interval=30.0)
    other = MembershipWatcher(redis_url, prefix=prefix, resync_interval=30.0)
    recorder = Recorder()
    other.add_listener(recorder)
    await operator.start()
    await other.start()
    lease = MembershipLease(_info("r1"), redis_url, prefix=prefix, heartbeat_interval=0.1)
    try:
        await lease.register()
        await recorder.wait_for("join", "r1")
        assert await operator.set_admin_drained("r1", True)
        assert await recorder.wait_for("drain", "r1") < 1.0
        await asyncio.sleep(0.4)  # several heartbeats rewrite the replica's own entry
        await other.refresh()
        assert other.replicas["r1"].admin_drained and other.replicas["r1"].state == "ready"
        assert other.ready() == []
        assert [r.admin_drained for r in list_replicas_sync(redis_url, prefix)] == [True]
        assert await operator.set_admin_drained("r1", False)
        await asyncio.sleep(0.3)
        assert [r.id for r in other.ready()] == ["r1"]
        await operator.set_admin_drained("r1", True)
        await lease.deregister()  # leaving clears the flag: a new replica with this id is fresh
        await lease.register()
        await other.refresh()
        assert not other.replicas["r1"].admin_drained
    finally:
        await lease.close()
        await other.stop()
        await operator.stop()


async def test_lease_expiry_removes_a_replica_that_died(
    redis_url: str, prefix: str, redis_client: aioredis.Redis
) -> None:
    watcher = MembershipWatcher(redis_url, prefix=prefix, resync_interval=0.3)
    recorder = Recorder()
    watcher.add_listener(recorder)
    await watcher.start()
    child = subprocess.Popen(
        [sys.executable, "-c", _LEASE_PROCESS, redis_url, prefix, "doomed"],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"registered"
        await recorder.wait_for("join", "doomed")
        await asyncio.sleep(1.5)  # beyond the 1 s TTL: heartbeats keep it alive
        assert "doomed" in watcher.replicas
        child.send_signal(signal.SIGKILL)  # dies without deregistering
        child.wait()
        elapsed = await recorder.wait_for("leave", "doomed", timeout=5.0)
        assert elapsed < 1.0 + 0.3 + 0.5
        assert await redis_client.zscore(f"{prefix}:replicas", "doomed") is None  # pruned
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        await watcher.stop()


async def test_periodic_read_catches_what_pubsub_missed(
    redis_url: str, prefix: str, redis_client: aioredis.Redis
) -> None:
    watcher = MembershipWatcher(redis_url, prefix=prefix, resync_interval=0.2)
    recorder = Recorder()
    watcher.add_listener(recorder)
    await watcher.start()
    lease = MembershipLease(_info("quiet"), redis_url, prefix=prefix, heartbeat_interval=2.0)
    try:
        await lease.register()
        await recorder.wait_for("join", "quiet")
        await redis_client.delete(f"{prefix}:replica:quiet")  # lost without a notification
        assert await recorder.wait_for("leave", "quiet", timeout=1.0) < 0.5
        recorder.events.clear()
        await recorder.wait_for("join", "quiet", timeout=3.0)  # the next heartbeat restores it
    finally:
        await lease.close()
        await watcher.stop()


async def test_external_replicas_have_no_ttl(
    redis_url: str, prefix: str, redis_client: aioredis.Redis
) -> None:
    watcher = MembershipWatcher(redis_url, prefix=prefix, resync_interval=30.0)
    recorder = Recorder()
    watcher.add_listener(recorder)
    await watcher.start()
    try:
        info = ReplicaInfo(id="ext-1", url="http://10.0.0.5:8000", model="big", engine="vllm")
        stored = await register_external(redis_client, info, prefix)
        assert stored.managed == "external"
        assert await recorder.wait_for("join", "ext-1") < 1.0
        assert await redis_client.pttl(f"{prefix}:replica:ext-1") == -1
        assert [(r.id, r.engine, r.managed) for r in await list_replicas(redis_client, prefix)] == [
            ("ext-1", "vllm", "external")
        ]
        assert [r.id for r in list_replicas_sync(redis_url, prefix)] == ["ext-1"]
        assert await unregister(redis_client, "ext-1", prefix)
        assert await recorder.wait_for("leave", "ext-1") < 1.0
        assert not await unregister(redis_client, "ext-1", prefix)
    finally:
        await watcher.stop()


def test_replica_info_round_trip_ignores_unknown_fields() -> None:
    info = _info("r9", device="cuda:0", kv_capacity_tokens=123)
    assert ReplicaInfo.from_json(info.to_json()) == info
    assert ReplicaInfo.from_json(info.to_json()[:-1] + b',"future":1}') == info
