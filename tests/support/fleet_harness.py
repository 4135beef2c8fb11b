"""Driving the real `fleet` CLI as a subprocess in tests, against a run folder of the test's own."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


@dataclass
class RunningFleet:
    """A detached fleet started by `fleet up --detach`, and how to drive it with the CLI."""

    run_dir: Path
    env: dict[str, str]
    up: CliResult

    def cli(self, *args: str, timeout: float = 300) -> CliResult:
        return run_cli(*args, "--run-dir", str(self.run_dir), env=self.env, timeout=timeout)

    @property
    def state(self) -> dict:
        return json.loads((self.run_dir / "state.json").read_text())

    @property
    def router_url(self) -> str:
        return self.state["router_url"]

    @property
    def key(self) -> str:
        return self.state["example_key"]

    def status(self) -> dict:
        result = self.cli("status", "--json", timeout=60)
        assert result.code == 0, result.text
        return json.loads(result.out)

    @functools.cached_property
    def model(self) -> str:
        return self.status()["replicas"][0]["model"]

    def chat(self, content: str = "Hello!", max_tokens: int = 8) -> dict:
        response = httpx.post(
            f"{self.router_url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {self.key}"},
            json={
                "model": self.model,
                "messages": [{"role": "user", "content": content}],
                "max_tokens": max_tokens,
            },
            timeout=60,
        )
        assert response.status_code == 200, response.text
        return response.json()


def run_cli(*args: str, env: dict[str, str], timeout: float = 300) -> CliResult:
    proc = subprocess.run(
        [sys.executable, "-m", "fleet", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def fleet_env(cache: Path) -> dict[str, str]:
    """Our environment, with the model cache in the test's folder and wide rich output."""
    return {**os.environ, "XDG_CACHE_HOME": str(cache), "COLUMNS": "200", "FLEET_HOME": ""}


def wait_for(predicate: Callable[[], object], timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def pid_alive(pid: int | None) -> bool:
    from fleet.launch.state import pid_alive as alive

    return alive(pid)
