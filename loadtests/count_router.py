"""Router cost in instructions per request, counted by valgrind's callgrind: a figure that does not
move with the machine's load, for comparing revisions where `bench_router.py`'s CPU times (±5-10%
between runs on a shared 2-core machine) cannot settle a few percent.

For each revision (its source tree checked out in a temporary git worktree; `HEAD` is the working
tree itself) a router runs under callgrind in front of one fake replica (prefix policy, a static
API key, metrics on). After a warm-up the counters are zeroed (`callgrind_control -z`), N chat
requests are sent at concurrency 64 (non-streamed, or 64-chunk streams with `--stream`), and the
counters are dumped (`callgrind_control -d`): the dump's total over N is the router's instructions
per request. `--keys redis` gives the router an embedded Redis and a fleet key with rpm and tpm
limits instead (the keyed path: admission and settlement), `--keys both` counts each revision
both ways. Everything runs on loopback and ends by itself; callgrind slows the router ~50x.
Callgrind counts the router's own instructions, not the kernel's: a syscall counts as one.

    .venv/bin/python loadtests/count_router.py 11b5f4d HEAD
    .venv/bin/python loadtests/count_router.py 11b5f4d HEAD --stream --requests 500
    .venv/bin/python loadtests/count_router.py HEAD --keys both

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
from dataclasses import dataclass
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


@dataclass
class Auth:
    """How the counted router checks callers: its flags and the secret the load sends."""

    name: str
    flags: list[str]
    secret: str


def wait_health(url: str, timeout: float = 600.0) -> None:
    """Under callgrind a router takes a minute or more to import and start."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=10.0).status_code == 200:
                return
        time.sleep(1.0)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def create_key(redis_url: str) -> str:
    """A fleet key with limits (as bench_overhead.py's): every request is admitted and settled."""
    from fleet.control.keys import KeyStore

    async def make() -> str:
        store = KeyStore(redis_url)
        _, secret = await store.admin.create("count", rpm=10**9, tpm=10**12)
        await store.close()
        return secret

    return asyncio.run(make())


def count(
    tree: Path, fake_url: str, args: argparse.Namespace, workdir: Path, label: str, auth: Auth
) -> tuple[float, float]:
    """Instructions per request of the router from source tree `tree`: gross, and net of what it
    spends idle (timers, probes, Redis upkeep) over as long as the run took. Idle work weighs
    ~50x more under callgrind than in a real run, which takes ~50x less time."""
    port = free_port()
    out = workdir / f"callgrind.{label}"
    cmd = [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p", "--dump-instr=no",
        *router_cmd(port, [fake_url], "prefix", *auth.flags),
    ]  # fmt: skip
    router = spawn(cmd, None, workdir / f"router.{label}.log", tree)

    def control(flag: str) -> None:
        subprocess.run(
            ["callgrind_control", flag, str(router.pid)], check=True, capture_output=True
        )

    try:
        url = f"http://127.0.0.1:{port}"
        wait_health(url + "/health")
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {auth.secret}"}
        target = url + "/v1/chat/completions"
        rng = random.Random(0)
        warmup = chat_bodies(200, args.stream, rng)
        asyncio.run(drive(target, warmup, headers, args.stream, 64, None))
        control("-z")
        idle_started = time.perf_counter()
        time.sleep(args.idle_s)
        control("-d")  # dump 1: idle; a dump also zeroes the counters
        idle_s = time.perf_counter() - idle_started
        counted = chat_bodies(args.requests, args.stream, rng)
        run_started = time.perf_counter()
        run = asyncio.run(drive(target, counted, headers, args.stream, 64, None, 0))
        control("-d")  # dump 2: the run
        run_s = time.perf_counter() - run_started
    finally:
        router.terminate()
        router.wait(60)
    if run.errors:
        raise RuntimeError(f"{label}: {run.errors} requests failed")
    idle, total = (summary(next(workdir.glob(f"callgrind.{label}.*.{n}"))) for n in (1, 2))
    gross = total / len(run.latencies)
    return gross, (total - idle / idle_s * run_s) / len(run.latencies)


def summary(dump: Path) -> int:
    return int(re.search(r"^summary: (\d+)", dump.read_text(), re.M).group(1))  # type: ignore[union-attr]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "revisions", nargs="+", help="git revisions (HEAD: the working tree) or source folders"
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--stream", action="store_true", help="64-chunk streams")
    parser.add_argument(
        "--idle-s", type=float, default=5.0, help="seconds the idle router is counted first"
    )
    parser.add_argument(
        "--keys",
        choices=["static", "redis", "both"],
        default="static",
        help="a static --api-key (default), a fleet key with limits in Redis, or each in turn",
    )
    parser.add_argument(
        "--keep", type=Path, help="keep the callgrind dumps (for callgrind_annotate) in this folder"
    )
    args = parser.parse_args(argv)
    rows: list[tuple[str, float, float]] = []
    with (
        tempfile.TemporaryDirectory(prefix="count-router-") as tmp,
        processes() as started,
        contextlib.ExitStack() as stack,
    ):
        workdir = Path(tmp)
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            workdir = args.keep.resolve()
        auths: list[Auth] = []
        if args.keys in ("static", "both"):
            auths.append(Auth("static key", ["--api-key", KEY], KEY))
        if args.keys in ("redis", "both"):
            from fleet.embedded_redis import EmbeddedRedis

            redis = stack.enter_context(EmbeddedRedis())
            auths.append(Auth("Redis keys", ["--redis-url", redis.url], create_key(redis.url)))
        fake_port = free_port()
        fake_cmd = [PY, "tests/support/fake_replica.py", "--port", str(fake_port), "--chunks", "64"]
        started.append(spawn(fake_cmd, None, workdir / "fake.log"))
        fake_url = f"http://127.0.0.1:{fake_port}"
        wait_ready(fake_url + "/health", started[0])
        for rev in args.revisions:
            with contextlib.ExitStack() as tree_stack:
                if rev == "HEAD" or Path(rev).is_dir():
                    tree = ROOT if rev == "HEAD" else Path(rev).resolve()
                else:
                    tree = tree_stack.enter_context(revision_tree(rev, workdir))
                    assert tree is not None
                for auth in auths:
                    name = rev if len(auths) == 1 else f"{rev} ({auth.name})"
                    label = re.sub(r"\W", "_", name)
                    gross, net = count(tree, fake_url, args, workdir, label, auth)
                    rows.append((name, gross, net))
                    print(f"  {name}: {gross:,.0f} instructions per request, net {net:,.0f}")
    kind = "64-chunk streams" if args.stream else "non-streamed chat"
    print(f"\nRouter instructions per request ({kind}, concurrency 64, {args.requests} requests)")
    print("net: less the router's idle instructions per second times the run's seconds")
    base, net_base = rows[0][1], rows[0][2]
    print(f"{'revision':32s} {'instr/request':>14s} {'vs first':>9s} {'net':>10s} {'vs first':>9s}")
    for name, gross, net in rows:
        print(
            f"{name:32s} {gross:14,.0f} {gross / base - 1:+9.1%} {net:10,.0f} {net / net_base - 1:+9.1%}"
        )


if __name__ == "__main__":
    main()
