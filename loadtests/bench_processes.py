"""The processes of the router benchmarks: start them (optionally pinned to CPUs, optionally from
another revision's source tree), wait until they answer, stop them all on the way out."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def split_cpus(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """(router CPUs, everyone else's), or (None, None) unpinned or on a one-CPU machine."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return None, None
    return {cpus[0]}, set(cpus[1:])


def spawn(cmd: list[str], cpus: set[int] | None, log: Path, tree: Path = ROOT) -> subprocess.Popen:
    """Run `cmd` from the source tree `tree` (another revision's worktree for a baseline)."""

    def pin() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)

    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = open(log, "ab")  # noqa: SIM115 - owned by the child
    process = subprocess.Popen(
        cmd, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=pin
    )
    out.close()
    return process


@contextlib.contextmanager
def revision_tree(rev: str | None, workdir: Path) -> Iterator[Path | None]:
    """A temporary git worktree of `rev` (None: no baseline)."""
    if rev is None:
        yield None
        return
    tree = workdir / f"baseline-{rev}"
    git = ["git", "-C", str(ROOT)]
    subprocess.run([*git, "worktree", "add", "--detach", str(tree), rev], check=True)
    try:
        yield tree
    finally:
        subprocess.run([*git, "worktree", "remove", "--force", str(tree)], check=False)


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def free_port() -> int:
    from fleet.embedded_redis import free_port as pick

    return pick()


@contextlib.contextmanager
def processes() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    try:
        yield started
    finally:
        for process in started:
            if process.poll() is None:
                process.terminate()
        for process in started:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def router_cmd(port: int, replicas: list[str], policy: str, *extra: str) -> list[str]:
    cmd = [PY, "-m", "router", "--port", str(port), "--policy", policy, "--log-level", "warning"]
    for url in replicas:
        cmd += ["--replica", url]
    return cmd + list(extra)
