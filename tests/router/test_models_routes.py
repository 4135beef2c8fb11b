"""The routes SDKs call through the router besides generation (issue #16 item 4): the openai SDK's
`models.retrieve` (`GET /v1/models/{id}`, ids with '/'), several served names for one replica
(its aliases, from `/v1/models` of a static replica or from its membership record), and
`/v1/models` listing each name once with the replicas behind it (ids and states, never URLs).

Fake replicas here; tests/router/test_models_real_replicas.py does the same on real ones."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import openai
import orjson
import pytest
from router_harness import FakeReplica, fake_replicas, fresh, router_config, run_router

from fleet.control.membership import MembershipWatcher, ReplicaInfo, register_external
from fleet.control.redis_conn import async_client

MODEL = "org/fake-model"  # a Hugging Face style id: '/' inside a path segment of the route
ALIAS = "fake-alias"
OTHER = "other-model"


@pytest.fixture(scope="module")
def named_fakes() -> Iterator[list[FakeReplica]]:
    """Two replicas of MODEL (the first also answers to ALIAS) and one of OTHER."""
    with (
        fake_replicas(1, "--model", MODEL, "--served-model-name", MODEL, ALIAS) as first,
        fake_replicas(1, "--model", MODEL) as second,
        fake_replicas(1, "--model", OTHER) as third,
    ):
        yield [*first, *second, *third]


@pytest.fixture
def fakes3(named_fakes: list[FakeReplica]) -> list[FakeReplica]:
    return fresh(named_fakes)


def sdk(url: str, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


async def test_sdk_retrieves_each_name_with_the_replicas_behind_it(fakes3) -> None:
    first, second, third = fakes3
    async with run_router(router_config(fakes3)) as router:
        client = sdk(router.url)
        model = await client.models.retrieve(MODEL)
        alias = await client.models.retrieve(ALIAS)
        other = await client.models.retrieve(OTHER)
        with pytest.raises(openai.NotFoundError) as missing:
            await client.models.retrieve("org/no-such-model")
    assert model.id == MODEL and model.object == "model"
    assert model.model_extra["replicas"] == [  # sorted by id
        {"id": replica_id, "state": "ready"} for replica_id in sorted([first.id, second.id])
    ]
    assert alias.id == ALIAS and alias.model_extra["replicas"] == [
        {"id": first.id, "state": "ready"}
    ]
    assert other.model_extra["replicas"] == [{"id": third.id, "state": "ready"}]
    assert missing.value.body["code"] == "model_not_found"


async def test_models_lists_each_name_once_and_no_replica_urls(fakes3) -> None:
    async with run_router(router_config(fakes3)) as router:
        listing = await sdk(router.url).models.list()
        raw = await router.client.get("/v1/models")
    assert [m.id for m in listing.data] == sorted([MODEL, ALIAS, OTHER])
    assert all(set(r) == {"id", "state"} for m in listing.data for r in m.model_extra["replicas"])
    assert "127.0.0.1" not in raw.text and "url" not in raw.text


async def test_a_draining_replica_shows_as_draining_and_its_only_name_disappears(fakes3) -> None:
    first = fakes3[0]
    async with run_router(router_config(fakes3)) as router:
        router.replica(first.id).admin_drained = True
        model = (await router.client.get(f"/v1/models/{MODEL}")).json()
        alias = await router.client.get(f"/v1/models/{ALIAS}")
        names = [card["id"] for card in (await router.client.get("/v1/models")).json()["data"]]
    assert {"id": first.id, "state": "draining"} in model["replicas"]
    assert alias.status_code == 404 and ALIAS not in names


async def test_an_alias_routes_only_to_the_replica_that_answers_to_it(fakes3) -> None:
    first, second, _ = fakes3
    async with run_router(router_config(fakes3)) as router:
        client = sdk(router.url)
        answers = [
            await client.chat.completions.create(
                model=ALIAS, messages=[{"role": "user", "content": f"hi {i}"}]
            )
            for i in range(6)
        ]
    assert all(a.model == MODEL for a in answers)  # the replica answers with its primary name
    assert first.stats()["requests"] == 6 and second.stats()["requests"] == 0


async def test_a_key_sees_and_uses_only_the_names_it_may(fakes3, key_store) -> None:
    _, alias_only = await key_store.admin.create("alias-only", models=[ALIAS])
    async with run_router(router_config(fakes3), key_store=key_store) as router:
        client = sdk(router.url, alias_only)
        listing = await client.models.list()
        seen = await client.models.retrieve(ALIAS)
        with pytest.raises(openai.NotFoundError) as hidden:
            await client.models.retrieve(MODEL)
        with pytest.raises(openai.PermissionDeniedError):
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}]
            )
        used = await client.chat.completions.create(
            model=ALIAS, messages=[{"role": "user", "content": "hi"}]
        )
        anonymous = await router.client.get(f"/v1/models/{ALIAS}")
    assert [m.id for m in listing.data] == [ALIAS] and seen.id == ALIAS
    assert hidden.value.body["code"] == "model_not_found"
    assert used.choices[0].message.content
    assert anonymous.status_code == 401


async def test_aliases_come_from_membership_and_old_records_still_read(fakes3, redis_url) -> None:
    first, second, _ = fakes3
    prefix = f"alias-{uuid.uuid4().hex[:10]}"
    redis = async_client(redis_url)
    old_record = {"id": "old", "url": second.url, "model": MODEL, "engine": "fleetserve"}
    await redis.set(f"{prefix}:replica:old", orjson.dumps(old_record))
    await redis.zadd(f"{prefix}:replicas", {"old": 1})
    info = ReplicaInfo(id="new", url=first.url, model=MODEL, aliases=[ALIAS])
    await register_external(redis, info, prefix=prefix)
    watcher = MembershipWatcher(redis_url, prefix=prefix, resync_interval=0.2)
    try:
        async with run_router(router_config([]), watcher=watcher) as router:
            await asyncio.sleep(0.3)
            alias = await sdk(router.url).models.retrieve(ALIAS)
            model = await sdk(router.url).models.retrieve(MODEL)
            answer = await router.client.post(
                "/v1/completions", json={"model": ALIAS, "prompt": "x"}
            )
            old = watcher.replicas["old"]
    finally:
        await redis.aclose()
    assert alias.model_extra["replicas"] == [{"id": "new", "state": "ready"}]
    assert [r["id"] for r in model.model_extra["replicas"]] == ["new", "old"]
    assert answer.status_code == 200 and answer.headers["x-fleet-replica"] == "new"
    assert old.aliases == [] and old.model == MODEL
