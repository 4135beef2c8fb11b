"""The load generator of the router benchmarks: chat requests sent by an aiohttp client at a fixed
concurrency, timed end to end and to the first content chunk, with the CPU time the target process
(psutil on its pid) spent serving them, and what it burns idle (probes, timers) sampled before."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field

import orjson
import psutil

FAKE_MODEL = "fake-model"
IDLE_SAMPLE_S = 3.0
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


@dataclass
class Run:
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    cpu_s: float = 0.0
    idle_cpu_per_s: float = 0.0

    def cpu_per_request(self, net: bool) -> float:
        """Target CPU seconds per request; `net` takes off what it burns idle (probes, timers)."""
        cpu = self.cpu_s - (self.idle_cpu_per_s * self.seconds if net else 0.0)
        return max(cpu, 0.0) / max(len(self.latencies), 1)

    def pct(self, values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def chat_bodies(count: int, stream: bool, rng: random.Random) -> list[bytes]:
    """Chat requests for the fake replicas: a shared system prompt and a random question."""
    return [
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
    idle_sample_s: float = IDLE_SAMPLE_S,
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
            await asyncio.sleep(idle_sample_s)
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
