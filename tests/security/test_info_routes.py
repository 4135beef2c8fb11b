"""A replica's internals (`/load`, `/metrics`, `/openapi.json`) are open by default, as vLLM's
are, and private with `--protect-info-routes`: then only the replica's static key or the routers'
key reads them, and a router still polls its load with the key it holds for that replica."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from live_replica import API_KEY, MODEL_NAME, LiveReplica, serve
from router_harness import FAST_POOL, run_router

from router.config import RouterConfig

INFO_ROUTES = ("/load", "/metrics", "/openapi.json")


@pytest.fixture(scope="module")
def private(tiny_model: Path) -> Iterator[LiveReplica]:
    with serve(tiny_model, api_key=API_KEY, server={"protect_info_routes": True}) as live:
        yield live


def test_info_routes_are_open_by_default(tiny_model: Path) -> None:
    with serve(tiny_model, api_key=API_KEY) as live, httpx.Client(base_url=live.url) as client:
        assert [client.get(path).status_code for path in INFO_ROUTES] == [200, 200, 200]


def test_protected_info_routes_need_the_operator_key(private: LiveReplica) -> None:
    with httpx.Client(base_url=private.url) as client:
        anonymous = [client.get(path) for path in INFO_ROUTES]
        wrong = [client.get(p, headers={"Authorization": "Bearer sk-nope"}) for p in INFO_ROUTES]
        health = client.get("/health")
    with private.http() as operator:
        allowed = [operator.get(path).status_code for path in INFO_ROUTES]
    assert [r.status_code for r in anonymous + wrong] == [401] * 6
    assert all(r.json()["error"]["code"] == "invalid_api_key" for r in anonymous)
    assert allowed == [200, 200, 200]
    assert health.status_code == 200


async def test_a_router_reads_a_protected_replicas_load_with_its_key(
    private: LiveReplica,
) -> None:
    config = RouterConfig(
        port=0,
        replicas=[f"private={private.url}"],
        upstream_api_key=API_KEY,
        pool=FAST_POOL,
        policy="least-load",
    )
    async with run_router(config) as router:
        replica = router.app.pool.replicas["private"]
        for _ in range(50):
            if replica.model and replica.load.updated_at:
                break
            await asyncio.sleep(0.1)
        answer = await router.client.post(
            "/v1/completions", json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2}
        )
    assert replica.model == MODEL_NAME
    assert replica.load.updated_at > 0 and replica.load.kv_capacity_tokens > 0
    assert answer.status_code == 200
