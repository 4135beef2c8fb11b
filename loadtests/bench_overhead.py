"""Router benchmark, part 1: what the router costs (run it through bench_router.py).

Fake replicas (loadtests/fake_replica.py, answering instantly) get the same requests directly and
through `python -m router` (prefix policy, metrics on, auth on: once with the control plane's
Redis KeyStore, once with a static key), and through loadtests/bare_proxy.py (HTTP in and out and
nothing else: the floor), at concurrency 1 and 64, non-streaming and 64-chunk streams. Reports
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
import statistics
from dataclasses import dataclass
from pathlib import Path

from bench_load import Run, chat_bodies, drive
from bench_plot import Panel
from bench_processes import (
    PY,
    free_port,
    processes,
    revision_tree,
    router_cmd,
    spawn,
    split_cpus,
    wait_ready,
)


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
        fakes = []
        for i in range(2):
            port = free_port()
            cmd = [
                PY,
                "loadtests/fake_replica.py",
                "--port",
                str(port),
                "--chunks",
                "64",
                "--id",
                f"f{i}",
            ]
            started.append(spawn(cmd, other_cpus, workdir / f"fake{i}.log"))
            fakes.append(f"http://127.0.0.1:{port}")
        for url, process in zip(fakes, started, strict=True):
            wait_ready(url + "/health", process)
        keyed_port, static_port = free_port(), free_port()
        keyed = spawn(
            router_cmd(keyed_port, fakes, "prefix", "--redis-url", redis.url),
            router_cpus, workdir / "router-keystore.log",
        )  # fmt: skip
        static = spawn(
            router_cmd(static_port, fakes, "prefix", "--api-key", "sk-static-bench"),
            router_cpus, workdir / "router-static.log",
        )  # fmt: skip
        bare_port = free_port()
        bare_cmd = [PY, "loadtests/bare_proxy.py", "--port", str(bare_port)]
        bare = spawn(
            bare_cmd + [a for url in fakes for a in ("--replica", url)],
            router_cpus, workdir / "bare-proxy.log",
        )  # fmt: skip
        started += [keyed, static, bare]
        wait_ready(f"http://127.0.0.1:{keyed_port}/health", keyed)
        wait_ready(f"http://127.0.0.1:{static_port}/health", static)
        wait_ready(f"http://127.0.0.1:{bare_port}/health", bare)
        targets = [
            ("direct", fakes[0], {}, None),
            ("bare proxy (floor)", f"http://127.0.0.1:{bare_port}", {}, bare.pid),
            ("router (Redis keys)", f"http://127.0.0.1:{keyed_port}", {"Authorization": f"Bearer {secret}"}, keyed.pid),
            ("router (static key)", f"http://127.0.0.1:{static_port}", {"Authorization": "Bearer sk-static-bench"}, static.pid),
        ]  # fmt: skip
        if baseline is not None:
            old_keyed_port, old_static_port = free_port(), free_port()
            old_keyed = spawn(
                router_cmd(old_keyed_port, fakes, "prefix", "--redis-url", redis.url),
                router_cpus, workdir / "router-keystore-baseline.log", baseline,
            )  # fmt: skip
            old_static = spawn(
                router_cmd(old_static_port, fakes, "prefix", "--api-key", "sk-static-bench"),
                router_cpus, workdir / "router-static-baseline.log", baseline,
            )  # fmt: skip
            started += [old_keyed, old_static]
            wait_ready(f"http://127.0.0.1:{old_keyed_port}/health", old_keyed)
            wait_ready(f"http://127.0.0.1:{old_static_port}/health", old_static)
            rev = args.baseline[:8]
            targets += [
                (f"keys @{rev}", f"http://127.0.0.1:{old_keyed_port}", {"Authorization": f"Bearer {secret}"}, old_keyed.pid),
                (f"static @{rev}", f"http://127.0.0.1:{old_static_port}", {"Authorization": "Bearer sk-static-bench"}, old_static.pid),
            ]  # fmt: skip
        rng = random.Random(0)
        scenarios = [
            ("non-stream c=1", False, 1, args.requests_c1),
            ("non-stream c=64", False, 64, args.requests_c64),
            ("stream 64 chunks c=1", True, 1, args.stream_requests_c1),
            ("stream 64 chunks c=64", True, 64, args.stream_requests_c64),
        ]
        for name, stream, concurrency, count in scenarios:
            bodies = chat_bodies(count, stream, rng)
            per_target: dict[str, list[Run]] = {t[0]: [] for t in targets}
            for _ in range(args.rounds):
                for label, base, headers, pid in targets:
                    headers = {"Content-Type": "application/json", **headers}
                    run = asyncio.run(
                        drive(
                            base + "/v1/chat/completions", bodies, headers, stream, concurrency, pid
                        )
                    )
                    per_target[label].append(run)
            direct = per_target["direct"]
            direct_p50 = statistics.median(r.pct(r.latencies, 0.5) for r in direct) * 1e3
            direct_p99 = statistics.median(r.pct(r.latencies, 0.99) for r in direct) * 1e3
            for label, _base, _headers, pid in targets:
                runs = per_target[label]
                p50 = statistics.median(r.pct(r.latencies, 0.5) for r in runs) * 1e3
                p99 = statistics.median(r.pct(r.latencies, 0.99) for r in runs) * 1e3
                rps = statistics.median(len(r.latencies) / r.seconds for r in runs)
                cpu = statistics.median(r.cpu_per_request(net=False) for r in runs) * 1e6
                net_cpu = statistics.median(r.cpu_per_request(net=True) for r in runs) * 1e6
                errors = sum(r.errors for r in runs)
                if errors:
                    print(f"  ! {label} {name}: {errors} failed requests", flush=True)
                row = OverheadRow(
                    name, label, p50, p99, rps, cpu if pid else None, net_cpu if pid else None
                )
                if pid:
                    row.added_p50_ms = p50 - direct_p50
                    row.added_p99_ms = p99 - direct_p99
                rows.append(row)
                print(
                    f"  {name:22s} {label:20s} p50 {p50:7.2f} ms  cpu/req {row.cpu_us or 0:6.0f} us",
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
