"""Streams that survive their replica (issue #15 item 4), with real processes: three tiny-model
replicas behind a router, 50 concurrent streams (half greedy, half seeded), and the replica
serving the most of them killed with SIGKILL (or frozen with SIGSTOP) mid-way. Every stream must
end normally ([DONE], no error event) with the text and usage of an undisturbed run of the same
requests."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import orjson
import pytest
from fault_harness import (
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
MAX_TOKENS = 160
KILL_AFTER_CHUNKS = 10  # content chunks each of the victim's streams has had before the kill


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
    # A frozen replica is found by the idle timeout (the last --idle-timeout given wins).
    front = router("router", redis.url, work, "--policy", "least-load", "--idle-timeout", "5")
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


async def _run(fleet: Fleet, fault: str = "") -> tuple[list[Stream], str, list[int]]:
    """All streams at once; with a `fault` ("kill": SIGKILL, "freeze": SIGSTOP), inflict it on
    the replica that started the most of them once each of its streams is KILL_AFTER_CHUNKS
    chunks in (or one of them has ended: on a loaded machine a late stream may lag far behind).
    Returns the streams, the victim and the indices of the victim's streams the fault cut."""
    headers = {"Authorization": f"Bearer {fleet.key.secret}"}
    limits = httpx.Limits(max_connections=STREAMS, max_keepalive_connections=STREAMS)
    seen = [Stream() for _ in range(STREAMS)]
    victim, cut = "", []
    async with httpx.AsyncClient(headers=headers, timeout=300, limits=limits) as client:
        tasks = [
            asyncio.create_task(_stream(client, fleet.front.url, i, seen[i]))
            for i in range(STREAMS)
        ]
        if fault:
            await _wait(lambda: all(s.replica for s in seen), 120)
            victim = Counter(s.replica for s in seen).most_common(1)[0][0]
            on_victim = [s for s in seen if s.replica == victim]
            await _wait(
                lambda: (
                    min(s.chunks for s in on_victim) >= KILL_AFTER_CHUNKS
                    or any(s.usage for s in on_victim)
                ),
                120,
            )
            cut = [i for i, s in enumerate(seen) if s.replica == victim and not s.usage]
            assert cut, "the fault came too late"
            [proc] = [p for p in fleet.replicas if p.name == victim]
            if fault == "kill":
                proc.kill()
            else:
                proc.signal(signal.SIGSTOP)
        await asyncio.gather(*tasks)
    return seen, victim, cut


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
    _check(fleet, "kill")


def test_streams_survive_a_replica_frozen_mid_stream(fleet: Fleet) -> None:
    """SIGSTOP: the connection stays open; the router's idle timeout finds the replica silent."""
    _check(fleet, "freeze")


def _check(fleet: Fleet, fault: str) -> None:
    """An undisturbed run, then the same streams with `fault`: compare them."""
    assert sum(p.alive for p in fleet.replicas) >= 2, "the fault needs a replica left to resume on"
    resumed_before = _resumed_count(fleet.front.url)
    charged_before = _charged(fleet)
    began = time.monotonic()
    undisturbed, _, _ = asyncio.run(_run(fleet))
    for s in undisturbed:
        assert s.done and not s.error and s.usage["completion_tokens"] == MAX_TOKENS, s
    middle = time.monotonic()
    disturbed, victim, resumed = asyncio.run(_run(fleet, fault))
    took = time.monotonic() - middle
    resumed_by_router = _resumed_count(fleet.front.url) - resumed_before
    charged = _charged(fleet) - charged_before

    ended = sum(s.done and not s.error for s in disturbed)
    errors = [s.error for s in disturbed if s.error]
    same = [
        i
        for i, (s, u) in enumerate(zip(disturbed, undisturbed, strict=True))
        if s.text == u.text and _counts(s.usage) == _counts(u.usage)
    ]
    print(
        f"\nresume ({fault}): {STREAMS} streams ({STREAMS // 2} greedy, {STREAMS // 2} seeded), "
        f"max_tokens {MAX_TOKENS}; {victim} had {len(resumed)} streams cut, "
        f"{KILL_AFTER_CHUNKS}+ chunks in; router resumed {resumed_by_router}; ended normally "
        f"{ended}/{STREAMS}; error events {len(errors)}; equal to the undisturbed run (text, "
        f"prompt and completion tokens): {len(same)}/{STREAMS} (greedy "
        f"{sum(i % 2 == 0 for i in same)}/{STREAMS // 2}, seeded {sum(i % 2 for i in same)}/"
        f"{STREAMS // 2}; resumed {sum(i in same for i in resumed)}/{len(resumed)}); key charged "
        f"{charged} completion tokens for 2 x {STREAMS} streams; runs {middle - began:.1f} s "
        f"undisturbed, {took:.1f} s disturbed"
    )
    assert resumed, "the victim served no stream"
    assert not errors, errors[:3]
    assert ended == STREAMS
    assert resumed_by_router == len(resumed)
    for i, s in enumerate(disturbed):
        assert s.roles == 1 and len(s.ids) == 1 and len(s.created) == 1, (i, s)
        assert s.usage is not None and s.usage["completion_tokens"] == MAX_TOKENS, (i, s.usage)
    # The key is charged once per stream, the total: nothing twice, nothing lost.
    assert charged == 2 * STREAMS * MAX_TOKENS
    assert asyncio.run(key_usage(fleet.redis.url, [fleet.key]))[fleet.key.id].concurrent == 0
    assert len(same) == STREAMS, [i for i in range(STREAMS) if i not in same]


def _charged(fleet: Fleet) -> int:
    return asyncio.run(key_usage(fleet.redis.url, [fleet.key]))[fleet.key.id].completion_tokens
