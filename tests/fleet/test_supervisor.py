"""Supervision with real child processes: crash → backoff restart, crash loop → report, clean stop."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fleet.embedded_redis import free_port
from fleet.launch.process import ProcessSpec
from fleet.launch.supervisor import RestartPolicy, Supervisor, SupervisorEvent

FLAKY = Path(__file__).resolve().parents[1] / "support" / "flaky_server.py"
FAST = RestartPolicy(
    max_restarts=2, backoff_initial_s=0.05, backoff_max_s=0.2, ready_timeout_s=20, drain_timeout_s=5
)


def flaky(tmp_path: Path, crashes: int, *extra: str) -> tuple[ProcessSpec, str]:
    port = free_port()
    argv = [sys.executable, str(FLAKY), str(port), str(tmp_path), str(crashes), *extra]
    return ProcessSpec(argv, tmp_path / "server.log"), f"http://127.0.0.1:{port}/health"


def gone(pid: int, within: float = 3.0) -> bool:
    deadline = time.monotonic() + within
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie is dead for our purpose
        return fh.read().split(")")[-1].split()[0] != "Z"


async def test_crash_is_restarted_with_backoff_until_healthy(tmp_path: Path) -> None:
    spec, health = flaky(tmp_path, crashes=2)
    events: list[SupervisorEvent] = []
    sup = Supervisor("flaky", spec, FAST, health_url=health, on_event=events.append)
    sup.start()
    try:
        assert await sup.wait_ready(20)
        assert sup.restarts == 2
        assert (tmp_path / "starts").read_text() == "3"
        assert [e.kind for e in events].count("crashed") == 2
        assert sup.pid == int((tmp_path / "pid").read_text())
    finally:
        await sup.stop()
    assert sup.state == "stopped"


async def test_crash_loop_gives_up_with_log_tail(tmp_path: Path) -> None:
    spec, health = flaky(tmp_path, crashes=100)
    events: list[SupervisorEvent] = []
    sup = Supervisor("doomed", spec, FAST, health_url=health, on_event=events.append)
    await asyncio.wait_for(sup.start(), 20)
    assert sup.state == "failed"
    assert (tmp_path / "starts").read_text() == "3"  # first start + max_restarts
    report = sup.crash_report
    assert report is not None and report.exit_code == 3 and report.crashes == 3
    assert "boom: start 3 failed on purpose" in report.log_tail
    assert "start 2" not in report.log_tail  # only the last run's output
    assert events[-1].kind == "gave_up" and "boom: start 3" in events[-1].detail
    assert not await sup.wait_ready(0.1)


async def test_killed_server_is_restarted_and_stable_run_forgives(tmp_path: Path) -> None:
    spec, health = flaky(tmp_path, crashes=0)
    policy = RestartPolicy(max_restarts=1, backoff_initial_s=0.05, stable_after_s=0.5)
    sup = Supervisor("victim", spec, policy, health_url=health)
    sup.start()
    try:
        for round_ in range(3):  # three crashes, each after a stable run: never gives up
            assert await sup.wait_ready(20)
            await asyncio.sleep(0.6)
            os.kill(sup.pid, signal.SIGKILL)
            await asyncio.sleep(0.05)
            assert await sup.wait_ready(20), f"not restarted after kill {round_ + 1}"
        assert sup.restarts == 3 and sup.crash_report is None
    finally:
        await sup.stop()


async def test_stop_kills_the_whole_process_group(tmp_path: Path) -> None:
    spec, health = flaky(tmp_path, 0, "--grandchild")
    sup = Supervisor("tree", spec, FAST, health_url=health)
    sup.start()
    assert await sup.wait_ready(20)
    server, grandchild = sup.pid, int((tmp_path / "grandchild").read_text())
    assert alive(grandchild)
    await sup.stop()
    assert sup.state == "stopped" and sup.restarts == 0
    assert gone(server) and gone(grandchild)


async def test_planned_restart_counts_no_crash(tmp_path: Path) -> None:
    spec, health = flaky(tmp_path, crashes=0)
    sup = Supervisor("planned", spec, FAST, health_url=health)
    sup.start()
    try:
        assert await sup.wait_ready(20)
        first = sup.pid
        assert await sup.restart(20)
        assert sup.pid != first and gone(first)
        assert sup.restarts == 0 and (tmp_path / "starts").read_text() == "2"
    finally:
        await sup.stop()


def test_server_gets_sigterm_when_its_supervisor_is_killed(tmp_path: Path) -> None:
    """A supervisor killed with SIGKILL leaves no orphan server (parent-death signal)."""
    spec, _ = flaky(tmp_path, crashes=0)
    script = textwrap.dedent(
        f"""
        import asyncio
        from pathlib import Path
        from fleet.launch.process import ChildProcess, ProcessSpec

        async def main():
            child = ChildProcess(ProcessSpec({spec.argv!r}, Path({str(spec.log_path)!r})))
            await child.start()
            await asyncio.sleep(600)

        asyncio.run(main())
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        server = int((tmp_path / "pid").read_text())
        assert alive(server)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5
        while alive(server) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(server)
    finally:
        parent.kill()


@pytest.mark.parametrize("crashes", [1])
async def test_restart_after_give_up_starts_fresh(tmp_path: Path, crashes: int) -> None:
    spec, health = flaky(tmp_path, crashes=3)
    sup = Supervisor(
        "again", spec, RestartPolicy(max_restarts=crashes, backoff_initial_s=0.05), health
    )
    await asyncio.wait_for(sup.start(), 20)
    assert sup.state == "failed"
    try:
        assert await sup.restart(20)  # the operator fixed the cause: a restart is a fresh start
        assert sup.crash_report is None and (tmp_path / "starts").read_text() == "4"
    finally:
        await sup.stop()


async def test_stopping_a_server_still_loading_does_not_wait_the_drain_timeout(
    tmp_path: Path,
) -> None:
    """Ctrl-C while a model loads: nothing is in flight, so a stubborn server is killed quickly."""
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    spec = ProcessSpec([sys.executable, "-c", stubborn], tmp_path / "s.log")
    policy = RestartPolicy(drain_timeout_s=60, ready_timeout_s=600)
    sup = Supervisor("loading", spec, policy, health_url=f"http://127.0.0.1:{free_port()}/health")
    sup.start()
    await asyncio.sleep(1.0)
    assert sup.state == "starting"
    pid = sup.pid
    began = time.monotonic()
    await sup.stop()
    assert time.monotonic() - began < 10 and gone(pid)
