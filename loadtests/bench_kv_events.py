"""Exact against estimated prefix affinity, on a workload with evictions, in one run.

Real tiny-model replicas on CPU (`python -m replica`, KV events on, `--kv-cache-tokens` small)
join a fleet in an embedded Redis. More distinct prefixes (tenants' system prompts) than the
replicas' caches hold together are asked for with Zipf popularity, so caches evict all the time.
The same request sequence (each mode's prompts salted apart, so neither reuses the other's cache)
goes through prefix-policy routers with `--kv-events` (exact: each replica's cached blocks, read
from its events) and `--no-kv-events` (estimated: what each router sent where), `--routers` of
each, requests spread over them as a TCP balancer would. A warm-up fills the caches with other
prompts first; then the modes take turns, `--rounds` phases each, so both meet the machine's load
(this one is shared and noisy) and each other's leftovers in the caches alike.

Reports per mode the share of prompt tokens the replicas found cached (from each answer's
`usage.prompt_tokens_details.cached_tokens`; the replicas' `/load` counters over the mode's
phases agree), and TTFT; and what hashing a prompt costs a router: render, tokenize and hash a
chat request with a `--tokenize-tokens`-token system prompt, CPU per request.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import orjson
from bench_load import WORDS, Run
from bench_processes import PY, free_port, processes, spawn, wait_ready
from bench_routing import build_model, cache_counters, text_of_tokens

SERVED = "bench-model"
PREFIX = "kvbench"
ADMIN = "bench-admin"
MODES = ("estimated", "exact")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--kv-cache-tokens", type=int, default=1536)
    parser.add_argument("--prefixes", type=int, default=32)
    parser.add_argument("--prefix-tokens", type=int, default=256)
    parser.add_argument("--zipf", type=float, default=1.0, help="popularity exponent")
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--routers", type=int, default=2, help="routers per mode")
    parser.add_argument("--rounds", type=int, default=2, help="phases per mode, alternating")
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--tokenize-tokens", type=int, default=1500)
    parser.add_argument("--workdir", type=Path, default=None)
    return parser.parse_args(argv)


def workload(args: argparse.Namespace, tokenizer, salt: str) -> list[bytes]:
    """The same tenants and order for every salt: only the prompts' first words differ."""
    rng = random.Random(7)
    systems = [
        text_of_tokens(tokenizer, random.Random(100 + t), args.prefix_tokens, f"{salt} tenant {t}: ")
        for t in range(args.prefixes)
    ]  # fmt: skip
    weights = [1 / (rank + 1) ** args.zipf for rank in range(args.prefixes)]
    bodies = []
    for tenant in rng.choices(range(args.prefixes), weights, k=args.requests):
        question = " ".join(rng.choices(WORDS, k=8)) + "?"
        messages = [
            {"role": "system", "content": systems[tenant]},
            {"role": "user", "content": question},
        ]
        bodies.append(
            orjson.dumps(
                {"model": SERVED, "messages": messages, "max_tokens": args.max_tokens,
                 "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
            )
        )  # fmt: skip
    return bodies


@dataclass
class Tally:
    """One mode's requests: TTFTs and the prompt tokens the replicas found cached (their usage)."""

    run: Run = field(default_factory=Run)
    prompt_tokens: int = 0
    cached_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / max(self.prompt_tokens, 1)


async def chat(client: aiohttp.ClientSession, url: str, body: bytes) -> tuple[float, float, dict]:
    """(seconds to the end, to the first content chunk, the usage) of one streamed chat."""
    started = time.perf_counter()
    first, usage = 0.0, {}
    headers = {"Content-Type": "application/json"}
    async with client.post(url, data=body, headers=headers) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(await response.read())[:200]!r}")
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            if not first and b'"content":"' in line and b'"content":""' not in line:
                first = time.perf_counter() - started
            if b'"usage":{' in line:
                usage = orjson.loads(line[6:]).get("usage") or usage
    return time.perf_counter() - started, first, usage


async def drive(endpoints: list[str], bodies: list[bytes], concurrency: int, tally: Tally) -> None:
    """Request i goes to endpoint i mod len(endpoints), `concurrency` at a time."""
    run = tally.run
    queue = list(reversed(list(enumerate(bodies))))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:

        async def worker() -> None:
            while queue:
                i, body = queue.pop()
                try:
                    total, first, usage = await chat(client, endpoints[i % len(endpoints)], body)
                except Exception:
                    run.errors += 1
                    continue
                run.latencies.append(total)
                run.ttfts.append(first)
                tally.prompt_tokens += usage.get("prompt_tokens", 0)
                details = usage.get("prompt_tokens_details") or {}
                tally.cached_tokens += details.get("cached_tokens", 0)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        run.seconds += time.perf_counter() - started


def exact_ready(endpoint: str, body: bytes, timeout: float = 300) -> None:
    """Send requests to an exact router until it hashed one (its tokenizer loaded, its replicas'
    indexes in sync), so the measured phase never waits on that."""
    stats = endpoint.replace("/v1/chat/completions", "/admin/stats")
    headers = {"Authorization": f"Bearer {ADMIN}"}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        httpx.post(
            endpoint, content=body, timeout=120, headers={"Content-Type": "application/json"}
        )
        events = httpx.get(stats, headers=headers, timeout=10).json().get("kv_events", {})
        if events.get("prepared", 0) > 0 and events.get("synced") == events.get("tracked"):
            return
        time.sleep(1)
    raise TimeoutError(f"{endpoint} never used its replicas' KV events")


def tokenize_cost(model: Path, args: argparse.Namespace, tokenizer) -> tuple[float, float, int]:
    """(µs of CPU to render and tokenize, µs to hash, tokens) for one chat request, as a router
    with KV events does it for each routed request."""
    from fleet.control.kv_events import block_keys
    from router.routing.exact import Recipe, _load

    renderer = _load(Recipe(str(model), None))
    system = text_of_tokens(tokenizer, random.Random(3), args.tokenize_tokens, "tokenize: ")
    body = {"model": SERVED, "messages": [{"role": "system", "content": system},
                                          {"role": "user", "content": "What is it?"}]}  # fmt: skip
    ids = renderer.token_ids("chat", body) or []
    rounds = 200
    started = time.thread_time()
    for _ in range(rounds):
        ids = renderer.token_ids("chat", body) or []
    render = (time.thread_time() - started) / rounds
    started = time.thread_time()
    for _ in range(rounds):
        block_keys(ids, 16)
    hashing = (time.thread_time() - started) / rounds
    return render * 1e6, hashing * 1e6, len(ids)


def main(argv: list[str] | None = None) -> None:
    from tokenizers import Tokenizer

    from fleet.embedded_redis import EmbeddedRedis

    args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-kv-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model = build_model(workdir)
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    render_us, hash_us, tokens = tokenize_cost(model, args, tokenizer)
    print(f"router CPU per chat request of {tokens} tokens: render + tokenize {render_us:.0f} µs, "
          f"hash {hash_us:.0f} µs", flush=True)  # fmt: skip
    rows = []
    with EmbeddedRedis() as redis, processes() as started:
        fleet = ["--redis-url", redis.url, "--redis-prefix", PREFIX, "--no-fleet-keys"]
        urls = []
        for i in range(args.replicas):
            port = free_port()
            cmd = [
                PY, "-m", "replica", "--model", str(model), "--served-model-name", SERVED,
                "--port", str(port), "--kv-cache-tokens", str(args.kv_cache_tokens),
                "--dtype", "float32", "--replica-id", f"kv-{i}", "--log-level", "warning", *fleet,
            ]  # fmt: skip
            started.append(spawn(cmd, None, workdir / f"replica{i}.log"))
            urls.append(f"http://127.0.0.1:{port}")
        for url, process in zip(urls, started, strict=True):
            wait_ready(url + "/health", process, timeout=600)
        endpoints: dict[str, list[str]] = {}
        for mode, flag in (("estimated", "--no-kv-events"), ("exact", "--kv-events")):
            endpoints[mode] = []
            for r in range(args.routers):
                port = free_port()
                cmd = [PY, "-m", "router", "--port", str(port), "--policy", "prefix",
                       "--log-level", "warning", "--admin-key", ADMIN, flag, *fleet]  # fmt: skip
                router = spawn(cmd, None, workdir / f"router-{mode}-{r}.log")
                started.append(router)
                wait_ready(f"http://127.0.0.1:{port}/health", router)
                endpoints[mode].append(f"http://127.0.0.1:{port}/v1/chat/completions")
        time.sleep(2)  # membership, first load polls, first KV snapshots
        # Warm-up: fill the caches with other prompts; each exact router loads its tokenizer.
        warm = workload(args, tokenizer, "[warm-up]")[: args.requests // 3]
        asyncio.run(drive(endpoints["estimated"], warm, args.concurrency, Tally()))
        for endpoint, body in zip(endpoints["exact"], warm, strict=False):
            exact_ready(endpoint, body)
        # The modes alternate in `rounds` phases each, so both meet the machine's load alike.
        tallies = {mode: Tally() for mode in MODES}
        bodies = {mode: workload(args, tokenizer, f"[{mode}]") for mode in MODES}
        counters = {mode: [0, 0] for mode in MODES}
        per_round = -(-args.requests // args.rounds)
        for r in range(args.rounds):
            for mode in MODES:
                hits0, queries0 = cache_counters(urls)
                part = bodies[mode][r * per_round : (r + 1) * per_round]
                asyncio.run(drive(endpoints[mode], part, args.concurrency, tallies[mode]))
                hits1, queries1 = cache_counters(urls)
                counters[mode][0] += hits1 - hits0
                counters[mode][1] += queries1 - queries0
                tally = tallies[mode]
                print(f"  round {r + 1} {mode:9s} hit rate so far {tally.hit_rate:6.1%}  "
                      f"TTFT p50 {tally.run.pct(tally.run.ttfts, 0.5) * 1e3:6.0f} ms", flush=True)  # fmt: skip
        loads = [httpx.get(u + "/load", timeout=5).json() for u in urls]
    for mode in MODES:
        tally, (hits, queries) = tallies[mode], counters[mode]
        run = tally.run
        rows.append((mode, len(run.latencies), run.errors, tally.hit_rate, hits / max(queries, 1),
                     run.pct(run.ttfts, 0.5) * 1e3, run.pct(run.ttfts, 0.99) * 1e3, run.seconds))  # fmt: skip
    total = args.prefixes * args.prefix_tokens
    print(
        f"\nExact vs estimated prefix affinity ({args.replicas} replicas x "
        f"--kv-cache-tokens {args.kv_cache_tokens}; {args.prefixes} prefixes x "
        f"{args.prefix_tokens} tokens = {total} tokens, {total / (args.replicas * args.kv_cache_tokens):.1f}x "
        f"the caches; Zipf {args.zipf}; {args.requests} requests at concurrency "
        f"{args.concurrency} over {args.routers} router(s) per mode, "
        f"{args.rounds} alternating rounds each)"
    )  # fmt: skip
    print("| affinity | requests | errors | prompt tokens cached (usage) | replicas' hit rate "
          "(/load) | TTFT p50 ms | TTFT p99 ms | seconds |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode, n, errors, rate, counted, p50, p99, seconds in rows:
        print(f"| {mode} | {n} | {errors} | {rate:.1%} | {counted:.1%} | {p50:.0f} | {p99:.0f} | "
              f"{seconds:.0f} |")  # fmt: skip
    print("KV usage at the end:", ", ".join(f"{load['kv_usage']:.0%}" for load in loads))


if __name__ == "__main__":
    main()
