"""The SDK's model routes through the router in front of real replicas (a tiny model, in-process
servers) that join the fleet through Redis, one of them under two served names: the alias
reaches only that replica through its membership record, answers as the primary name, and a
key's model list applies to the name the request used (issue #16 item 4)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import openai
import pytest
from live_replica import LiveReplica, serve
from router_harness import FAST_POOL, RunningRouter, run_router

from fleet.control.keys import KeyStore
from router.config import RouterConfig

PRIMARY = "tiny-a"
ALIAS = "org/tiny-b"
PREFIX = f"names-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def fleet(tiny_model: Path, redis_url: str) -> Iterator[list[LiveReplica]]:
    """Replica "named" serves PRIMARY and ALIAS; replica "plain" serves PRIMARY only."""
    common = {"served_model_name": PRIMARY, "redis_prefix": PREFIX, "fleet_keys": False}
    named = {**common, "served_model_aliases": [ALIAS], "replica_id": "named"}
    plain = {**common, "replica_id": "plain"}
    with (
        serve(tiny_model, redis_url=redis_url, server=named) as first,
        serve(tiny_model, redis_url=redis_url, server=plain) as second,
    ):
        yield [first, second]


@pytest.fixture
async def keys(redis_url: str) -> AsyncIterator[KeyStore]:
    store = KeyStore(redis_url, prefix=PREFIX)
    yield store
    await store.close()


@pytest.fixture
async def router(fleet, redis_url: str) -> AsyncIterator[RunningRouter]:
    config = RouterConfig(redis_url=redis_url, redis_prefix=PREFIX, pool=FAST_POOL, port=0)
    async with run_router(config) as running:
        pool = running.app.pool
        deadline = time.monotonic() + 10
        while len(pool.by_model.get(PRIMARY, ())) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        yield running


def sdk(url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


async def test_sdk_lists_retrieves_and_uses_an_alias_through_the_router(router, keys) -> None:
    _, secret = await keys.admin.create("everything")
    client = sdk(router.url, secret)
    listing = await client.models.list()
    alias = await client.models.retrieve(ALIAS)
    messages = [{"role": "user", "content": "Tell me about fleets."}]
    raw = await client.chat.completions.with_raw_response.create(
        model=ALIAS, messages=messages, max_tokens=8, temperature=0
    )
    by_alias = raw.parse()
    by_primary = await client.chat.completions.create(
        model=PRIMARY, messages=messages, max_tokens=8, temperature=0
    )
    stream = await client.completions.create(model=ALIAS, prompt="Once", max_tokens=4, stream=True)
    streamed = [chunk async for chunk in stream]
    cards = {m.id: m.model_extra for m in listing.data}
    assert sorted(cards) == [ALIAS, PRIMARY]
    assert [r["id"] for r in cards[PRIMARY]["replicas"]] == ["named", "plain"]
    assert alias.model_extra["replicas"] == [{"id": "named", "state": "ready"}]
    assert alias.model_extra["max_model_len"] == 512
    assert raw.headers["x-fleet-replica"] == "named"
    assert by_alias.model == PRIMARY  # the replica answers with its primary name
    assert by_alias.choices[0].message.content == by_primary.choices[0].message.content
    assert all(chunk.model == PRIMARY for chunk in streamed)


async def test_a_keys_model_list_applies_to_the_name_the_request_used(router, keys) -> None:
    _, alias_only = await keys.admin.create("alias-only", models=[ALIAS])
    client = sdk(router.url, alias_only)
    listing = await client.models.list()
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve(PRIMARY)
    with pytest.raises(openai.PermissionDeniedError):
        await client.completions.create(model=PRIMARY, prompt="Once", max_tokens=2)
    allowed = await client.completions.create(model=ALIAS, prompt="Once", max_tokens=2)
    assert [m.id for m in listing.data] == [ALIAS]
    assert allowed.model == PRIMARY and allowed.usage.completion_tokens == 2
