"""What an API key's admission costs the router: the key store's admit + settle (two EVALSHA round
trips) through its pipelined RESP client (fleet/control/resp.py) and through redis-py's asyncio
client, against the same embedded Redis, on uvloop as in the router.

Both run the same `KeyStore` code; only the client under its hot path differs (redis-py's is the
store's own client for everything else, `fleet.control.redis_conn.async_client`). Reports this
process's CPU time per admit + settle (Redis runs in its own process) and the wall time per pair,
at each concurrency, median over `--rounds` in which the clients take turns.

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
from redis.exceptions import NoScriptError

from fleet.control.keys import KeyRecord, KeyStore
from fleet.control.resp import LuaScript, RespClient
from fleet.embedded_redis import EmbeddedRedis

CLIENTS = ("resp", "redis-py")


class RedisPyScripts:
    """The part of RespClient the key store's hot path uses, on a redis-py asyncio client."""

    def __init__(self, client) -> None:
        self.client = client

    async def evalsha(self, script: LuaScript, keys: list, args: list):
        try:
            return await self.client.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self.client.eval(script.source, len(keys), *keys, *args)

    async def aclose(self) -> None:
        return None  # the store closes its own client


@dataclass
class Result:
    client: str
    concurrency: int
    cpu_us: float
    wall_us: float


async def admit_settle(store: KeyStore, record: KeyRecord, count: int, concurrency: int) -> None:
    async def worker(share: int) -> None:
        for _ in range(share):
            ticket = await store.admit(record, reserve_tokens=100)
            await store.settle(ticket, 60, 20)

    share, extra = divmod(count, concurrency)
    await asyncio.gather(*(worker(share + (i < extra)) for i in range(concurrency)))


async def measure(url: str, client: str, count: int, concurrency: int) -> Result:
    store = KeyStore(url)
    if client == "redis-py":
        await store._fast.aclose()
        store._fast = RedisPyScripts(store.client)  # type: ignore[assignment]
    else:
        assert isinstance(store._fast, RespClient)
    try:
        record, _ = await store.admin.create(f"bench-{client}", rpm=10**9, tpm=10**12)
        await admit_settle(store, record, 200, concurrency)  # connections, scripts cached
        cpu, wall = time.process_time(), time.perf_counter()
        await admit_settle(store, record, count, concurrency)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        await store.close()
    if not store.health.up:
        raise RuntimeError(f"{client}: Redis failed during the run")
    return Result(client, concurrency, cpu / count * 1e6, wall / count * 1e6)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="admit + settle pairs per run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--rounds", type=int, default=3, help="the clients take turns; medians")
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
                for client in CLIENTS:
                    result = uvloop.run(measure(redis.url, client, args.requests, concurrency))
                    runs.setdefault((client, concurrency), []).append(result)
    print(f"\nKey admission: admit + settle (2 EVALSHA), {args.requests} pairs per run, "
          f"median of {args.rounds}")  # fmt: skip
    head = f"{'client':10s} {'concurrency':>11s} {'CPU us/pair':>12s} {'wall us/pair':>13s} {'CPU vs resp':>12s}"
    print(head)
    print("-" * len(head))
    for concurrency in args.concurrency:
        base = statistics.median(r.cpu_us for r in runs["resp", concurrency])
        for client in CLIENTS:
            cpu = statistics.median(r.cpu_us for r in runs[client, concurrency])
            wall = statistics.median(r.wall_us for r in runs[client, concurrency])
            print(f"{client:10s} {concurrency:11d} {cpu:12.0f} {wall:13.0f} {cpu / base:11.2f}x")


if __name__ == "__main__":
    main()
