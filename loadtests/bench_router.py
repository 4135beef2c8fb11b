"""Router benchmark: what the router costs, and what its routing buys.

Part 1, overhead (fake replicas, loadtests/fake_replica.py, answering instantly): the same requests
sent directly to a replica and through `python -m router` (prefix policy, metrics on, auth on:
once with the control plane's Redis KeyStore, once with a static key), and through
loadtests/bare_proxy.py (HTTP in and out and nothing else: the floor), at concurrency 1 and 64,
non-streaming and 64-chunk streams. Reports p50/p99 latency, the latency the router adds, requests
per second, and the router process's CPU time per request (psutil on its pid: the steadiest figure
on a shared machine), also net of the CPU it burns idle (probes, timers), sampled before each run.
`--pin` gives the router CPU 0 and everything else the other CPUs. `--baseline REV` also runs
the routers of git revision REV (checked out in a temporary worktree) in the same run, so a
change's cost shows as a ratio against its parent rather than against numbers from another day.

Part 2, routing quality (three real replicas, `python -m replica` on a small random model, with
`--kv-cache-tokens` too small for one replica to hold every tenant's prompt): a shared-prefix
multi-tenant workload (16 tenants, 1,500-token system prompts, short questions) and multi-turn
chats, through the router with each policy. Reports the replicas' prefix-cache hit rate (from
their `/load` counters) and time to the first content token.

    .venv/bin/python loadtests/bench_router.py --out bench_router.png
    .venv/bin/python loadtests/bench_router.py --part overhead --rounds 3
    .venv/bin/python loadtests/bench_router.py --part overhead --pin --baseline 11b5f4d

Prints tables; saves a PNG with both parts. Everything runs on loopback and ends by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import psutil

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
FAKE_MODEL = "fake-model"
IDLE_SAMPLE_S = 3.0
SERVED = "bench-model"
WORDS = [
    "serving",
    "models",
    "batching",
    "requests",
    "caching",
    "keys",
    "values",
    "streaming",
    "tokens",
    "routers",
    "balance",
    "load",
    "replicas",
    "prefix",
    "attention",
    "state",
    "shared",
    "prompts",
    "fleet",
    "quick",
    "brown",
    "fox",
    "jumps",
    "lazy",
    "dog",
    "journey",
    "thousand",
    "miles",
    "begins",
    "single",
    "step",
    "numbers",
    "letters",
    "queue",
    "depth",
    "health",
    "probes",
    "drain",
    "retry",
]


# ----------------------------------------------------------------------------- processes


def _cpus(pin: bool) -> tuple[set[int] | None, set[int] | None]:
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


# ----------------------------------------------------------------------------- load generation


@dataclass
class Run:
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    cpu_s: float = 0.0
    idle_cpu_per_s: float = 0.0

    def cpu_per_request(self, net: bool) -> float:
        """Router CPU seconds per request; `net` takes off what it burns idle (probes, timers)."""
        cpu = self.cpu_s - (self.idle_cpu_per_s * self.seconds if net else 0.0)
        return max(cpu, 0.0) / max(len(self.latencies), 1)

    def pct(self, values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


async def one_request(
    client, url: str, body: bytes, headers: dict, stream: bool
) -> tuple[float, float]:
    """(end-to-end seconds, seconds to the first content chunk or the whole body)."""
    started = time.perf_counter()
    first = 0.0
    async with client.post(url, data=body, headers=headers) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(await response.read())[:200]!r}")
        if not stream:
            await response.read()
            first = time.perf_counter() - started
        else:
            async for line in response.content:
                if (
                    not first
                    and line.startswith(b"data: {")
                    and b'"content":""' not in line
                    and (b'"content":"' in line or b'"text":"' in line)
                ):
                    first = time.perf_counter() - started
    return time.perf_counter() - started, first


async def drive(
    url: str,
    bodies: list[bytes],
    headers: dict,
    stream: bool,
    concurrency: int,
    pid: int | None,
    warmup: int = 20,
) -> Run:
    import aiohttp

    run = Run()
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as client:
        for body in bodies[: min(warmup, len(bodies))]:
            with contextlib.suppress(Exception):
                await one_request(client, url, body, headers, stream)
        queue = list(reversed(bodies))
        process = psutil.Process(pid) if pid else None
        if process is not None:
            idle_before, idle_started = process.cpu_times(), time.perf_counter()
            await asyncio.sleep(IDLE_SAMPLE_S)
            idle_after = process.cpu_times()
            idle_cpu = sum(idle_after[:2]) - sum(idle_before[:2])
            run.idle_cpu_per_s = idle_cpu / (time.perf_counter() - idle_started)
        before = process.cpu_times() if process else None
        started = time.perf_counter()

        async def worker() -> None:
            while queue:
                body = queue.pop()
                try:
                    total, first = await one_request(client, url, body, headers, stream)
                except Exception:
                    run.errors += 1
                    continue
                run.latencies.append(total)
                run.ttfts.append(first)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        run.seconds = time.perf_counter() - started
        if process is not None and before is not None:
            after = process.cpu_times()
            run.cpu_s = (after.user + after.system) - (before.user + before.system)
    return run


# ----------------------------------------------------------------------------- part 1: overhead


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

    router_cpus, other_cpus = _cpus(args.pin)
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
            bodies = [
                orjson.dumps(
                    {
                        "model": FAKE_MODEL,
                        "messages": [
                            {"role": "system", "content": "You are a helpful assistant. " * 8},
                            {"role": "user", "content": " ".join(rng.choices(WORDS, k=12))},
                        ],
                        "max_tokens": 64 if stream else 16,
                        "stream": stream,
                    }
                )
                for _ in range(count)
            ]
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


# ----------------------------------------------------------------------------- part 2: routing


@dataclass
class RoutingRow:
    policy: str
    workload: str
    requests: int
    hit_rate: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    e2e_p50_ms: float
    errors: int


def build_model(workdir: Path) -> Path:
    from fleet.model_factory import make_model

    return make_model(
        workdir / "bench-model", arch="llama", size="tiny", seed=0, hidden_size=256,
        intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096,
    )  # fmt: skip


def text_of_tokens(tokenizer, rng: random.Random, tokens: int, head: str) -> str:
    """Random words trimmed to exactly `tokens` tokens of the model's tokenizer."""
    text = head + " ".join(rng.choices(WORDS, k=tokens))
    ids = tokenizer.encode(text).ids[:tokens]
    return tokenizer.decode(ids)


def shared_prefix_requests(args, tokenizer, salt: str) -> list[dict]:
    rng = random.Random(1)
    systems = [
        text_of_tokens(tokenizer, rng, args.tenant_tokens, f"{salt} tenant {t}: ")
        for t in range(args.tenants)
    ]
    requests = []
    for _ in range(args.routing_requests):
        tenant = rng.randrange(args.tenants)
        question = " ".join(rng.choices(WORDS, k=10)) + "?"
        requests.append(
            {
                "model": SERVED,
                "messages": [
                    {"role": "system", "content": systems[tenant]},
                    {"role": "user", "content": question},
                ],
                "max_tokens": 8,
                "stream": True,
            }
        )
    return requests


async def multi_turn(args, tokenizer, salt: str, url: str) -> Run:
    """Conversations run concurrently; each turn resends the whole history with the reply."""
    import aiohttp

    rng = random.Random(2)
    run = Run()
    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:

        async def conversation(c: int) -> None:
            history = [
                {"role": "system", "content": text_of_tokens(tokenizer, rng, args.chat_system_tokens, f"{salt} chat {c}: ")}
            ]  # fmt: skip
            await asyncio.sleep(c * 0.05)
            for turn in range(args.turns):
                history.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=40))})
                body = {"model": SERVED, "messages": history, "max_tokens": 16, "stream": True}
                t0 = time.perf_counter()
                first = 0.0
                reply = []
                try:
                    async with client.post(url, json=body) as response:
                        async for line in response.content:
                            if not line.startswith(b"data: {"):
                                continue
                            chunk = orjson.loads(line[6:])
                            for choice in chunk.get("choices", []):
                                piece = choice.get("delta", {}).get("content")
                                if piece:
                                    first = first or time.perf_counter() - t0
                                    reply.append(piece)
                except Exception:
                    run.errors += 1
                    return
                run.latencies.append(time.perf_counter() - t0)
                run.ttfts.append(first)
                history.append({"role": "assistant", "content": "".join(reply) or "ok"})
                del turn

        await asyncio.gather(*(conversation(c) for c in range(args.conversations)))
    run.seconds = time.perf_counter() - started
    return run


def cache_counters(urls: list[str]) -> tuple[int, int]:
    hits = queries = 0
    for url in urls:
        load = httpx.get(url + "/load", timeout=5).json()
        hits += int(load.get("prefix_cache_hits", 0))
        queries += int(load.get("prefix_cache_queries", 0))
    return hits, queries


def routing(args: argparse.Namespace, workdir: Path) -> list[RoutingRow]:
    from tokenizers import Tokenizer

    router_cpus, other_cpus = _cpus(args.pin)
    model = build_model(workdir)
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    rows: list[RoutingRow] = []
    with processes() as started:
        urls = []
        for i in range(args.replicas):
            port = free_port()
            cmd = [
                PY, "-m", "replica", "--model", str(model), "--served-model-name", SERVED,
                "--port", str(port), "--kv-cache-tokens", str(args.kv_cache_tokens),
                "--dtype", "float32", "--replica-id", f"bench-{i}", "--log-level", "warning",
            ]  # fmt: skip
            started.append(spawn(cmd, other_cpus, workdir / f"replica{i}.log"))
            urls.append(f"http://127.0.0.1:{port}")
        for url, process in zip(urls, started, strict=True):
            wait_ready(url + "/health", process, timeout=600)
        for policy in args.policies:
            port = free_port()
            router = spawn(
                router_cmd(port, urls, policy), router_cpus, workdir / f"router-{policy}.log"
            )
            wait_ready(f"http://127.0.0.1:{port}/health", router)
            endpoint = f"http://127.0.0.1:{port}/v1/chat/completions"
            for workload in ("shared-prefix", "multi-turn"):
                salt = f"[{policy} {workload}]"
                hits0, queries0 = cache_counters(urls)
                if workload == "shared-prefix":
                    bodies = [
                        orjson.dumps(b) for b in shared_prefix_requests(args, tokenizer, salt)
                    ]
                    run = asyncio.run(
                        drive(endpoint, bodies, {"Content-Type": "application/json"}, True,
                              args.concurrency, None, warmup=0)
                    )  # fmt: skip
                else:
                    run = asyncio.run(multi_turn(args, tokenizer, salt, endpoint))
                hits1, queries1 = cache_counters(urls)
                rate = (hits1 - hits0) / max(queries1 - queries0, 1)
                row = RoutingRow(
                    policy, workload, len(run.latencies), rate,
                    run.pct(run.ttfts, 0.5) * 1e3, run.pct(run.ttfts, 0.99) * 1e3,
                    run.pct(run.latencies, 0.5) * 1e3, run.errors,
                )  # fmt: skip
                rows.append(row)
                print(
                    f"  {policy:12s} {workload:14s} hit rate {rate:6.1%}  TTFT p50 {row.ttft_p50_ms:7.0f} ms",
                    flush=True,
                )
            router.terminate()
            router.wait(10)
    return rows


def print_routing(rows: list[RoutingRow], args: argparse.Namespace) -> None:
    print(
        f"\nRouting quality ({args.replicas} replicas, --kv-cache-tokens {args.kv_cache_tokens} each; "
        f"shared-prefix: {args.tenants} tenants x {args.tenant_tokens}-token system prompts, "
        f"{args.routing_requests} requests at concurrency {args.concurrency}; multi-turn: "
        f"{args.conversations} chats x {args.turns} turns)"
    )
    head = f"{'policy':12s} {'workload':14s} {'requests':>8s} {'hit rate':>9s} {'TTFT p50 ms':>12s} {'TTFT p99 ms':>12s} {'e2e p50 ms':>11s} {'errors':>7s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r.policy:12s} {r.workload:14s} {r.requests:8d} {r.hit_rate:9.1%} "
            f"{r.ttft_p50_ms:12.0f} {r.ttft_p99_ms:12.0f} {r.e2e_p50_ms:11.0f} {r.errors:7d}"
        )
    by = {(r.policy, r.workload): r for r in rows}
    for workload in ("shared-prefix", "multi-turn"):
        prefix, rr = by.get(("prefix", workload)), by.get(("round-robin", workload))
        if prefix and rr:
            print(
                f"{workload}: prefix / round-robin hit rate {prefix.hit_rate / max(rr.hit_rate, 1e-9):.2f}x, "
                f"TTFT p50 {prefix.ttft_p50_ms / rr.ttft_p50_ms:.2f}x"
            )


# ----------------------------------------------------------------------------- plot


def plot(overhead_rows: list[OverheadRow], routing_rows: list[RoutingRow], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = int(bool(overhead_rows)) * 2 + int(bool(routing_rows)) * 2
    if not panels:
        return
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.2))
    axes = list(axes) if panels > 1 else [axes]
    if overhead_rows:
        routed = [r for r in overhead_rows if r.cpu_us is not None]
        scenarios = list(dict.fromkeys(r.scenario for r in routed))
        labels = list(dict.fromkeys(r.target for r in routed))
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            values = [
                next(r.net_cpu_us for r in routed if r.scenario == s and r.target == label)
                for s in scenarios
            ]
            added = [
                next(r.added_p50_ms for r in routed if r.scenario == s and r.target == label)
                for s in scenarios
            ]
            xs = [x + i * width for x in range(len(scenarios))]
            axes[0].bar(xs, values, width, label=label)
            axes[1].bar(xs, added, width, label=label)
        for ax, title in (
            (axes[0], "router CPU per request, net of idle (µs)"),
            (axes[1], "added p50 latency (ms)"),
        ):
            ax.set_xticks([x + width * (len(labels) - 1) / 2 for x in range(len(scenarios))])
            ax.set_xticklabels(scenarios, rotation=20, ha="right", fontsize=8)
            ax.set_title(title)
            ax.legend(fontsize=7)
        axes = axes[2:]
    if routing_rows:
        policies = list(dict.fromkeys(r.policy for r in routing_rows))
        workloads = list(dict.fromkeys(r.workload for r in routing_rows))
        width = 0.8 / len(policies)
        for i, policy in enumerate(policies):
            rates = [
                next(r.hit_rate for r in routing_rows if r.policy == policy and r.workload == w)
                * 100
                for w in workloads
            ]
            ttft = [
                next(r.ttft_p50_ms for r in routing_rows if r.policy == policy and r.workload == w)
                for w in workloads
            ]
            xs = [x + i * width for x in range(len(workloads))]
            axes[0].bar(xs, rates, width, label=policy)
            axes[1].bar(xs, ttft, width, label=policy)
        for ax, title in ((axes[0], "prefix-cache hit rate (%)"), (axes[1], "TTFT p50 (ms)")):
            ax.set_xticks([x + width * (len(policies) - 1) / 2 for x in range(len(workloads))])
            ax.set_xticklabels(workloads)
            ax.set_title(title)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"\nplot saved to {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["overhead", "routing", "all"], default="all")
    parser.add_argument("--out", type=Path, default=Path("bench_router.png"))
    parser.add_argument(
        "--rounds", type=int, default=2, help="overhead: repeats (medians reported)"
    )
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="router on CPU 0, replicas and load generator on the others",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="overhead: also run the routers of this git revision, side by side",
    )
    parser.add_argument("--requests-c1", type=int, default=600)
    parser.add_argument("--requests-c64", type=int, default=4000)
    parser.add_argument("--stream-requests-c1", type=int, default=300)
    parser.add_argument("--stream-requests-c64", type=int, default=1000)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--kv-cache-tokens", type=int, default=10240)
    parser.add_argument("--tenants", type=int, default=16)
    parser.add_argument("--tenant-tokens", type=int, default=1500)
    parser.add_argument("--routing-requests", type=int, default=160)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--conversations", type=int, default=12)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--chat-system-tokens", type=int, default=400)
    parser.add_argument("--policies", nargs="+", default=["prefix", "least-load", "round-robin"])
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="bench-router-") as tmp:
        workdir = Path(tmp)
        overhead_rows = overhead(args, workdir) if args.part in ("overhead", "all") else []
        routing_rows = routing(args, workdir) if args.part in ("routing", "all") else []
    if overhead_rows:
        print_overhead(overhead_rows)
    if routing_rows:
        print_routing(routing_rows, args)
    plot(overhead_rows, routing_rows, args.out)


if __name__ == "__main__":
    main()
