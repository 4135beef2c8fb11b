"""Embeddings through the router (issue #16 item 3): the unmodified openai SDK's
`embeddings.create` (float and its default base64) and `models.retrieve` reach a real replica
started with `--task embed` that joined the fleet through Redis; embeddings go only to replicas
whose task is embed (or unknown: engines registered by hand), generation never goes to an
embedder; a fleet key is charged the embedded tokens."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import openai
import pytest
from router_harness import MODEL, FakeReplica, RunningRouter, fake_replicas, run_router, wait_http

from fleet.control.internal import INTERNAL_SECRET_ENV
from fleet.control.keys import KeyStore
from fleet.control.membership import MembershipEvent, ReplicaInfo, register_external
from fleet.control.redis_conn import DEFAULT_PREFIX, async_client
from fleet.embedded_redis import EmbeddedRedis, free_port
from router.backends.pool import PoolSettings
from router.config import RouterConfig

INTERNAL_SECRET = "fleet-internal-secret-for-embedding-tests"
INTERNAL_KEY = "sk-internal-embedding-tests"
EMBEDDER_ID = "embed-real"


@pytest.fixture(scope="module")
def fleet_redis() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="module")
def embedder(model_factory, fleet_redis: EmbeddedRedis) -> Iterator[str]:
    """A real `python -m replica --task embed` serving MODEL, leased in the fleet's Redis."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "replica", "--model", str(model_factory("llama", "tiny", seed=0)),
        "--served-model-name", MODEL, "--task", "embed", "--port", str(port),
        "--redis-url", fleet_redis.url, "--replica-id", EMBEDDER_ID, "--kv-cache-tokens", "4096",
        "--max-model-len", "256", "--dtype", "float32", "--log-level", "warning",
        "--api-key", INTERNAL_KEY,
    ]  # fmt: skip
    env = {**os.environ, INTERNAL_SECRET_ENV: INTERNAL_SECRET}
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", timeout=120)
        yield url
    finally:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def generator(fleet_redis: EmbeddedRedis) -> Iterator[FakeReplica]:
    """A fake fleetserve replica of MODEL registered with task generate."""
    with fake_replicas(1, "--model", MODEL) as [fake]:
        info = ReplicaInfo(id=fake.id, url=fake.url, model=MODEL, task="generate")
        asyncio.run(_register(fleet_redis.url, info))
        yield fake


async def _register(redis_url: str, *infos: ReplicaInfo, prefix: str = DEFAULT_PREFIX) -> None:
    client = async_client(redis_url)
    try:
        for info in infos:
            await register_external(client, info, prefix)
    finally:
        await client.aclose()


@pytest.fixture
async def key_store(fleet_redis: EmbeddedRedis) -> AsyncIterator[KeyStore]:
    store = KeyStore(fleet_redis.url)
    yield store
    await store.close()


@contextlib.asynccontextmanager
async def fleet_router(redis_url: str, key_store: KeyStore) -> AsyncIterator[RunningRouter]:
    config = RouterConfig(
        redis_url=redis_url,
        port=0,  # a free port, picked by run_router
        admin_key="admin-secret",
        internal_secret=INTERNAL_SECRET,
        pool=PoolSettings(probe_interval_s=0.2, load_interval_s=0.2, probe_timeout_s=1.0),
    )
    async with run_router(config, key_store=key_store) as router:
        deadline = time.monotonic() + 10
        while len(router.app.pool.by_model.get(MODEL, ())) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        yield router


async def test_the_sdk_embeds_and_retrieves_models_through_the_router(
    embedder, generator, fleet_redis, key_store
) -> None:
    record, secret = await key_store.admin.create("embedding-user")
    generator.reset()
    async with fleet_router(fleet_redis.url, key_store) as router:
        client = openai.AsyncOpenAI(base_url=f"{router.url}/v1", api_key=secret, max_retries=0)
        card = await client.models.retrieve(MODEL)
        as_float = await client.embeddings.create(
            model=MODEL, input=["a fleet of replicas", "one more"], encoding_format="float"
        )
        by_default = await client.embeddings.create(model=MODEL, input="a fleet of replicas")
        short = await client.embeddings.create(
            model=MODEL, input="a fleet of replicas", dimensions=16, encoding_format="float"
        )
        chats = [
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"hello {i}"}]
            )
            for i in range(4)
        ]
        pinned = await router.client.post(
            f"/replicas/{EMBEDDER_ID}/v1/embeddings",
            json={"model": MODEL, "input": "a fleet of replicas"},
            headers={"Authorization": f"Bearer {secret}"},
        )
        await asyncio.sleep(0.3)  # settlement runs after the answer is out
    async with httpx.AsyncClient(base_url=embedder, timeout=30) as direct:
        reference = (
            await direct.post(
                "/v1/embeddings",
                json={"model": MODEL, "input": "a fleet of replicas"},
                headers={"Authorization": f"Bearer {INTERNAL_KEY}"},
            )
        ).json()
    assert card.id == MODEL
    vector = reference["data"][0]["embedding"]
    assert len(as_float.data) == 2 and len(vector) == 64
    assert as_float.data[0].embedding == pytest.approx(vector, abs=1e-6)
    assert list(by_default.data[0].embedding) == pytest.approx(vector, abs=1e-6)
    assert len(short.data[0].embedding) == 16
    assert pinned.status_code == 200 and pinned.json()["data"][0]["embedding"] == vector
    assert all(c.choices[0].message.content for c in chats)
    assert generator.stats()["by_path"].get("/v1/chat/completions") == 4
    assert "/v1/embeddings" not in generator.stats()["by_path"]
    usage = await key_store.admin.usage(record.id)
    embedded = [as_float, by_default, short]
    assert usage.requests == 4 + len(embedded) + 1
    assert usage.prompt_tokens == (
        sum(e.usage.prompt_tokens for e in embedded)
        + pinned.json()["usage"]["prompt_tokens"]
        + sum(c.usage.prompt_tokens for c in chats if c.usage)
    )


@pytest.fixture(scope="module")
def mixed_fleet(fleet_redis: EmbeddedRedis) -> Iterator[list[FakeReplica]]:
    """[vLLM registered by hand (task unknown), fleetserve-style generator, vLLM embedder] of
    MODEL under their own prefix; the generator also answers to `gen-only`."""
    with (
        fake_replicas(1, "--model", MODEL, "--engine", "vllm") as [unknown],
        fake_replicas(1, "--served-model-name", MODEL, "gen-only") as [generate],
        fake_replicas(1, "--model", MODEL, "--engine", "vllm") as [embed],
    ):
        asyncio.run(
            _register(
                fleet_redis.url,
                ReplicaInfo(id=unknown.id, url=unknown.url, model=MODEL, engine="vllm"),
                ReplicaInfo(
                    id=generate.id,
                    url=generate.url,
                    model=MODEL,
                    aliases=["gen-only"],
                    task="generate",
                ),
                ReplicaInfo(id=embed.id, url=embed.url, model=MODEL, engine="vllm", task="embed"),
                prefix="mixed",
            )
        )
        yield [unknown, generate, embed]


async def test_embeddings_and_generation_never_mix(mixed_fleet, fleet_redis) -> None:
    for fake in mixed_fleet:
        fake.reset()
    config = RouterConfig(
        redis_url=fleet_redis.url, redis_prefix="mixed", fleet_keys=False, port=0,
        pool=PoolSettings(probe_interval_s=0.2, load_interval_s=0.2, probe_timeout_s=1.0),
    )  # fmt: skip
    async with run_router(config) as router:
        deadline = time.monotonic() + 10
        while len(router.app.pool.by_model.get(MODEL, ())) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        client = openai.AsyncOpenAI(base_url=f"{router.url}/v1", api_key="x", max_retries=0)
        embeddings = await asyncio.gather(
            *(client.embeddings.create(model=MODEL, input=f"text {i}") for i in range(12))
        )
        chats = await asyncio.gather(
            *(
                client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"hi {i}"}]
                )
                for i in range(12)
            )
        )
        no_embedder = await router.client.post(
            "/v1/embeddings", json={"model": "gen-only", "input": "x"}
        )
    counts = [fake.stats()["by_path"] for fake in mixed_fleet]
    assert all(len(e.data[0].embedding) > 0 for e in embeddings) and len(chats) == 12
    assert counts[1].get("/v1/embeddings", 0) == 0  # the generator got no embedding
    assert counts[2].get("/v1/chat/completions", 0) == 0  # the embedder got no generation
    assert counts[0].get("/v1/embeddings", 0) + counts[2].get("/v1/embeddings", 0) == 12
    assert counts[0].get("/v1/chat/completions", 0) + counts[1]["/v1/chat/completions"] == 12
    assert counts[2]["/v1/embeddings"] > 0  # least load spreads them
    assert no_embedder.status_code == 400
    assert no_embedder.json()["error"]["code"] == "wrong_task"


def test_records_without_a_task_read_as_generate_if_ours_and_unknown_if_by_hand() -> None:
    from router.backends.pool import ReplicaPool

    old_lease = ReplicaInfo.from_json(b'{"id": "old", "url": "http://h:1", "model": "m"}')
    by_hand = ReplicaInfo(id="ext", url="http://h:2", model="m", managed="external", engine="vllm")
    embedder = ReplicaInfo(id="emb", url="http://h:3", model="m", task="embed")
    pool = ReplicaPool([])
    for info in (old_lease, by_hand, embedder):
        pool._on_membership(MembershipEvent("join", info))
    assert old_lease.task is None
    assert [pool.replicas[i].task for i in ("old", "ext", "emb")] == ["generate", None, "embed"]
    assert [r.id for r in pool.routable("m", task="embed")] == ["emb", "ext"]
    assert [r.id for r in pool.routable("m", task="generate")] == ["ext", "old"]
    assert len(pool.routable("m")) == 3  # /tokenize and the like go anywhere
    restarted = ReplicaInfo(id="emb", url="http://h:3", model="m", task="generate")
    pool._on_membership(MembershipEvent("update", restarted))  # the same id, now generating
    assert [r.id for r in pool.routable("m", task="embed")] == ["ext"]
