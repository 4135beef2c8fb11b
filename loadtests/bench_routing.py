"""Router benchmark, part 2: what the routing policies buy (run it through bench_router.py).

Three real replicas (`python -m replica` on a small random model, with `--kv-cache-tokens` too
small for one replica to hold every tenant's prompt) serve a shared-prefix multi-tenant workload
(16 tenants, 1,500-token system prompts, short questions) and multi-turn chats, through the router
with each policy. Reports the replicas' prefix-cache hit rate (from their `/load` counters) and
time to the first content token.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
from bench_load import WORDS, Run, drive
from bench_plot import Panel
from bench_processes import PY, free_port, processes, router_cmd, spawn, split_cpus, wait_ready

SERVED = "bench-model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("routing quality")
    group.add_argument("--replicas", type=int, default=3)
    group.add_argument("--kv-cache-tokens", type=int, default=10240)
    group.add_argument("--tenants", type=int, default=16)
    group.add_argument("--tenant-tokens", type=int, default=1500)
    group.add_argument("--routing-requests", type=int, default=160)
    group.add_argument("--concurrency", type=int, default=6)
    group.add_argument("--conversations", type=int, default=12)
    group.add_argument("--turns", type=int, default=4)
    group.add_argument("--chat-system-tokens", type=int, default=400)
    group.add_argument("--policies", nargs="+", default=["prefix", "least-load", "round-robin"])


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

    router_cpus, other_cpus = split_cpus(args.pin)
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


def routing_panels(rows: list[RoutingRow]) -> list[Panel]:
    if not rows:
        return []
    policies = list(dict.fromkeys(r.policy for r in rows))
    workloads = list(dict.fromkeys(r.workload for r in rows))
    by = {(r.policy, r.workload): r for r in rows}
    rates = {p: [by[p, w].hit_rate * 100 for w in workloads] for p in policies}
    ttft = {p: [by[p, w].ttft_p50_ms for w in workloads] for p in policies}
    return [
        Panel("prefix-cache hit rate (%)", workloads, rates),
        Panel("TTFT p50 (ms)", workloads, ttft),
    ]
