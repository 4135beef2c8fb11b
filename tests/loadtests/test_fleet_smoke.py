"""CI smoke run: `fleet bench --up` starts a real local fleet (two tiny-model CPU replicas behind
the router, API keys on), runs headless locust against it for a few seconds and stops the fleet."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bench_up_two_replica_fleet_records_every_metric_without_failures(tmp_path: Path) -> None:
    results, fleet_dir = tmp_path / "results", tmp_path / "fleet"
    command = [
        sys.executable, "-m", "fleet", "bench", "--up", "--up-args", "--replicas 2", "--fleet-dir", str(fleet_dir),
        "--duration", "6s", "--users", "4", "--results-dir", str(results),
        "--output-len", "16", "--prompt-len", "64", "--goodput", "ttft:60000",
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Serving Benchmark Result" in proc.stdout

    stats = {
        (e["method"], e["name"]): e
        for e in json.loads((results / "random-chat.locust.json").read_text())
    }
    requests = stats[("POST", "/v1/chat/completions")]["num_requests"]
    assert requests >= 4
    assert sum(e["num_failures"] for e in stats.values()) == 0
    for metric in ("TTFT", "TPOT", "E2E"):
        assert stats[(metric, "chat random")]["num_requests"] == requests, metric
    assert stats[("ITL", "chat random")]["num_requests"] >= requests

    summary = json.loads((results / "random-chat.summary.json").read_text())
    assert summary["completed"] == requests and summary["failed"] == 0
    assert summary["total_output_tokens"] == 16 * requests  # ignore_eos + min_tokens honoured
    assert summary["good_requests"] == requests
    records = (results / "random-chat.records.jsonl").read_text().splitlines()
    assert len(records) == requests
    assert (results / "random-chat.png").stat().st_size > 1000
    assert not (fleet_dir / "state.json").exists()  # fleet down ran and stopped everything
