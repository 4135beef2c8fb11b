"""The fleet manager's parts with real processes, sockets and Redis: control socket, state file,
launch lines against the servers' own parsers, status joining, rendering, and `fleet down`'s
cleanup after a manager that died."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
from fleet_harness import pid_alive, wait_for
from rich.console import Console

from fleet.control import membership
from fleet.control.redis_conn import async_client
from fleet.embedded_redis import free_port
from fleet.launch import manager_socket
from fleet.launch.process import ChildProcess, ProcessSpec
from fleet.launch.replicas import ReplicaLaunch
from fleet.launch.scrape import scrape_targets
from fleet.launch.state import FleetState, ProcessRecord
from fleet.launch.status import collect_status, requests_served
from fleet.launch.teardown import teardown
from fleet.launch.view import fleet_view

FLAKY = Path(__file__).resolve().parents[1] / "support" / "flaky_server.py"


async def test_control_socket_progress_results_and_errors(tmp_path: Path) -> None:
    async def slow(args: dict, progress) -> dict:
        for step in range(3):
            progress(f"step {step}")
        return {"echo": args["x"]}

    async def broken(args: dict, progress) -> None:
        raise manager_socket.ManagerError("nothing to restart")

    server = manager_socket.ManagerSocket(tmp_path / "c.sock", {"slow": slow, "broken": broken})
    await server.start()
    try:
        assert oct((tmp_path / "c.sock").stat().st_mode & 0o777) == "0o600"
        seen: list[str] = []
        result = await asyncio.to_thread(
            manager_socket.call, tmp_path / "c.sock", "slow", {"x": 7}, seen.append
        )
        assert result == {"echo": 7} and seen == ["step 0", "step 1", "step 2"]
        with pytest.raises(manager_socket.ManagerError, match="nothing to restart"):
            await asyncio.to_thread(manager_socket.call, tmp_path / "c.sock", "broken")
        with pytest.raises(manager_socket.ManagerError, match="unknown operation 'nope'"):
            await asyncio.to_thread(manager_socket.call, tmp_path / "c.sock", "nope")
    finally:
        await server.close()
    assert not (tmp_path / "c.sock").exists()
    with pytest.raises(OSError):
        manager_socket.call(tmp_path / "c.sock", "slow")


def test_state_file_round_trip_is_private(tmp_path: Path) -> None:
    state = FleetState(
        name="t", backend="local", run_dir=str(tmp_path), manager_pid=1, redis_url="redis://x:1/0",
        router_url="http://127.0.0.1:8000", admin_key="sk-admin-x",
        processes=[ProcessRecord("m-0", "replica", 42, "http://127.0.0.1:9", "/l", "m")],
    )  # fmt: skip
    state.save()
    assert oct((tmp_path / "state.json").stat().st_mode & 0o777) == "0o600"
    assert FleetState.load(tmp_path) == state
    FleetState.remove(tmp_path)
    assert FleetState.load(tmp_path) is None


def test_replica_launch_line_is_what_the_replica_parser_accepts() -> None:
    from replica.__main__ import parse_args

    launch = ReplicaLaunch(
        "tiny-1", "tiny", "/models/tiny", "cpu", "redis://h:1/0",
        ["--dtype", "float32", "--kv-cache-tokens", "4096"],
    )  # fmt: skip
    argv = launch.argv("0.0.0.0", 8123, advertise_url="http://10.0.0.5:8123")
    assert argv[:3] == [sys.executable, "-m", "replica"]
    args = parse_args(argv[3:])
    assert (args.model, args.served_model_name, args.replica_id) == (
        "/models/tiny",
        ["tiny"],
        "tiny-1",
    )
    assert (args.host, args.port, args.device) == ("0.0.0.0", 8123, "cpu")
    assert args.redis_url is None and args.advertise_url == "http://10.0.0.5:8123"
    assert launch.environment()["FLEET_REDIS_URL"] == "redis://h:1/0"  # not in argv: `ps` shows it
    assert (args.dtype, args.kv_cache_tokens) == ("float32", 4096)
    auto = ReplicaLaunch("x-0", "x", "/m", "auto", "redis://h:1/0").argv("127.0.0.1", 1)
    assert "--device" not in auto  # the replica picks the device itself


def test_requests_served_counts_generation_routes_only() -> None:
    from prometheus_client import CollectorRegistry, Counter, generate_latest

    registry = CollectorRegistry()
    requests = Counter("fleetserve_requests", "", ["route", "status"], registry=registry)
    requests.labels("/v1/chat/completions", "200").inc(5)
    requests.labels("/v1/completions", "400").inc(2)
    requests.labels("/v1/models", "200").inc(9)
    assert requests_served(generate_latest(registry).decode()) == 7


async def test_status_joins_membership_and_supervision(redis_url: str, tmp_path: Path) -> None:
    client = async_client(redis_url)
    prefix_url = f"http://127.0.0.1:{free_port()}"  # nobody listens: load stays unknown
    info = membership.ReplicaInfo(id="st-0", url=prefix_url, model="m", state="draining")
    try:
        await membership.register_external(client, info)
        status = await collect_status(
            redis_url=redis_url, router_url=None, admin_key=None,
            supervised={
                "st-0": {"url": prefix_url, "state": "ready", "pid": 5, "restarts": 2},
                "st-1": {"url": "http://127.0.0.1:1", "state": "failed", "crash_report": "boom"},
            },
        )  # fmt: skip
    finally:
        await membership.unregister(client, "st-0")
        await client.aclose()
    rows = {r["name"]: r for r in status["replicas"]}
    assert rows["st-0"]["state"] == "draining" and rows["st-0"]["restarts"] == 2
    assert rows["st-0"]["running"] is None
    assert rows["st-1"]["state"] == "failed" and rows["st-1"]["id"] is None
    console = Console(record=True, width=160)
    console.print(fleet_view({**status, "fleet": {"name": "t", "events": ["12:00:00 hi"]}}))
    text = console.export_text()
    assert "st-0" in text and "draining" in text and "boom" in text and "12:00:00 hi" in text


def test_scrape_targets_for_prometheus() -> None:
    records = [
        ProcessRecord("redis", "redis", 1, "redis://127.0.0.1:6379/0"),
        ProcessRecord("router", "router", 2, "http://127.0.0.1:8000"),
        ProcessRecord("m-0", "replica", 3, "http://10.0.0.5:8123", model="m"),
        ProcessRecord("m-1", "replica", None, None, model="m"),  # not placed yet
    ]
    assert scrape_targets("f", records) == [
        {"targets": ["127.0.0.1:8000"], "labels": {"fleet": "f", "component": "router", "replica": "router"}},
        {"targets": ["10.0.0.5:8123"], "labels": {"fleet": "f", "component": "replica", "replica": "m-0", "model": "m"}},
    ]  # fmt: skip


async def test_down_cleans_up_after_a_killed_manager(redis_url: str, tmp_path: Path) -> None:
    """Leftover server groups are ended and their membership entries removed."""
    port = free_port()
    child = ChildProcess(
        ProcessSpec([sys.executable, str(FLAKY), str(port), str(tmp_path), "0", "--grandchild"],
                    tmp_path / "r.log")
    )  # fmt: skip
    await child.start()
    await asyncio.to_thread(wait_for, lambda: (tmp_path / "grandchild").exists(), 20, "the server")
    grandchild = int((tmp_path / "grandchild").read_text())
    url = f"http://127.0.0.1:{port}"
    client = async_client(redis_url)
    lease = membership.MembershipLease(
        membership.ReplicaInfo(id="gone-0", url=url, model="m"), client=client
    )
    await lease.register()
    lease._task.cancel()  # the replica "hangs": its entry stays until its TTL
    state = FleetState(
        name="gone", backend="local", run_dir=str(tmp_path), manager_pid=2**22 + 7,
        redis_url=redis_url, router_url="http://127.0.0.1:1",
        processes=[ProcessRecord("gone-0", "replica", child.pid, url, model="m")],
    )  # fmt: skip
    state.save()
    lines = await asyncio.to_thread(lambda: list(teardown(state, timeout=5)))
    text = "\n".join(lines)
    assert "is gone: cleaning up" in text and "stopping leftover replica gone-0" in text
    assert "removed stale membership entry gone-0" in text
    assert not pid_alive(child.pid) and await asyncio.to_thread(
        wait_for, lambda: not pid_alive(grandchild), 5, "the grandchild to die"
    )
    assert "gone-0" not in {m.id for m in await membership.list_replicas(client)}
    assert FleetState.load(tmp_path) is None
    await client.aclose()
    await child.wait()
    json.dumps(lines)
