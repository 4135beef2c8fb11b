"""Router benchmark, part 3: what predicts how `fleet router --workers N` scales (run it through
bench_router.py `--part workers`).

A two-core machine cannot show N workers going N times as fast (the load generator needs a core),
so this measures what scaling rests on, for a lone router (`--workers 1`, today's one process)
and for a router of 2 workers, same fake replicas, same load:

- spread: each worker's share of the connections and of the requests (connections renewed every
  `--per-connection` requests, so the kernel places many), as the largest deviation from an even
  share (-15%..+15% is the goal);
- CPU per request of each worker (psutil on its pid, net of what it burns idle, over the
  requests it served by its own count in /metrics), against the lone router's: the goal is within
  10%. With `--pin` all router processes share CPU 0 (the load generator and the replicas have
  the other): each process's CPU per request is what it costs, whoever shares its core;
- placement agreement: `--agreement-requests` chat requests of `--agreement-tenants` tenants' system
  prompts, each over a new connection (so the workers share them), to four fake replicas with
  simulated prefix caches; the share of each tenant's requests that went to the replica its first
  request went to (from each answer's `x-fleet-replica`).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import psutil
from bench_load import FAKE_MODEL, WORDS, chat_bodies
from bench_processes import PY, free_port, processes, router_cmd, spawn, split_cpus, wait_ready

KEY = "sk-static-workers"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
SETTLE_S = 1.5  # the workers' metrics files are up to 1 s old (router.workers.metrics)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workers")
    group.add_argument("--workers-list", type=int, nargs="+", default=[1, 2])
    group.add_argument("--worker-requests", type=int, default=6000)
    group.add_argument("--worker-concurrency", type=int, default=64)
    group.add_argument("--per-connection", type=int, default=8)
    group.add_argument("--agreement-requests", type=int, default=1000)
    group.add_argument("--agreement-tenants", type=int, default=8)
    group.add_argument(
        "--agreement-concurrency",
        type=int,
        default=1,
        help="above 1, the prefix policy also moves a busy tenant on by design (load_fallback)",
    )


@dataclass
class WorkerRow:
    workers: int
    worker: int
    connections: int
    requests: int
    cpu_us: float
    net_cpu_us: float


@dataclass
class WorkersResult:
    workers: int
    concurrency: int
    rps: float
    errors: int
    rows: list[WorkerRow] = field(default_factory=list)
    agreement: float | None = None
    agreement_errors: int = 0

    def deviation(self, what: str) -> float:
        counts = [getattr(r, what) for r in self.rows]
        even = sum(counts) / len(counts)
        return max(abs(c / even - 1) for c in counts) if even else 0.0


def worker_pids(url: str, router_pid: int, count: int) -> list[int]:
    """The router's serving processes by worker index: itself alone, else as /metrics names
    them."""
    if count == 1:
        return [router_pid]
    text = httpx.get(url + "/metrics", headers=AUTH).text
    found = dict(re.findall(r'fleet_router_worker_pid\{worker="(\d+)"\} ([\d.e+]+)', text))
    return [int(float(found[str(i)])) for i in range(count)]


def per_worker_counts(
    url: str, count: int, requests: int, connections: int
) -> list[tuple[int, int]]:
    """(connections, requests) per worker so far; a lone router's from the load generator."""
    if count == 1:
        return [(connections, requests)]
    text = httpx.get(url + "/metrics", headers=AUTH).text

    def series(name: str) -> dict[str, float]:
        pattern = rf'{name}\{{worker="(\d+)"\}} ([\d.e+]+)'
        return {k: float(v) for k, v in re.findall(pattern, text)}

    conns = series("fleet_router_worker_connections_total")
    reqs = series("fleet_router_worker_requests_total")
    return [(int(conns[str(i)]), int(reqs[str(i)])) for i in range(count)]


async def spread_load(
    url: str, bodies: list[bytes], concurrency: int, per_connection: int
) -> tuple[int, int, int, float]:
    """Send `bodies`, each of `concurrency` senders renewing its connection every
    `per_connection` requests; (requests, errors, connections, seconds)."""
    import aiohttp

    queue = list(reversed(bodies))
    done = errors = connections = 0
    started = time.perf_counter()

    async def sender() -> None:
        nonlocal done, errors, connections
        while queue:
            connections += 1
            connector = aiohttp.TCPConnector(limit=1)
            async with aiohttp.ClientSession(connector=connector) as session:
                for _ in range(per_connection):
                    if not queue:
                        break
                    body = queue.pop()
                    try:
                        async with session.post(url, data=body, headers=AUTH) as response:
                            await response.read()
                            if response.status != 200:
                                raise RuntimeError(response.status)
                        done += 1
                    except Exception:
                        errors += 1

    await asyncio.gather(*(sender() for _ in range(concurrency)))
    return done, errors, connections, time.perf_counter() - started


def tenant_bodies(count: int, tenants: int, rng: random.Random) -> list[tuple[int, bytes]]:
    """(tenant, body): each tenant's system prompt (about 1,500 characters) and a question."""
    systems = [
        f"Tenant {t}: " + " ".join(random.Random(t).choices(WORDS, k=220)) for t in range(tenants)
    ]
    out = []
    for _ in range(count):
        t = rng.randrange(tenants)
        body = {
            "model": FAKE_MODEL,
            "messages": [
                {"role": "system", "content": systems[t]},
                {"role": "user", "content": " ".join(rng.choices(WORDS, k=12))},
            ],
            "max_tokens": 16,
        }
        out.append((t, orjson.dumps(body)))
    return out


async def agreement_load(
    url: str, bodies: list[tuple[int, bytes]], concurrency: int
) -> tuple[float, int]:
    """(share of requests sent to their tenant's first replica, errors); a new connection each."""
    import aiohttp

    queue = list(reversed(bodies))
    first: dict[int, str] = {}
    same = total = errors = 0

    async def sender() -> None:
        nonlocal same, total, errors
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            while queue:
                tenant, body = queue.pop()
                try:
                    async with session.post(url, data=body, headers=AUTH) as response:
                        await response.read()
                        replica = response.headers.get("x-fleet-replica", "")
                        if response.status != 200:
                            raise RuntimeError(response.status)
                except Exception:
                    errors += 1
                    continue
                total += 1
                same += first.setdefault(tenant, replica) == replica

    await asyncio.gather(*(sender() for _ in range(concurrency)))
    return (same / total if total else 0.0), errors


def start_fakes(started: list, cpus: set[int] | None, workdir: Path, count: int) -> list[str]:
    """Fake replicas with simulated prefix caches (their kv_usage is real)."""
    urls = []
    for i in range(count):
        port = free_port()
        cmd = [PY, "tests/support/fake_replica.py", "--port", str(port), "--id", f"f{i}",
               "--kv-cache-tokens", "32768"]  # fmt: skip
        started.append(spawn(cmd, cpus, workdir / f"workers-fake{i}.log"))
        urls.append(f"f{i}=http://127.0.0.1:{port}")
    for url, process in zip(urls, started[-count:], strict=True):
        wait_ready(url.partition("=")[2] + "/health", process)
    return urls


def cpu_run(
    args: argparse.Namespace, url: str, pids: list[int], concurrency: int, rng: random.Random
) -> WorkersResult:
    """The spread and each worker's CPU per request at `concurrency` senders."""
    count = len(pids)
    procs = [psutil.Process(pid) for pid in pids]
    idle_before = [sum(p.cpu_times()[:2]) for p in procs]
    idle_t = time.perf_counter()
    time.sleep(args.idle_sample_s)
    idle_rate = [
        (sum(p.cpu_times()[:2]) - b) / (time.perf_counter() - idle_t)
        for p, b in zip(procs, idle_before, strict=True)
    ]
    counts_before = per_worker_counts(url, count, 0, 0)
    cpu_before = [sum(p.cpu_times()[:2]) for p in procs]
    bodies = chat_bodies(args.worker_requests, False, rng)
    done, errors, conns, seconds = asyncio.run(
        spread_load(url + "/v1/chat/completions", bodies, concurrency, args.per_connection)
    )
    cpu_after = [sum(p.cpu_times()[:2]) for p in procs]
    time.sleep(SETTLE_S)
    counts_after = per_worker_counts(url, count, done, conns)
    result = WorkersResult(count, concurrency, done / seconds, errors)
    for i in range(count):
        served = counts_after[i][1] - counts_before[i][1]
        accepted = counts_after[i][0] - counts_before[i][0]
        cpu = cpu_after[i] - cpu_before[i]
        net = cpu - idle_rate[i] * seconds
        result.rows.append(
            WorkerRow(count, i, accepted, served, cpu / max(served, 1) * 1e6,
                      net / max(served, 1) * 1e6)
        )  # fmt: skip
    return result


def measure_router(
    args: argparse.Namespace,
    count: int,
    fakes: list[str],
    workdir: Path,
    router_cpus: set[int] | None,
    started: list,
) -> list[WorkersResult]:
    """A router of `count` workers; a lone one also at each worker's share of the load."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = router_cmd(port, fakes, "prefix", "--api-key", KEY, "--workers", str(count))
    process = spawn(cmd, router_cpus, workdir / f"workers-router-{count}.log")
    started.append(process)
    wait_ready(url + "/health", process)
    rng = random.Random(count)
    target = url + "/v1/chat/completions"
    asyncio.run(spread_load(target, chat_bodies(200, False, rng), 16, 4))  # warm-up
    time.sleep(SETTLE_S)
    pids = worker_pids(url, process.pid, count)
    total = args.worker_concurrency
    levels = [total]
    if count == 1:
        levels += sorted({total // n for n in args.workers_list if n > 1}, reverse=True)
    results = [cpu_run(args, url, pids, level, rng) for level in levels]
    agreement_bodies = tenant_bodies(args.agreement_requests, args.agreement_tenants, rng)
    results[0].agreement, results[0].agreement_errors = asyncio.run(
        agreement_load(target, agreement_bodies, args.agreement_concurrency)
    )
    process.terminate()
    process.wait(60)
    return results


def workers(args: argparse.Namespace, workdir: Path) -> list[WorkersResult]:
    router_cpus, other_cpus = split_cpus(args.pin)
    if other_cpus:
        psutil.Process().cpu_affinity(sorted(other_cpus))  # the load generator
    results = []
    with processes() as started:
        fakes = start_fakes(started, other_cpus, workdir, 4)
        for count in args.workers_list:
            results += measure_router(args, count, fakes, workdir, router_cpus, started)
            print(f"  workers={count}: done", flush=True)
    return results


def print_workers(results: list[WorkersResult]) -> None:
    lone = {r.concurrency: r.rows[0].net_cpu_us for r in results if r.workers == 1}
    print("\nRouter workers (non-streamed chat, prefix policy, static key; CPU net of idle)")
    print("vs lone: a worker's CPU per request over the lone router's at the same total load, and")
    print("at the same load per process (the lone router at the total divided by the workers)")
    head = (
        f"{'workers':>7s} {'senders':>7s} {'worker':>6s} {'conns':>6s} {'share':>6s} "
        f"{'requests':>8s} {'share':>6s} {'CPU us/req':>10s} {'vs lone':>7s} "
        f"{'same/proc':>9s} {'req/s':>7s} {'agreement':>9s}"
    )
    print(head)
    print("-" * len(head))
    for result in results:
        conns = sum(r.connections for r in result.rows) or 1
        reqs = sum(r.requests for r in result.rows) or 1
        same_total = lone.get(result.concurrency)
        same_each = lone.get(result.concurrency // result.workers)
        agreement = f"{result.agreement:9.1%}" if result.agreement is not None else f"{'':9s}"
        for row in result.rows:
            versus = f"{row.net_cpu_us / same_total:7.2f}" if same_total else f"{'':7s}"
            each = f"{row.net_cpu_us / same_each:9.2f}" if same_each else f"{'':9s}"
            print(
                f"{result.workers:7d} {result.concurrency:7d} {row.worker:6d} "
                f"{row.connections:6d} {row.connections / conns:6.1%} {row.requests:8d} "
                f"{row.requests / reqs:6.1%} {row.net_cpu_us:10.0f} {versus} {each} "
                f"{result.rps:7.0f} {agreement}"
            )
        if result.workers > 1:
            print(
                f"{'':7s} max deviation from an even share: connections "
                f"{result.deviation('connections'):+.1%}, requests "
                f"{result.deviation('requests'):+.1%}"
            )
        if result.errors or result.agreement_errors:
            print(f"{'':7s} ! errors: {result.errors} + {result.agreement_errors}")
