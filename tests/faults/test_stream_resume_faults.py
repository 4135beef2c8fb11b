"""Streams that survive their replica (issue #15 item 4), with real processes: three tiny-model
replicas behind a router, 50 concurrent streams (half greedy, half seeded), and the replica
serving the most of them killed with SIGKILL mid-way. Every stream must end normally ([DONE], no
error event) with the text and usage of an undisturbed run of the same requests."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import orjson
import pytest
from harness import (
    ADMIN_KEY,
    FleetKey,
    Proc,
    RedisProc,
    create_keys,
    key_usage,
    real_replica,
    routable,
    router,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

STREAMS = 50
MAX_TOKENS = 80
KILL_AFTER_CHUNKS = 15  # content chunks each of the victim's streams has had before the kill


@dataclass
class Fleet:
    redis: RedisProc
    replicas: list[Proc]
    front: Proc
    key: FleetKey


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, model_factory) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("resume-fleet")
    model = model_factory("llama", "tiny", seed=0)
    redis = RedisProc(work / "redis").start()
    replicas = [real_replica(f"resume-{i}", model, redis.url, work) for i in range(3)]
    for replica in replicas:
        replica.env["OMP_NUM_THREADS"] = "1"  # three engines on a small box: no oversubscription
    front = router("router", redis.url, work, "--policy", "least-load")
    try:
        for replica in replicas:
            replica.start(wait=0)
        for replica in replicas:
            replica.wait_healthy(240)
        front.start()
        wait_until(lambda: routable(front.url) == 3, 60, "the router to see three replicas")
        [key] = asyncio.run(create_keys(redis.url, 1, max_concurrent=STREAMS * 2))
        yield Fleet(redis, replicas, front, key)
    finally:
        for proc in [front, *replicas]:
            proc.kill()
        redis.stop()


@dataclass
class Stream:
    """What one client saw of its stream."""

    replica: str = ""  # the replica that started it (x-fleet-replica)
    text: str = ""
    chunks: int = 0  # content chunks
    roles: int = 0
    ids: set[str] = field(default_factory=set)
    created: set[int] = field(default_factory=set)
    usage: dict | None = None
    error: str = ""
    done: bool = False


def _request(i: int) -> dict:
    body = {
        "model": "faulty", "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": f"Story {i}: the fox and the {i * 7} hens."}],
    }  # fmt: skip
    if i % 2:
        body.update(temperature=1.0, top_p=0.95, seed=1000 + i)
    else:
        body["temperature"] = 0
    return body


async def _stream(client: httpx.AsyncClient, url: str, i: int, seen: Stream) -> None:
    async with client.stream("POST", f"{url}/v1/chat/completions", json=_request(i)) as response:
        assert response.status_code == 200, await response.aread()
        seen.replica = response.headers["x-fleet-replica"]
        pending = b""
        async for data in response.aiter_bytes():
            *frames, pending = (pending + data).split(b"\n\n")
            for frame in frames:
                payload = frame.removeprefix(b"data: ")
                if payload == b"[DONE]":
                    seen.done = True
                    continue
                chunk = orjson.loads(payload)
                if "error" in chunk:
                    seen.error = str(chunk["error"])
                    continue
                seen.ids.add(chunk["id"])
                seen.created.add(chunk["created"])
                if chunk.get("usage"):
                    seen.usage = chunk["usage"]
                for choice in chunk["choices"]:
                    delta = choice["delta"]
                    seen.roles += "role" in delta
                    if delta.get("content"):
                        seen.text += delta["content"]
                        seen.chunks += 1
        assert not pending.strip(), pending


async def _run(fleet: Fleet, kill: bool) -> tuple[list[Stream], str]:
    """All streams at once; with `kill`, SIGKILL the replica that started the most of them once
    each of its streams is KILL_AFTER_CHUNKS chunks in. Returns the streams and the victim."""
    headers = {"Authorization": f"Bearer {fleet.key.secret}"}
    limits = httpx.Limits(max_connections=STREAMS, max_keepalive_connections=STREAMS)
    seen = [Stream() for _ in range(STREAMS)]
    victim = ""
    async with httpx.AsyncClient(headers=headers, timeout=300, limits=limits) as client:
        tasks = [
            asyncio.create_task(_stream(client, fleet.front.url, i, seen[i]))
            for i in range(STREAMS)
        ]
        if kill:
            await _wait(lambda: all(s.replica for s in seen), 120)
            victim = Counter(s.replica for s in seen).most_common(1)[0][0]
            on_victim = [s for s in seen if s.replica == victim]
            await _wait(lambda: min(s.chunks for s in on_victim) >= KILL_AFTER_CHUNKS, 120)
            assert all(not s.usage for s in on_victim), "killed too late"
            [proc] = [p for p in fleet.replicas if p.name == victim]
            proc.kill()  # SIGKILL
        await asyncio.gather(*tasks)
    return seen, victim


async def _wait(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def _resumed_count(url: str) -> int:
    metrics = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in metrics.splitlines()
        if line.startswith("fleet_router_retries_total") and 'reason="stream resumed"' in line
    )


def _counts(usage: dict | None) -> tuple[int, int] | None:
    """Prompt and completion tokens (cached_tokens differ: the first run fills the prefix cache)."""
    return None if usage is None else (usage["prompt_tokens"], usage["completion_tokens"])


def test_streams_survive_a_replica_killed_mid_stream(fleet: Fleet) -> None:
    began = time.monotonic()
    undisturbed, _ = asyncio.run(_run(fleet, kill=False))
    for s in undisturbed:
        assert s.done and not s.error and s.usage["completion_tokens"] == MAX_TOKENS, s
    middle = time.monotonic()
    disturbed, victim = asyncio.run(_run(fleet, kill=True))
    print(
        f"\nundisturbed run {middle - began:.1f} s, disturbed run {time.monotonic() - middle:.1f} s"
    )

    resumed = [i for i, s in enumerate(disturbed) if s.replica == victim]
    ended = sum(s.done and not s.error for s in disturbed)
    errors = [s.error for s in disturbed if s.error]
    same = [
        i
        for i, (s, u) in enumerate(zip(disturbed, undisturbed, strict=True))
        if s.text == u.text and _counts(s.usage) == _counts(u.usage)
    ]
    greedy_same = sum(i % 2 == 0 for i in same)
    seeded_same = sum(i % 2 == 1 for i in same)
    on_victim_same = sum(i in same for i in resumed)
    print(
        f"\nresume: {STREAMS} streams ({STREAMS // 2} greedy, {STREAMS // 2} seeded), "
        f"max_tokens {MAX_TOKENS}; killed {victim} (SIGKILL) with {len(resumed)} streams on it, "
        f"each >= {KILL_AFTER_CHUNKS} chunks in; router resumed {_resumed_count(fleet.front.url)}"
        f"; ended normally {ended}/{STREAMS}; error events {len(errors)}; equal to the "
        f"undisturbed run (text, prompt and completion tokens): {len(same)}/{STREAMS} (greedy {greedy_same}/"
        f"{STREAMS // 2}, seeded {seeded_same}/{STREAMS // 2}; resumed ones {on_victim_same}/"
        f"{len(resumed)})"
    )
    assert resumed, "the victim served no stream"
    assert not errors, errors[:3]
    assert ended == STREAMS
    assert _resumed_count(fleet.front.url) == len(resumed)
    for i, s in enumerate(disturbed):
        assert s.roles == 1 and len(s.ids) == 1 and len(s.created) == 1, (i, s)
        assert s.usage is not None and s.usage["completion_tokens"] == MAX_TOKENS, (i, s.usage)
    # The key is charged once per stream, the total (both runs): nothing twice, nothing lost.
    charged = asyncio.run(key_usage(fleet.redis.url, [fleet.key]))[fleet.key.id]
    print(f"key charged {charged.completion_tokens} completion tokens for 2 x {STREAMS} streams")
    assert charged.completion_tokens == 2 * STREAMS * MAX_TOKENS
    assert charged.concurrent == 0
    assert len(same) == STREAMS, [i for i in range(STREAMS) if i not in same]
