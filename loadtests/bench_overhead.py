"""Router benchmark, part 1: what the router costs (run it through bench_router.py).

Fake replicas (tests/support/fake_replica.py, answering instantly) get the same requests directly and
through `python -m router` (prefix policy, metrics on, auth on: once with the control plane's
Redis KeyStore, once with a static key), and through loadtests/bare_proxy.py (HTTP in and out and
nothing else: the floor), at concurrency 1 and 64, non-streaming and 64-chunk streams. The bare
proxy also runs in the variants the router chose against (`--bare`: a task per request, uvicorn
instead of our server, aiohttp or httpx instead of our client), same replicas, same load. Reports
p50/p99 latency, the latency the router adds, requests per second, and the router process's CPU
time per request (psutil on its pid: the steadiest figure on a shared machine), also net of the
CPU it burns idle (probes, timers), sampled before each run. `--baseline REV` also runs the
routers of git revision REV (checked out in a temporary worktree) in the same run, so a change's
cost shows as a ratio against its parent rather than against numbers from another day.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench_load import IDLE_SAMPLE_S, Run, chat_bodies, drive
from bench_plot import Panel
from bench_processes import (
    PY,
    ROOT,
    free_port,
    processes,
    revision_tree,
    router_cmd,
    spawn,
    split_cpus,
    wait_ready,
)

STATIC_KEY = "sk-static-bench"
# bare_proxy.py variants: (row label, flags). The floor is the router's own server and client.
BARE_VARIANTS: dict[str, tuple[str, list[str]]] = {
    "floor": ("bare proxy (floor)", []),
    "task": ("bare: task/request", ["--task-per-request"]),
    "uvicorn": ("bare: uvicorn server", ["--server", "uvicorn"]),
    "aiohttp": ("bare: aiohttp client", ["--client", "aiohttp"]),
    "httpx": ("bare: httpx client", ["--client", "httpx"]),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("overhead")
    group.add_argument("--rounds", type=int, default=2, help="overhead: repeats (medians reported)")
    group.add_argument(
        "--baseline",
        metavar="REV",
        help="overhead: also run the routers of this git revision, side by side",
    )
    group.add_argument("--requests-c1", type=int, default=600)
    group.add_argument("--requests-c64", type=int, default=4000)
    group.add_argument("--stream-requests-c1", type=int, default=300)
    group.add_argument("--stream-requests-c64", type=int, default=1000)
    group.add_argument(
        "--bare",
        nargs="+",
        choices=list(BARE_VARIANTS),
        default=list(BARE_VARIANTS),
        help="bare-proxy variants to run (default: all; `floor` alone is the plain floor)",
    )
    group.add_argument(
        "--idle-sample-s",
        type=float,
        default=IDLE_SAMPLE_S,
        help="seconds each target's idle CPU is sampled before each run",
    )


@dataclass
class OverheadRow:
    scenario: str
    target: str
    p50_ms: float
    p99_ms: float
    rps: float
    cpu_us: float | None
    net_cpu_us: float | None
    added_p50_ms: float | None = None
    added_p99_ms: float | None = None


def create_key(redis_url: str) -> str:
    from fleet.control.keys import KeyStore

    async def make() -> str:
        store = KeyStore(redis_url)
        _, secret = await store.admin.create("bench", rpm=10**9, tpm=10**12)
        await store.close()
        return secret

    return asyncio.run(make())


@dataclass
class Target:
    """Where the load goes; `pid` is the process whose CPU is measured (None: not measured)."""

    label: str
    url: str
    headers: dict[str, str]
    pid: int | None


@dataclass
class Server:
    """A process to start in front of the fake replicas."""

    label: str
    cmd: Callable[[int], list[str]]  # its command line, given its port
    headers: dict[str, str]
    tree: Path = ROOT  # the source tree it runs from


def bare_servers(names: list[str], fakes: list[str]) -> list[Server]:
    """bare_proxy.py in the variants `names` (keys of BARE_VARIANTS)."""
    replicas = [a for url in fakes for a in ("--replica", url)]

    def command(flags: list[str]) -> Callable[[int], list[str]]:
        return lambda port: [PY, "loadtests/bare_proxy.py", "--port", str(port), *replicas, *flags]

    variants = [BARE_VARIANTS[name] for name in names]
    return [Server(label, command(flags), {}) for label, flags in variants]


def router_servers(
    fakes: list[str], redis_url: str, secret: str, tree: Path = ROOT, rev: str | None = None
) -> list[Server]:
    """The router with Redis keys and with a static key (from another revision's `tree`)."""

    def keys_router(port: int) -> list[str]:
        return router_cmd(port, fakes, "prefix", "--redis-url", redis_url)

    def static_router(port: int) -> list[str]:
        return router_cmd(port, fakes, "prefix", "--api-key", STATIC_KEY)

    keyed = {"Authorization": f"Bearer {secret}"}
    static = {"Authorization": f"Bearer {STATIC_KEY}"}
    if rev is None:
        return [
            Server("router (Redis keys)", keys_router, keyed),
            Server("router (static key)", static_router, static),
        ]
    return [
        Server(f"keys @{rev[:8]}", keys_router, keyed, tree),
        Server(f"static @{rev[:8]}", static_router, static, tree),
    ]


def start_fakes(started: list[subprocess.Popen], cpus: set[int] | None, workdir: Path) -> list[str]:
    """Two fake replicas answering 64-chunk streams; their URLs once they answer."""
    fakes: list[tuple[str, subprocess.Popen]] = []
    for i in range(2):
        port = free_port()
        cmd = [
            PY,
            "tests/support/fake_replica.py",
            "--port",
            str(port),
            "--chunks",
            "64",
            "--id",
            f"f{i}",
        ]
        fakes.append((f"http://127.0.0.1:{port}", spawn(cmd, cpus, workdir / f"fake{i}.log")))
        started.append(fakes[-1][1])
    for url, process in fakes:
        wait_ready(url + "/health", process)
    return [url for url, _ in fakes]


def start_servers(
    started: list[subprocess.Popen], todo: list[Server], cpus: set[int] | None, workdir: Path
) -> list[Target]:
    """Start every server at once, then wait until each answers."""
    targets = []
    for server in todo:
        port = free_port()
        log = workdir / (re.sub(r"\W+", "-", server.label).strip("-") + ".log")
        process = spawn(server.cmd(port), cpus, log, server.tree)
        started.append(process)
        targets.append(
            Target(server.label, f"http://127.0.0.1:{port}", server.headers, process.pid)
        )
    for target, process in zip(targets, started[-len(targets) :], strict=True):
        wait_ready(target.url + "/health", process)
    return targets


def overhead(args: argparse.Namespace, workdir: Path) -> list[OverheadRow]:
    from fleet.embedded_redis import EmbeddedRedis

    router_cpus, other_cpus = split_cpus(args.pin)
    rows: list[OverheadRow] = []
    with (
        EmbeddedRedis() as redis,
        revision_tree(args.baseline, workdir) as baseline,
        processes() as started,
    ):
        secret = create_key(redis.url)
        fakes = start_fakes(started, other_cpus, workdir)
        # The floor first, then the routers (and the baseline's), then the other bare variants.
        floor = [name for name in args.bare if name == "floor"]
        todo = bare_servers(floor, fakes) + router_servers(fakes, redis.url, secret)
        if baseline is not None:
            todo += router_servers(fakes, redis.url, secret, baseline, args.baseline)
        todo += bare_servers([name for name in args.bare if name != "floor"], fakes)
        targets = [Target("direct", fakes[0], {}, None)]
        targets += start_servers(started, todo, router_cpus, workdir)
        rng = random.Random(0)
        scenarios = [
            ("non-stream c=1", False, 1, args.requests_c1),
            ("non-stream c=64", False, 64, args.requests_c64),
            ("stream 64 chunks c=1", True, 1, args.stream_requests_c1),
            ("stream 64 chunks c=64", True, 64, args.stream_requests_c64),
        ]
        for name, stream, concurrency, count in scenarios:
            if count:
                bodies = chat_bodies(count, stream, rng)
                runs = measure(targets, bodies, stream, concurrency, args)
                rows += summarize(name, targets, runs)
    return rows


def measure(
    targets: list[Target], bodies: list[bytes], stream: bool, concurrency: int, args
) -> dict[str, list[Run]]:
    """`args.rounds` runs per target, targets taking turns within each round."""
    runs: dict[str, list[Run]] = {t.label: [] for t in targets}
    for _ in range(args.rounds):
        for target in targets:
            headers = {"Content-Type": "application/json", **target.headers}
            url = target.url + "/v1/chat/completions"
            run = drive(url, bodies, headers, stream, concurrency, target.pid,
                        idle_sample_s=args.idle_sample_s)  # fmt: skip
            runs[target.label].append(asyncio.run(run))
    return runs


def summarize(
    scenario: str, targets: list[Target], runs: dict[str, list[Run]]
) -> list[OverheadRow]:
    """Medians over rounds; the latency each target adds over going direct."""
    direct = runs["direct"]
    direct_p50 = statistics.median(r.pct(r.latencies, 0.5) for r in direct) * 1e3
    direct_p99 = statistics.median(r.pct(r.latencies, 0.99) for r in direct) * 1e3
    rows = []
    for target in targets:
        mine = runs[target.label]
        p50 = statistics.median(r.pct(r.latencies, 0.5) for r in mine) * 1e3
        p99 = statistics.median(r.pct(r.latencies, 0.99) for r in mine) * 1e3
        rps = statistics.median(len(r.latencies) / r.seconds for r in mine)
        cpu = statistics.median(r.cpu_per_request(net=False) for r in mine) * 1e6
        net_cpu = statistics.median(r.cpu_per_request(net=True) for r in mine) * 1e6
        errors = sum(r.errors for r in mine)
        if errors:
            print(f"  ! {target.label} {scenario}: {errors} failed requests", flush=True)
        measured = target.pid is not None
        row = OverheadRow(
            scenario, target.label, p50, p99, rps, cpu if measured else None,
            net_cpu if measured else None,
        )  # fmt: skip
        if measured:
            row.added_p50_ms = p50 - direct_p50
            row.added_p99_ms = p99 - direct_p99
        rows.append(row)
        print(
            f"  {scenario:22s} {target.label:20s} p50 {p50:7.2f} ms  cpu/req {row.cpu_us or 0:6.0f} us",
            flush=True,
        )
    return rows


def print_overhead(rows: list[OverheadRow]) -> None:
    print("\nRouter overhead (fake replicas answering instantly)")
    print("CPU = router process CPU per request; net = minus its idle rate (probes, timers)")
    head = f"{'scenario':24s} {'target':20s} {'p50 ms':>8s} {'p99 ms':>8s} {'+p50 ms':>8s} {'+p99 ms':>8s} {'req/s':>8s} {'CPU us/req':>11s} {'net us/req':>11s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        added50 = f"{r.added_p50_ms:8.2f}" if r.added_p50_ms is not None else f"{'':8s}"
        added99 = f"{r.added_p99_ms:8.2f}" if r.added_p99_ms is not None else f"{'':8s}"
        cpu = f"{r.cpu_us:11.0f}" if r.cpu_us is not None else f"{'':11s}"
        net = f"{r.net_cpu_us:11.0f}" if r.net_cpu_us is not None else f"{'':11s}"
        print(
            f"{r.scenario:24s} {r.target:20s} {r.p50_ms:8.2f} {r.p99_ms:8.2f} {added50} {added99} "
            f"{r.rps:8.0f} {cpu} {net}"
        )


def overhead_panels(rows: list[OverheadRow]) -> list[Panel]:
    routed = [r for r in rows if r.cpu_us is not None]
    if not routed:
        return []
    scenarios = list(dict.fromkeys(r.scenario for r in routed))
    targets = list(dict.fromkeys(r.target for r in routed))
    by = {(r.scenario, r.target): r for r in routed}
    cpu = {t: [by[s, t].net_cpu_us or 0.0 for s in scenarios] for t in targets}
    added = {t: [by[s, t].added_p50_ms or 0.0 for s in scenarios] for t in targets}
    return [
        Panel("router CPU per request, net of idle (µs)", scenarios, cpu, slanted=True),
        Panel("added p50 latency (ms)", scenarios, added, slanted=True),
    ]
