"""What an API key's admission costs the router: the key store's admit + settle, batched per
event-loop tick (fleet/control/keys/batch.py: one EVALSHA carries every admission and settlement
queued in a tick) against the same store sending each operation as its own EVALSHA (the same
script with one operation: what the store did before batching), on uvloop as in the router, with
an embedded Redis.

Reports this process's CPU time per admit + settle (Redis runs in its own process) and the wall
time per pair, at each concurrency, median over `--rounds` in which the variants take turns.

    .venv/bin/python loadtests/bench_keys.py
    .venv/bin/python loadtests/bench_keys.py --pin --requests 5000 --concurrency 1 64 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from dataclasses import dataclass

import uvloop

from fleet.control.keys import KeyRecord, KeyStore
from fleet.control.keys.batch import LimitBatcher, Op
from fleet.embedded_redis import EmbeddedRedis

VARIANTS = ("batched", "per call")


class PerCall(LimitBatcher):
    """Sends each operation at once, as its own EVALSHA."""

    def _queue(self, op: Op) -> None:
        self._ops.append(op)
        self._send()


@dataclass
class Result:
    variant: str
    concurrency: int
    cpu_us: float
    wall_us: float
    calls: int


async def admit_settle(store: KeyStore, record: KeyRecord, count: int, concurrency: int) -> None:
    async def worker(share: int) -> None:
        for _ in range(share):
            ticket = await store.admit(record, reserve_tokens=100)
            await store.settle(ticket, 60, 20)

    share, extra = divmod(count, concurrency)
    await asyncio.gather(*(worker(share + (i < extra)) for i in range(concurrency)))


async def measure(url: str, variant: str, count: int, concurrency: int) -> Result:
    store = KeyStore(url)
    if variant == "per call":
        batcher = store.limits.batcher
        store.limits.batcher = PerCall(
            batcher.fast, batcher.layout, store.limits._slot_ttl_ms, batcher.settle_failed
        )
    try:
        record, _ = await store.admin.create(f"bench-{variant}", rpm=10**9, tpm=10**12)
        await admit_settle(store, record, 200, concurrency)  # connections, scripts cached
        stats = await store.client.info("commandstats")
        calls = stats.get("cmdstat_evalsha", {}).get("calls", 0)
        cpu, wall = time.process_time(), time.perf_counter()
        await admit_settle(store, record, count, concurrency)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        stats = await store.client.info("commandstats")
        calls = stats.get("cmdstat_evalsha", {}).get("calls", 0) - calls
    finally:
        await store.close()
    if not store.health.up:
        raise RuntimeError(f"{variant}: Redis failed during the run")
    return Result(variant, concurrency, cpu / count * 1e6, wall / count * 1e6, calls)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="admit + settle pairs per run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--rounds", type=int, default=3, help="the variants take turns; medians")
    parser.add_argument(
        "--pin", action="store_true", help="this process on CPU 0, Redis on the others"
    )
    args = parser.parse_args(argv)
    with EmbeddedRedis() as redis:
        cpus = sorted(os.sched_getaffinity(0))
        if args.pin and len(cpus) > 1 and redis.process is not None:
            os.sched_setaffinity(redis.process.pid, cpus[1:])
            os.sched_setaffinity(0, cpus[:1])
        runs: dict[tuple[str, int], list[Result]] = {}
        for concurrency in args.concurrency:
            for _ in range(args.rounds):
                for variant in VARIANTS:
                    result = uvloop.run(measure(redis.url, variant, args.requests, concurrency))
                    runs.setdefault((variant, concurrency), []).append(result)
    print(f"\nKey admission: admit + settle, {args.requests} pairs per run, "
          f"median of {args.rounds}")  # fmt: skip
    head = (
        f"{'variant':10s} {'concurrency':>11s} {'CPU us/pair':>12s} {'wall us/pair':>13s} "
        f"{'EVALSHA/pair':>13s} {'CPU vs batched':>15s}"
    )
    print(head)
    print("-" * len(head))
    for concurrency in args.concurrency:
        base = statistics.median(r.cpu_us for r in runs["batched", concurrency])
        for variant in VARIANTS:
            mine = runs[variant, concurrency]
            cpu = statistics.median(r.cpu_us for r in mine)
            wall = statistics.median(r.wall_us for r in mine)
            calls = statistics.median(r.calls for r in mine) / args.requests
            print(
                f"{variant:10s} {concurrency:11d} {cpu:12.0f} {wall:13.0f} {calls:13.2f} "
                f"{cpu / base:14.2f}x"
            )


if __name__ == "__main__":
    main()
