"""A fleet that cannot start (crash report with the replica's log lines, busy port), and the
foreground `fleet up`: Ctrl-C drains and stops, and killing it never leaves an orphan fleet."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fleet_harness import fleet_env, pid_alive, run_cli, wait_for

from fleet.embedded_redis import free_port


@pytest.mark.slow
def test_broken_model_reports_crash_loop_with_log_tail(tmp_path: Path, fleet_cache: Path) -> None:
    run_dir = tmp_path / "run"
    (tmp_path / "no-such-model").mkdir()  # a folder, so `fleet up` starts it: the replica fails
    (tmp_path / "no-such-model" / "config.json").write_text("{}")
    began = time.monotonic()
    up = run_cli(
        "up", "--detach", "--model", str(tmp_path / "no-such-model"), "--replicas", "1",
        "--max-restarts", "1", "--port", str(free_port()), "--run-dir", str(run_dir),
        env=fleet_env(fleet_cache), timeout=300,
    )  # fmt: skip
    print(f"failed start reported after {time.monotonic() - began:.1f}s")
    assert up.code == 1
    assert "the fleet did not start" in up.err
    assert "no-such-model-0 crashed 2 times in a row" in up.err
    assert "Last lines of its log" in up.err and "model_type '' is not supported" in up.err
    assert not (run_dir / "state.json").exists()
    assert (run_dir / "startup-error.txt").exists()
    log = (run_dir / "logs" / "no-such-model-0.log").read_text()
    assert log.count(" start: ") == 2
    status = run_cli("status", "--run-dir", str(run_dir), env=fleet_env(fleet_cache))
    assert status.code == 1 and "no fleet is running" in status.err


def test_port_in_use_is_a_clear_error(tmp_path: Path, fleet_cache: Path) -> None:
    """The router's port is taken: fleet up says so quickly instead of waiting on replicas."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        up = run_cli(
            "up", "--detach", "--port", str(port), "--run-dir", str(tmp_path / "run"),
            env=fleet_env(fleet_cache), timeout=120,
        )  # fmt: skip
    assert up.code == 2  # a usage error: the flag's value cannot work
    assert f"port {port}" in up.err and "in use" in up.err
    assert not (tmp_path / "run" / "state.json").exists()


def _foreground_up(run_dir: Path, cache: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fleet", "up", "--replicas", "1", "--port", str(free_port()),
         "--run-dir", str(run_dir)],
        env=fleet_env(cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _ready_state(run_dir: Path) -> dict:
    def ready() -> dict | None:
        path = run_dir / "state.json"
        state = json.loads(path.read_text()) if path.exists() else {}
        return state if state.get("phase") == "ready" else None

    return wait_for(ready, 300, "the foreground fleet to be ready")


@pytest.mark.slow
def test_foreground_up_ctrl_c_drains_and_stops(tmp_path: Path, fleet_cache: Path) -> None:
    run_dir = tmp_path / "run"
    up = _foreground_up(run_dir, fleet_cache)
    assert up.stdout is not None
    seen = ""
    for line in up.stdout:  # what the user sees, up to the hint (the test's timeout guards this)
        seen += line
        if "Ctrl-C drains and stops the fleet" in line:
            break
    state = _ready_state(run_dir)
    pids = [state["manager_pid"], *(p["pid"] for p in state["processes"])]
    up.send_signal(signal.SIGINT)
    out, _ = up.communicate(timeout=120)
    assert up.returncode == 0, seen + out
    assert "fleet ready" in seen and state["example_key"] in seen
    assert "fleet stopped" in out
    assert [pid for pid in pids if pid_alive(pid)] == []
    assert not (run_dir / "state.json").exists()


@pytest.mark.slow
def test_fleet_stops_when_its_foreground_up_is_killed(tmp_path: Path, fleet_cache: Path) -> None:
    """A closed terminal or kill -9 of `fleet up` must not leave an orphan fleet running."""
    run_dir = tmp_path / "run"
    up = _foreground_up(run_dir, fleet_cache)
    state = _ready_state(run_dir)
    pids = [state["manager_pid"], *(p["pid"] for p in state["processes"])]
    up.kill()
    up.communicate()
    wait_for(lambda: not any(pid_alive(pid) for pid in pids), 120, "the fleet to stop by itself")
    assert not (run_dir / "state.json").exists()
