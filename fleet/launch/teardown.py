"""`fleet down`: stop a fleet through its manager, and clean up after one that was killed.

The normal path asks the manager to stop (it drains replicas, stops router and Redis, stops Ray on
the hosts it brought up, removes its state file). If the manager is gone or does not finish in
time, the process groups recorded in the state file are ended directly, Ray actors of the fleet are
killed by name, Ray is stopped on the fleet's hosts, and membership entries the replicas left
behind are deleted, so nothing keeps serving or advertising itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from fleet.control import membership
from fleet.control.redis_conn import REDIS_DOWN_ERRORS, async_client
from fleet.launch import manager_socket
from fleet.launch.process import signal_group
from fleet.launch.state import FleetState, ProcessRecord, pid_alive


def teardown(state: FleetState, timeout: float = 120.0) -> Iterator[str]:
    clean = False
    if state.manager_alive():
        yield f"asking the fleet manager (pid {state.manager_pid}) to drain and stop"
        try:
            manager_socket.call(state.manager_socket, "stop", timeout=10.0)
        except (OSError, manager_socket.ManagerError):
            with contextlib.suppress(ProcessLookupError):
                os.kill(state.manager_pid, signal.SIGTERM)
        clean = _wait_gone([state.manager_pid], timeout)
        if not clean:
            yield f"the manager did not stop within {timeout:.0f}s: killing it"
            with contextlib.suppress(ProcessLookupError):
                os.kill(state.manager_pid, signal.SIGKILL)
    else:
        yield f"the fleet manager (pid {state.manager_pid}) is gone: cleaning up after it"
    leftovers = [p for p in state.processes if p.kind != "redis" and pid_alive(p.pid)]
    for record in leftovers:
        yield f"stopping leftover {record.kind} {record.name} (pid {record.pid})"
    _stop_groups(leftovers)
    if state.backend == "ray" and not clean:
        yield from _stop_ray(state)
    removed = asyncio.run(_remove_members(state))
    for member_id in removed:
        yield f"removed stale membership entry {member_id}"
    redis = [p for p in state.processes if p.kind == "redis" and pid_alive(p.pid)]
    for record in redis:
        yield f"stopping embedded Redis (pid {record.pid})"
    _stop_groups(redis)
    FleetState.remove(Path(state.run_dir))


def _stop_ray(state: FleetState) -> Iterator[str]:
    """What a manager that died left on Ray: the fleet's actors, and the hosts' cluster."""
    from fleet.launch.ray_backend import kill_fleet_actors
    from fleet.launch.ray_cluster import ClusterError, RayCluster
    from fleet.spec import FleetSpec

    spec = FleetSpec.model_validate(state.spec)
    cluster = None
    if spec.hosts.addresses:
        try:
            cluster = RayCluster.of(spec, Path(state.run_dir))
        except ClusterError as exc:
            yield f"cannot stop Ray on {', '.join(spec.hosts.addresses)}: {exc}"
    address = cluster.client_address if cluster is not None else spec.ray_address
    for name in kill_fleet_actors(state.name, address):
        yield f"killed Ray actor {name}"
    if cluster is not None:
        yield from cluster.down()


def _wait_gone(pids: Sequence[int | None], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(pid_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _stop_groups(records: list[ProcessRecord], grace: float = 15.0) -> None:
    pids = [r.pid for r in records if r.pid]
    for pid in pids:
        signal_group(pid, signal.SIGTERM)
    if not _wait_gone(pids, grace):
        for pid in pids:
            signal_group(pid, signal.SIGKILL)
        _wait_gone(pids, 5.0)
    for pid in pids:
        signal_group(pid, signal.SIGKILL)  # anything a server left in its group


async def _remove_members(state: FleetState) -> list[str]:
    ours = {p.url.rstrip("/") for p in state.processes if p.kind == "replica" and p.url}
    names = {p.name for p in state.processes if p.kind == "replica"}
    client = async_client(state.redis_url, socket_timeout=1.0, connect_timeout=1.0)
    removed: list[str] = []
    try:
        for member in await membership.list_replicas(client):
            if member.managed == "lease" and (member.url.rstrip("/") in ours or member.id in names):
                await membership.unregister(client, member.id)
                removed.append(member.id)
    except REDIS_DOWN_ERRORS:
        pass
    finally:
        await client.aclose()
    return removed
