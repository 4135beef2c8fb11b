"""What a user sees when a fleet cannot start: the crash report with the replica's own log lines,
and nothing left running."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fleet_harness import fleet_env, run_cli

from fleet.embedded_redis import free_port


@pytest.mark.slow
def test_broken_model_reports_crash_loop_with_log_tail(tmp_path: Path, fleet_cache: Path) -> None:
    run_dir = tmp_path / "run"
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
    assert "Last lines of its log" in up.err and "-m replica --model" in up.err
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
    assert up.code == 1
    assert f"port {port}" in up.err and "in use" in up.err
    assert not (tmp_path / "run" / "state.json").exists()
