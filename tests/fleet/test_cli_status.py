"""`fleet status --json` of a real (router-only) fleet is plain JSON: events without rich markup,
and no command that talks to the fleet's Redis prints redis-py warnings."""

from __future__ import annotations

import json
from pathlib import Path

from fleet_harness import fleet_env, pid_alive, run_cli

from fleet.embedded_redis import free_port


def test_status_json_is_plain_and_down_leaves_nothing(tmp_path: Path, fleet_cache: Path) -> None:
    run_dir, env = tmp_path / "run", fleet_env(fleet_cache)
    up = run_cli("up", "--detach", "--replicas", "0", "--port", str(free_port()),
                 "--run-dir", str(run_dir), env=env, timeout=300)  # fmt: skip
    assert up.code == 0, up.text
    try:
        status = run_cli("status", "--json", "--run-dir", str(run_dir), env=env, timeout=60)
        assert status.code == 0 and status.err == "", status.err
        events = json.loads(status.out)["fleet"]["events"]
        assert any("fleet ready at http://" in e for e in events), events
        assert not any("[green]" in e or "[/]" in e for e in events), events
        pids = [p["pid"] for p in json.loads((run_dir / "state.json").read_text())["processes"]]
    finally:
        down = run_cli("down", "--run-dir", str(run_dir), env=env, timeout=120)
    assert down.code == 0 and "Warning" not in down.err, down.err
    assert not (run_dir / "state.json").exists()
    assert not any(pid_alive(pid) for pid in pids)
