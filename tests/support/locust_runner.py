"""Run the real locustfile headless in a child process and read back what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOCUSTFILE = Path(__file__).resolve().parents[2] / "loadtests" / "locustfile.py"


@dataclass
class LocustRun:
    returncode: int
    output: str
    stats: dict[tuple[str, str], dict[str, Any]]
    records: list[dict[str, Any]]
    summary: dict[str, Any]

    def count(self, kind: str, name: str) -> int:
        return self.stats[(kind, name)]["num_requests"] if (kind, name) in self.stats else 0

    def failures(self) -> int:
        return sum(entry["num_failures"] for entry in self.stats.values())


def run_locust(
    host: str,
    out: Path,
    *args: str,
    seconds: int = 3,
    users: int = 2,
    api_key: str | None = None,
    timeout: float = 90,
) -> LocustRun:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_")}
    env.pop("OPENAI_API_KEY", None)
    if api_key:
        env["OPENAI_API_KEY"] = api_key
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "--host", host, "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--stop-timeout", "10",
        "--json-file", str(out / "locust"), "--results-dir", str(out), "--run-name", "run", *args,
    ]  # fmt: skip
    proc = subprocess.run(
        command, env=env, cwd=out, capture_output=True, text=True, timeout=timeout
    )
    # locust's final stats (its CSVs are rewritten once a second and can miss the last second)
    stats_file = out / "locust.json"
    entries = json.loads(stats_file.read_text()) if stats_file.exists() else []
    stats = {(e["method"], e["name"]): e for e in entries}
    records_file = out / "run.records.jsonl"
    records = (
        [json.loads(line) for line in records_file.read_text().splitlines()]
        if records_file.exists()
        else []
    )
    summary_file = out / "run.summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    return LocustRun(proc.returncode, proc.stdout + proc.stderr, stats, records, summary)
