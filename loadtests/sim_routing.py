"""Routing simulator: the router's real `prefix` policy in front of 100 and 1,000 modelled replicas
(loadtests/sim_fleet.py: a KV cache of chained-hash blocks and a request queue each), with about
1M prompt chunks in the policy's index, and no processes.

Each fleet size runs twice over the same kind of traffic (tenants with 1,024-token system prompts
and Zipf popularity, each request adding a unique 2,048-token question): first it fills the index
with tracemalloc on, and counts the bytes that router/ code holds afterwards (the index, its live
prefixes, the per-replica state), over the replica count; then it routes `--measure` more
requests with tracemalloc off and the router's garbage-collector settings, timing each
`Policy.choose`: wall time, and CPU time (what it costs where other processes share the cores). The index holds
at most `MAX_INDEX_CHUNKS` chunks per replica (router/policies/prefix.py), whatever the replica's
KV cache, so this memory is bounded per replica.

    .venv/bin/python loadtests/sim_routing.py
    .venv/bin/python loadtests/sim_routing.py --replicas 100 --chunks 200000 --measure 2000

Prints one row per fleet size: replicas, indexed chunks, decision wall and CPU time p50/p99/max
in µs, router KiB per replica.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sim_fleet import CHARS_PER_TOKEN, SimFleet, make_tenants, run_concurrent

import router
from router.routing.policies import PrefixPolicy
from router.routing.prompt_key import chat_units
from router.serve import GC_YOUNG_THRESHOLD

ROUTER_DIR = str(Path(router.__file__).resolve().parent)
SYSTEM_TOKENS = 1024
QUESTION_TOKENS = 2048
TOKENS_PER_CHUNK = 32  # the policy's 128-character chunks at 4 characters per token


@dataclass
class Row:
    replicas: int
    chunks: int
    wall_us: tuple[float, float, float]  # p50, p99, max
    cpu_us: tuple[float, float, float]
    kib_per_replica: float


class TimedPolicy(PrefixPolicy):
    """The real policy, with each decision's wall and CPU time recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.wall_ns: list[int] | None = None
        self.cpu_ns: list[int] = []

    def choose(self, request, candidates):  # type: ignore[no-untyped-def]
        if self.wall_ns is None:
            return super().choose(request, candidates)
        cpu, wall = time.thread_time_ns(), time.perf_counter_ns()
        decision = super().choose(request, candidates)
        self.wall_ns.append(time.perf_counter_ns() - wall)
        self.cpu_ns.append(time.thread_time_ns() - cpu)
        return decision


def percentiles(times_ns: list[int]) -> tuple[float, float, float]:
    times = sorted(times_ns)
    return (
        statistics.median(times) / 1000,
        times[int(0.99 * (len(times) - 1))] / 1000,
        times[-1] / 1000,
    )


def prompts(rng: random.Random, tenants: int) -> Iterator[str]:
    """Endless chats: a Zipf-popular tenant's system prompt and a unique question."""
    systems = [t.system for t in make_tenants(rng, tenants, [SYSTEM_TOKENS])]
    weights = [1.0 / (rank + 1) ** 1.1 for rank in range(tenants)]
    while True:
        system = rng.choices(systems, weights)[0]
        question = rng.randbytes(QUESTION_TOKENS * CHARS_PER_TOKEN // 2).hex()
        yield chat_units(
            [{"role": "system", "content": system}, {"role": "user", "content": question}]
        )


def indexed(policy: PrefixPolicy, fleet: SimFleet) -> int:
    return sum(policy.indexed_chunks(sim.replica.id) for sim in fleet.replicas)


def simulate(replicas: int, chunks: int, measure: int, seed: int) -> Row:
    rng = random.Random(seed)
    policy = TimedPolicy()
    capacity_tokens = chunks // replicas * TOKENS_PER_CHUNK
    ids = [f"replica-{rng.getrandbits(48):012x}" for _ in range(replicas)]
    fleet = SimFleet(ids, capacity_tokens, policy, block_tokens=TOKENS_PER_CHUNK)
    source = prompts(rng, tenants=2 * replicas)
    per_request = QUESTION_TOKENS // TOKENS_PER_CHUNK
    tracemalloc.start()
    while indexed(policy, fleet) < 0.98 * chunks:
        count = max((chunks - indexed(policy, fleet)) // per_request, 64)
        run_concurrent(fleet, [next(source) for _ in range(count)], 2 * replicas, slots=8)
    snapshot = tracemalloc.take_snapshot()
    tracemalloc.stop()
    held = snapshot.filter_traces([tracemalloc.Filter(True, ROUTER_DIR + "/*")])
    router_bytes = sum(stat.size for stat in held.statistics("filename"))
    gc.collect()  # as the router runs once it is up (router/server.py)
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    policy.wall_ns = []
    run_concurrent(fleet, [next(source) for _ in range(measure)], 2 * replicas, slots=8)
    gc.unfreeze()
    return Row(
        replicas,
        indexed(policy, fleet),
        percentiles(policy.wall_ns),
        percentiles(policy.cpu_ns),
        router_bytes / replicas / 1024,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--chunks", type=int, default=1_000_000, help="prompt chunks to index")
    parser.add_argument("--measure", type=int, default=5000, help="decisions timed per size")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(
        f"{'replicas':>8} {'chunks':>9} | {'wall p50':>8} {'p99':>7} {'max':>7} | "
        f"{'cpu p50':>8} {'p99':>7} {'max':>7} | {'KiB/replica':>11}   (decisions, µs)"
    )
    for n in args.replicas:
        row = simulate(n, args.chunks, args.measure, args.seed)
        wall, cpu = row.wall_us, row.cpu_us
        print(
            f"{row.replicas:>8} {row.chunks:>9} | {wall[0]:>8.1f} {wall[1]:>7.1f} {wall[2]:>7.0f} | "
            f"{cpu[0]:>8.1f} {cpu[1]:>7.1f} {cpu[2]:>7.0f} | {row.kib_per_replica:>11.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
