"""Router cost in instructions per request, counted by valgrind's callgrind: a figure that does not
move with the machine's load, for comparing revisions where `bench_router.py`'s CPU times (±5-10%
between runs on a shared 2-core machine) cannot settle a few percent.

For each revision (its source tree checked out in a temporary git worktree; `HEAD` is the working
tree itself) a router runs under callgrind in front of one fake replica (prefix policy, a static
API key, metrics on). After a warm-up the counters are zeroed (`callgrind_control -z`), N chat
requests are sent at concurrency 64 (non-streamed, or 64-chunk streams with `--stream`), and the
counters are dumped (`callgrind_control -d`): the dump's total over N is the router's instructions
per request. Everything runs on loopback and ends by itself; callgrind slows the router ~50x.

    .venv/bin/python loadtests/count_router.py 11b5f4d HEAD
    .venv/bin/python loadtests/count_router.py 11b5f4d HEAD --stream --requests 500

A revision may also be a folder holding a source tree (e.g. a worktree with one change undone).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import chat_bodies, drive
from bench_processes import (
    PY,
    ROOT,
    free_port,
    processes,
    revision_tree,
    router_cmd,
    spawn,
    wait_ready,
)

KEY = "sk-static-count"


def wait_health(url: str, timeout: float = 600.0) -> None:
    """Under callgrind a router takes a minute or more to import and start."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=10.0).status_code == 200:
                return
        time.sleep(1.0)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def count(tree: Path, fake_url: str, args: argparse.Namespace, workdir: Path, label: str) -> float:
    """Instructions per request of the router from source tree `tree`."""
    port = free_port()
    out = workdir / f"callgrind.{label}"
    cmd = [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p", "--dump-instr=no",
        *router_cmd(port, [fake_url], "prefix", "--api-key", KEY),
    ]  # fmt: skip
    router = spawn(cmd, None, workdir / f"router.{label}.log", tree)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_health(url + "/health")
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
        target = url + "/v1/chat/completions"
        rng = random.Random(0)
        warmup = chat_bodies(200, args.stream, rng)
        asyncio.run(drive(target, warmup, headers, args.stream, 64, None))
        subprocess.run(
            ["callgrind_control", "-z", str(router.pid)], check=True, capture_output=True
        )
        counted = chat_bodies(args.requests, args.stream, rng)
        run = asyncio.run(drive(target, counted, headers, args.stream, 64, None, 0))
        subprocess.run(
            ["callgrind_control", "-d", str(router.pid)], check=True, capture_output=True
        )
    finally:
        router.terminate()
        router.wait(60)
    if run.errors:
        raise RuntimeError(f"{label}: {run.errors} requests failed")
    dump = next(workdir.glob(f"callgrind.{label}.*.1"))
    total = int(re.search(r"^summary: (\d+)", dump.read_text(), re.M).group(1))  # type: ignore[union-attr]
    return total / len(run.latencies)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "revisions", nargs="+", help="git revisions (HEAD: the working tree) or source folders"
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--stream", action="store_true", help="64-chunk streams")
    args = parser.parse_args(argv)
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="count-router-") as tmp, processes() as started:
        workdir = Path(tmp)
        fake_port = free_port()
        fake_cmd = [PY, "tests/support/fake_replica.py", "--port", str(fake_port), "--chunks", "64"]
        started.append(spawn(fake_cmd, None, workdir / "fake.log"))
        fake_url = f"http://127.0.0.1:{fake_port}"
        wait_ready(fake_url + "/health", started[0])
        for rev in args.revisions:
            label = re.sub(r"\W", "_", rev)
            if rev == "HEAD" or Path(rev).is_dir():
                tree = ROOT if rev == "HEAD" else Path(rev).resolve()
                per_request = count(tree, fake_url, args, workdir, label)
            else:
                with revision_tree(rev, workdir) as tree:
                    assert tree is not None
                    per_request = count(tree, fake_url, args, workdir, label)
            rows.append((rev, per_request))
            print(f"  {rev}: {per_request:,.0f} instructions per request", flush=True)
    kind = "64-chunk streams" if args.stream else "non-streamed chat"
    print(f"\nRouter instructions per request ({kind}, concurrency 64, {args.requests} requests)")
    base = rows[0][1]
    print(f"{'revision':24s} {'instr/request':>14s} {'vs first':>9s}")
    for rev, value in rows:
        print(f"{rev:24s} {value:14,.0f} {value / base - 1:+9.1%}")


if __name__ == "__main__":
    main()
