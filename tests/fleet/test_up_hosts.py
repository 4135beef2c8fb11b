"""`fleet up --hosts` end to end: SSH, Ray's cluster launcher (`ray up`), Ray Client, one replica
placed on each host, the router, a chat answer; then `fleet down` leaves no process on any host.

The two hosts are network namespaces on this machine, each with its own sshd as the first process
of its own PID namespace (tests/support/ssh_hosts.py), so every process a host runs can be counted.
They share this machine's files, as hosts with fleetserve installed at the same path would. Each
host offers one logical GPU (`--num-gpus=1`: replicas run on CPU with a tiny model), so
`replicas: auto` places one replica per host.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from fleet_harness import RunningFleet, fleet_env, run_cli
from ssh_hosts import SshHosts, ssh_hosts

from fleet.embedded_redis import free_port

pytest.importorskip("ray", reason="`fleet up --hosts` needs the 'ray' extra")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

RAY_ARGS = "[--num-cpus=1, --num-gpus=1, --object-store-memory=100000000]"


def _local_leftovers(folder: Path, hosts: SshHosts) -> list[str]:
    """Processes of this machine (not of the hosts) whose command line names the test's folder or
    the hosts' key: the fleet's manager and Redis, `ray up`, the SSH connections Ray shares."""
    ours = os.readlink("/proc/self/ns/pid")
    servers = {h.server.pid for h in hosts.hosts} | {os.getpid()}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in servers:
            continue
        try:
            if os.readlink(entry / "ns" / "pid") != ours:
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(folder) in cmdline or str(hosts.key) in cmdline:
            found.append(f"{entry.name}: {cmdline.strip()}")
    return found


def _logs(run_dir: Path) -> str:
    tails = []
    for name in ("manager.log", "ray-cluster.log"):
        path = run_dir / "logs" / name
        if path.exists():
            tails.append(f"--- {name}\n" + "\n".join(path.read_text().splitlines()[-40:]))
    return "\n".join(tails)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshHosts]:
    with ssh_hosts(2, tmp_path_factory.mktemp("hosts")) as made:
        yield made


def _up(hosts: SshHosts, run_dir: Path, env: dict[str, str], model: Path) -> RunningFleet:
    up = run_cli(
        "up", "--detach", "--hosts", ",".join(hosts.addresses), "--ssh-user", "root",
        "--ssh-key", str(hosts.key), "--model", str(model), "--device", "cpu",
        "--name", "hosts-ci", "--port", str(free_port()), "--run-dir", str(run_dir),
        "--set", f"hosts.ray_args={RAY_ARGS}",
        env=env, timeout=600,
    )  # fmt: skip
    assert up.code == 0, up.text + _logs(run_dir)
    return RunningFleet(run_dir, env, up)


def _nothing_left(hosts: SshHosts, folder: Path) -> None:
    _wait_until_none(lambda: [p for h in hosts.hosts for p in h.processes()], "on the hosts")
    _wait_until_none(lambda: _local_leftovers(folder, hosts), "on this machine")


def test_up_hosts_serves_a_chat_and_down_leaves_nothing(
    hosts: SshHosts, tmp_path: Path, fleet_cache: Path, tiny_model: Path
) -> None:
    env = fleet_env(fleet_cache)
    run_dir = tmp_path / "run"
    began = time.monotonic()
    try:
        fleet = _up(hosts, run_dir, env, tiny_model)
        answer = fleet.chat()
        first_answer = time.monotonic() - began
        assert answer["choices"][0]["message"]["role"] == "assistant"
        assert answer["usage"]["completion_tokens"] >= 1
        rows = fleet.status()["replicas"]
        assert {r["state"] for r in rows} == {"ready"}, rows
        placed = sorted(str(urlsplit(r["url"]).hostname) for r in rows)
        assert placed == hosts.addresses, rows  # one replica on each host
        for host in hosts.hosts:
            running = " ".join(host.processes())
            assert "raylet" in running and "replica" in running, running
        print(
            f"\nfleet up --hosts {','.join(hosts.addresses)}: first chat answer "
            f"{first_answer:.1f}s after `fleet up` began (replicas on {placed})"
        )
        began = time.monotonic()
        down = fleet.cli("down")
        assert down.code == 0, down.text
        assert not (run_dir / "state.json").exists()
        for host in hosts.hosts:
            assert f"stopped Ray on {host.address}" in _logs(run_dir)
        _nothing_left(hosts, tmp_path)
        print(f"fleet down: nothing left on any host after {time.monotonic() - began:.1f}s")
    finally:
        if (run_dir / "state.json").exists():
            run_cli("down", "--run-dir", str(run_dir), env=env, timeout=300)


def test_down_after_the_manager_was_killed_leaves_nothing(
    hosts: SshHosts, tmp_path: Path, fleet_cache: Path, tiny_model: Path
) -> None:
    """`fleet down` cleans up from the state file alone: actors, then Ray on every host."""
    env = fleet_env(fleet_cache)
    run_dir = tmp_path / "run"
    try:
        fleet = _up(hosts, run_dir, env, tiny_model)
        assert fleet.chat()["usage"]["completion_tokens"] >= 1
        os.kill(fleet.state["manager_pid"], signal.SIGKILL)
        began = time.monotonic()
        down = fleet.cli("down")
        assert down.code == 0, down.text
        assert "is gone: cleaning up after it" in down.out
        for host in hosts.hosts:
            assert f"stopped Ray on {host.address}" in down.out, down.out
        _nothing_left(hosts, tmp_path)
        print(f"\nfleet down after kill -9 of the manager: nothing left after "
              f"{time.monotonic() - began:.1f}s")  # fmt: skip
    finally:
        if (run_dir / "state.json").exists():
            run_cli("down", "--run-dir", str(run_dir), env=env, timeout=300)


def _wait_until_none(processes: Callable[[], list[str]], where: str, timeout: float = 30) -> None:
    """Until `processes` is empty (SSH connections Ray shares linger 10 s after their last use)."""
    deadline = time.monotonic() + timeout
    while (left := processes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"left running {where} after `fleet down`:\n" + "\n".join(left)
