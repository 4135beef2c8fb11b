"""Attacks on the router's request path (router.app, router.proxy) with real fake-replica
processes, a real Redis key store and the router's real server on loopback: requests whose shape
must not count against a replica, pinned paths that tried to dodge a key's limits, streams cut
to avoid billing, fan-out that reserved for one prompt, readers that stop reading, answers too
big to hold, and metric labels a client chose."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest
from router_harness import (
    MODEL,
    FakeReplica,
    chat,
    fake_replicas,
    fresh,
    router_config,
    run_router,
)

from fleet.control.errors import APIError
from router.backends.backend import Replica
from router.http.paths import canonical, pinned_target
from router.routing.tokens import TokenEstimator
from router.usage import usage_of_answer

OTHER_MODEL = "other-model"


@pytest.fixture(scope="module")
def fakes() -> Iterator[list[FakeReplica]]:
    """Two fake replicas of MODEL and one of OTHER_MODEL for the module."""
    with (
        fake_replicas(2, "--model", MODEL, "--chunks", "8") as same,
        fake_replicas(1, "--model", OTHER_MODEL, "--chunks", "8") as other,
    ):
        yield [*same, *other]


@pytest.fixture
def replicas(fakes: list[FakeReplica]) -> list[FakeReplica]:
    return fresh(fakes)


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def requests_seen(replicas: list[FakeReplica]) -> int:
    return sum(r.stats()["requests"] for r in replicas)


# -- a request's shape never counts against a replica


async def test_a_request_past_its_ttfb_is_not_retried_nor_blamed_on_the_replica(replicas) -> None:
    """One slow request used to be re-sent to every replica of its model, and each timeout
    counted toward ejecting a healthy replica."""
    same = replicas[:2]
    for fake in same:
        fake.configure(delay=1.5)
    config = router_config(same, ttfb_timeout_s=0.4, max_attempts=3)
    async with run_router(config) as router:
        answer = await router.client.post("/v1/chat/completions", json=chat())
        blamed = sum(r.failures for r in router.app.pool.replicas.values())
    assert answer.status_code == 504
    assert "not retried" in answer.json()["error"]["message"]
    assert requests_seen(same) == 1
    assert blamed == 0


async def test_a_replica_recreated_by_membership_still_counts_as_tried(replicas) -> None:
    """Retries exclude replicas by id: a new object for the same replica is the same replica."""
    fake = replicas[0]
    fake.configure(delay=0.3, fail_after_chunks=0)  # the stream breaks before its first byte
    async with run_router(router_config([fake], max_attempts=3)) as router:
        pool = router.app.pool

        async def recreate_while_in_flight() -> None:
            await asyncio.sleep(0.1)
            old = pool.replicas[fake.id]
            fresh = Replica(old.id, old.url, model=old.model, max_model_len=old.max_model_len)
            pool.replicas[fake.id] = fresh
            pool.by_model[MODEL] = [fresh]

        recreating = asyncio.create_task(recreate_while_in_flight())
        answer = await router.client.post("/v1/chat/completions", json=chat(stream=True))
        await recreating
    assert answer.status_code == 502
    assert fake.stats()["requests"] == 1


async def test_head_on_a_pinned_route_is_answered_and_costs_the_replica_nothing(replicas) -> None:
    """HEAD was forwarded as HEAD: the router's parser then waited for a body that never
    comes until the TTFB timeout, and each such timeout counted against a healthy replica."""
    target = replicas[0]
    config = router_config([target], ttfb_timeout_s=1.0)
    async with run_router(config) as router:
        started = time.monotonic()
        heads = await asyncio.gather(
            *(router.client.head(f"/replicas/{target.id}/health") for _ in range(4))
        )
        took = time.monotonic() - started
        replica = router.app.pool.replicas[target.id]
        after = [await router.client.post("/v1/chat/completions", json=chat()) for _ in range(5)]
    assert [h.status_code for h in heads] == [200] * 4
    assert took < 0.9
    assert replica.failures == 0 and replica.breaker.state == "closed"
    assert [a.status_code for a in after] == [200] * 5


# -- pinned paths: normalised, allow-listed, and under the key's models and limits


async def test_encoded_pinned_paths_cannot_reach_a_model_the_key_may_not_use(
    replicas, key_store
) -> None:
    _, secret = await key_store.admin.create("m1-only", models=[MODEL])
    other = replicas[2]
    body = {"model": OTHER_MODEL, "prompt": "hello", "max_tokens": 4}
    async with run_router(router_config(replicas), key_store=key_store) as router:
        tries = [
            f"/replicas/{other.id}/v1/completions",
            f"/replicas/{other.id}/v1/%63ompletions",
            f"/replicas/{other.id}/v1%2Fcompletions",
            f"/replicas/{other.id}//v1/./completions",
            f"/replicas/%{other.id.encode().hex().upper()[:2]}{other.id[1:]}/v1/completions",
        ]
        answers = [
            await router.client.post(path, json=body, headers=bearer(secret)) for path in tries
        ]
    assert [a.status_code for a in answers] == [403] * len(tries), [a.text for a in answers]
    assert other.stats()["requests"] == 0


async def test_pinned_routes_reach_only_the_openai_routes(replicas, key_store) -> None:
    _, secret = await key_store.admin.create("curious")
    target = replicas[0]
    async with run_router(router_config(replicas), key_store=key_store) as router:
        internal = [
            await router.client.request(
                method, f"/replicas/{target.id}{path}", headers=bearer(secret)
            )
            for method, path in [
                ("GET", "/load"),
                ("GET", "/metrics"),
                ("GET", "/fake/stats"),
                ("POST", "/fake/reset"),
                ("DELETE", "/v1/models"),
                ("GET", "/v1/completions"),
                ("GET", "/v1/%2e%2e/fake/stats"),
            ]
        ]
        models = await router.client.get(f"/replicas/{target.id}/v1/models", headers=bearer(secret))
        double = await router.client.get(
            f"/replicas/{target.id}/v1/models%252F", headers=bearer(secret)
        )
    assert [a.status_code for a in internal] == [404, 404, 404, 404, 405, 405, 404]
    assert all(set(a.json()["error"]) >= {"message", "type", "param", "code"} for a in internal)
    assert models.status_code == 200 and models.json()["data"][0]["id"] == MODEL
    assert double.status_code == 400
    assert all(
        a.json()["error"]["code"] == "route_not_found" for a in internal if a.status_code == 404
    )


async def test_pinned_generation_is_reserved_and_charged_against_tpm(replicas, key_store) -> None:
    """A tpm-limited key got 30/30 through a pinned path while the normal path answered 429."""
    record, secret = await key_store.admin.create("tpm", tpm=60)
    target = replicas[0]
    body = {"model": MODEL, "prompt": "hello there", "max_tokens": 8}
    async with run_router(router_config(replicas[:2]), key_store=key_store) as router:
        codes = [
            (
                await router.client.post(
                    f"/replicas/{target.id}/v1/%63ompletions", json=body, headers=bearer(secret)
                )
            ).status_code
            for _ in range(12)
        ]
    usage = await key_store.admin.usage(record.id)
    assert 429 in codes
    assert codes.count(200) < 12
    assert usage.completion_tokens == 8 * codes.count(200)
    assert usage.window_tokens > 0


def test_paths_are_matched_on_their_canonical_spelling() -> None:
    assert canonical("/v1/%63ompletions") == "/v1/completions"
    assert canonical("/replicas/r1/v1%2Fchat%2Fcompletions") == "/replicas/r1/v1/chat/completions"
    assert canonical("//v1///models/") == "/v1/models/"
    assert canonical("/replicas/r1/../../admin/stats") == "/admin/stats"
    for bad in ("/v1/%2563ompletions", "/v1/%0acompletions", "/v1/%ff%fe"):
        with pytest.raises(APIError) as refused:
            canonical(bad)
        assert refused.value.status == 400
    target = pinned_target("/replicas/r1/v1/models/org/name", "HEAD")
    assert (target.kind, target.method, target.path) == ("models", "GET", "/v1/models/org/name")
    with pytest.raises(APIError) as refused:
        pinned_target("/replicas/r1/load", "GET")
    assert refused.value.status == 404


# -- billing: cut streams and fan-out


async def test_a_stream_cut_by_the_client_is_charged(replicas, key_store) -> None:
    record, secret = await key_store.admin.create("leaver", max_concurrent=4)
    fake = replicas[0]
    fake.configure(chunks=200, chunk_delay=0.01)
    async with (
        run_router(router_config([fake]), key_store=key_store) as router,
        httpx.AsyncClient(base_url=router.url, headers=bearer(secret)) as client,
    ):
        seen = 0
        async with client.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as r:
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= 20:
                    break
        for _ in range(50):
            usage = await key_store.admin.usage(record.id)
            if usage.completion_tokens and usage.concurrent == 0:
                break
            await asyncio.sleep(0.05)
    assert usage.prompt_tokens > 0
    assert 20 <= usage.completion_tokens < 200
    assert usage.concurrent == 0


async def test_fan_out_is_reserved_for_every_prompt_and_choice(replicas, key_store) -> None:
    """8 prompts x n=2 x 5 tokens is 80 tokens of answer: with tpm=80 the first request takes
    the whole minute's budget, so a second one at the same time is refused."""
    _, secret = await key_store.admin.create("fanout", tpm=80)
    fake = replicas[0]
    fake.configure(delay=0.5)
    body = {"model": MODEL, "prompt": ["p"] * 8, "n": 2, "max_tokens": 5}
    async with run_router(router_config([fake]), key_store=key_store) as router:
        first = asyncio.create_task(
            router.client.post("/v1/completions", json=body, headers=bearer(secret))
        )
        await asyncio.sleep(0.2)
        second = await router.client.post("/v1/completions", json=body, headers=bearer(secret))
        await first
    assert second.status_code == 429
    assert "tpm" in second.json()["error"]["message"]


# -- clients that stop reading, answers too big to hold


async def test_a_client_that_stops_reading_is_cut_and_frees_its_slot(replicas, key_store) -> None:
    record, secret = await key_store.admin.create("stalls", max_concurrent=1)
    fake = replicas[0]
    fake.configure(chunks=400_000)
    config = router_config([fake], idle_timeout_s=1.0)
    async with run_router(config, key_store=key_store) as router:
        body = orjson.dumps(chat(stream=True))
        sock = socket.create_connection(("127.0.0.1", router.server.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + secret.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body
        )
        with contextlib.closing(sock):
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                stats = fake.stats()
                if stats["aborted"] == 1 and stats["active"] == 0:
                    break
                await asyncio.sleep(0.1)
            after = await router.client.post(
                "/v1/chat/completions", json=chat(), headers=bearer(secret)
            )
    assert stats["aborted"] == 1 and stats["active"] == 0
    assert after.status_code == 200
    usage = await key_store.admin.usage(record.id)
    assert usage.completion_tokens > 0


async def test_an_answer_too_big_to_hold_is_refused_without_blaming_the_replica(replicas) -> None:
    fake = replicas[0]
    fake.configure(chunks=2000)
    config = router_config([fake], max_answer_bytes=4096)
    async with run_router(config) as router:
        big = await router.client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
        replica = router.app.pool.replicas[fake.id]
        small = await router.client.post(
            "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}
        )
    assert big.status_code == 502 and big.json()["error"]["code"] == "answer_too_large"
    assert replica.failures == 0
    assert small.status_code == 200
    assert fake.stats()["requests"] == 2


def test_usage_is_read_from_the_answer_without_parsing_it_whole() -> None:
    text = 'a "usage": {"prompt_tokens": 1} inside text'
    body = orjson.dumps(
        {
            "choices": [{"text": text}],
            "usage": {"prompt_tokens": 3, "prompt_tokens_details": {"cached_tokens": 1}},
        }
    )
    assert usage_of_answer(body) == {
        "prompt_tokens": 3,
        "prompt_tokens_details": {"cached_tokens": 1},
    }
    assert usage_of_answer(orjson.dumps({"choices": [{"text": text}]})) is None
    assert usage_of_answer(b'{"usage": null}') is None


# -- metrics


async def test_metric_labels_carry_only_known_models_and_metrics_can_need_a_key(replicas) -> None:
    target = replicas[0]
    huge = "m" * 100_000
    config = router_config(replicas[:2], metrics_key="scrape-secret")
    async with run_router(config) as router:
        for _ in range(50):  # a probe that timed out on a busy machine is retried
            if router.replica(target.id).model:
                break
            await asyncio.sleep(0.1)
        pinned = await router.client.post(
            f"/replicas/{target.id}/v1/completions", json={"model": huge, "prompt": "x"}
        )
        unpinned = await router.client.post("/v1/completions", json={"model": huge, "prompt": "x"})
        anonymous = await router.client.get("/metrics")
        scraped = await router.client.get("/metrics", headers=bearer("scrape-secret"))
        by_admin = await router.client.get("/metrics", headers=bearer("admin-secret"))
    assert pinned.status_code == 404 and unpinned.status_code == 404
    assert anonymous.status_code == 401
    assert scraped.status_code == 200 and by_admin.status_code == 200
    assert huge not in scraped.text
    assert len(scraped.content) < 100_000


def test_one_keys_text_cannot_skew_another_keys_token_estimate() -> None:
    """Emoji prompts (several tokens a character) from one key moved the shared ratio from 1.58
    to 0.36 characters a token, and another key's reservations grew fourfold into 429s."""
    tokens = TokenEstimator()
    plain = "a plain English question about serving models " * 4
    tokens.observe(MODEL, plain, len(plain) // 4)
    before = tokens.estimate(MODEL, plain, "other-key")
    emoji = "🙂" * 64
    for _ in range(200):
        tokens.observe(MODEL, emoji, len(emoji) * 3, "emoji-key")
    assert tokens.estimate(MODEL, plain, "other-key") == before
    assert tokens.estimate(MODEL, plain) == before
    assert tokens.estimate(MODEL, emoji, "emoji-key") >= len(emoji) * 2


# -- a body's size bounds what it costs the router's event loop

BIG_BODIES = {
    "one-token prompts": {"prompt": [[1]] * 1_000_000},
    "token ids": {"prompt": [1] * 2_000_000},
    "messages": {"messages": [{"role": "user", "content": "a"}] * 250_000},
}


@pytest.mark.parametrize("case", list(BIG_BODIES))
async def test_the_largest_body_holds_the_event_loop_briefly(replicas, case: str) -> None:
    """Within the default body limit, a body of millions of small items once held the router's
    loop (and every other client of it) for seconds: its decoding, the collections its
    containers triggered, and hashing all of it for the prompt key."""
    body = orjson.dumps({"model": MODEL, "max_tokens": 1, **BIG_BODIES[case]})
    config = router_config(replicas[:2], policy="prefix")
    assert len(body) <= config.max_body_bytes
    lags: list[float] = []

    async def probe() -> None:
        while True:
            started = time.monotonic()
            await asyncio.sleep(0.005)
            lags.append(time.monotonic() - started - 0.005)

    async with run_router(config) as router:
        route = "/v1/chat/completions" if "messages" in BIG_BODIES[case] else "/v1/completions"
        prober = asyncio.create_task(probe())
        answer = await router.client.post(
            route, content=body, headers={"Content-Type": "application/json"}
        )
        prober.cancel()
    assert answer.status_code == 200, answer.text[:300]
    assert lags and max(lags) < 1.0, f"the loop was held {max(lags):.2f} s"
