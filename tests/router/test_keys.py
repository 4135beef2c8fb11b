"""Auth, limits and usage through the router with the control plane's real KeyStore and Redis,
and membership-driven routing (replicas that register in Redis are routed to, and leave)."""

from __future__ import annotations

import asyncio
import uuid

import orjson
from router_harness import ADMIN, MODEL, chat, router_config, run_router, sse_events

from fleet.control.membership import MembershipLease, MembershipWatcher, ReplicaInfo
from router.queueing.request_queue import QueueSettings


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def test_missing_and_wrong_keys_are_401_and_forbidden_models_403(replicas, key_store) -> None:
    _, secret = await key_store.admin.create("alice")
    _, other_model_secret = await key_store.admin.create("bob", models=["another-model"])
    async with run_router(router_config(replicas), key_store=key_store) as router:
        missing = await router.client.post("/v1/chat/completions", json=chat())
        wrong = await router.client.post(
            "/v1/chat/completions", json=chat(), headers=bearer("sk-nope")
        )
        forbidden = await router.client.post(
            "/v1/chat/completions", json=chat(), headers=bearer(other_model_secret)
        )
        good = await router.client.post("/v1/chat/completions", json=chat(), headers=bearer(secret))
        models = await router.client.get("/v1/models", headers=bearer(secret))
        models_anonymous = await router.client.get("/v1/models")
        pinned_wrong = await router.client.post(
            f"/replicas/{replicas[0].id}/v1/completions", json={"model": MODEL, "prompt": "x"}
        )
    assert missing.status_code == 401 and wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    assert forbidden.status_code == 403
    assert good.status_code == 200
    assert models.status_code == 200 and models_anonymous.status_code == 401
    assert pinned_wrong.status_code == 401
    assert sum(r.stats()["requests"] for r in replicas) == 1


async def test_over_the_rpm_limit_is_429_with_retry_after(replicas, key_store) -> None:
    _, secret = await key_store.admin.create("limited", rpm=3)
    async with run_router(router_config(replicas), key_store=key_store) as router:
        results = [
            await router.client.post("/v1/chat/completions", json=chat(), headers=bearer(secret))
            for _ in range(5)
        ]
    assert [r.status_code for r in results] == [200, 200, 200, 429, 429]
    refused = results[3]
    assert int(refused.headers["retry-after"]) >= 1
    assert "rpm" in refused.json()["error"]["message"]
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert sum(r.stats()["requests"] for r in replicas) == 3


async def test_concurrency_slot_is_released_when_the_client_disconnects(
    replicas, key_store
) -> None:
    import httpx

    _, secret = await key_store.admin.create("one-at-a-time", max_concurrent=1)
    replicas[0].configure(chunk_delay=0.1, chunks=50)
    async with run_router(router_config(replicas[:1]), key_store=key_store) as router:
        async with (
            httpx.AsyncClient(base_url=router.url, headers=bearer(secret)) as client,
            client.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as r,
        ):
            async for _ in r.aiter_lines():
                break
        await asyncio.sleep(0.3)
        replicas[0].configure(chunk_delay=0.0, chunks=2)
        after = await router.client.post(
            "/v1/chat/completions", json=chat(), headers=bearer(secret)
        )
    assert after.status_code == 200


async def test_stream_usage_is_settled_and_stripped_when_not_asked(replicas, key_store) -> None:
    record, secret = await key_store.admin.create("metered")
    async with run_router(router_config(replicas[:1]), key_store=key_store) as router:
        plain = await router.client.post(
            "/v1/chat/completions", json=chat(stream=True), headers=bearer(secret)
        )
        upstream_request = replicas[0].stats()["last_body"]
        asked = await router.client.post(
            "/v1/chat/completions",
            json=chat(stream=True, stream_options={"include_usage": True}),
            headers=bearer(secret),
        )
        whole = await router.client.post(
            "/v1/chat/completions", json=chat(), headers=bearer(secret)
        )
    assert upstream_request["stream_options"] == {"include_usage": True}
    assert "usage" not in plain.text
    plain_events = sse_events(plain.text)
    assert plain_events[-1] == "[DONE]"
    assert all(orjson.loads(e)["choices"] for e in plain_events[:-1])
    asked_events = [orjson.loads(e) for e in sse_events(asked.text)[:-1]]
    assert asked_events[-1]["choices"] == [] and asked_events[-1]["usage"]["completion_tokens"] == 8
    usage_of_one = whole.json()["usage"]
    usage = await key_store.admin.usage(record.id)
    assert usage.requests == 3
    assert usage.completion_tokens == 3 * 8
    assert usage.prompt_tokens == 3 * usage_of_one["prompt_tokens"]


async def test_replicas_join_and_leave_through_redis_membership(replicas, redis_url) -> None:
    prefix = f"rt-{uuid.uuid4().hex[:10]}"
    watcher = MembershipWatcher(redis_url, prefix=prefix, resync_interval=0.2)
    fake = replicas[0]
    info = ReplicaInfo(id="lease-1", url=fake.url, model=MODEL, max_model_len=2048)
    no_queue = QueueSettings(size=0)  # a draining fleet is answered at once, not waited out
    async with run_router(router_config([], queue=no_queue), watcher=watcher) as router:
        before = await router.client.post("/v1/chat/completions", json=chat())
        lease = MembershipLease(info, redis_url, prefix=prefix, heartbeat_interval=0.5)
        await lease.register()
        await asyncio.sleep(0.5)
        joined = await router.client.post("/v1/chat/completions", json=chat())
        listing = await router.client.get("/v1/models")
        await lease.set_state("draining")
        await asyncio.sleep(0.5)
        draining = await router.client.post("/v1/chat/completions", json=chat())
        await lease.close()
        await asyncio.sleep(0.5)
        gone = "lease-1" in router.app.pool.replicas
    assert before.status_code == 404
    assert joined.status_code == 200 and joined.headers["x-fleet-replica"] == "lease-1"
    assert listing.json()["data"][0]["max_model_len"] == 2048
    assert (
        draining.status_code == 503 and draining.json()["error"]["code"] == "no_replica_available"
    )
    assert not gone


async def test_fleet_keys_off_serves_without_a_key_but_static_keys_still_apply(
    replicas, redis_url
) -> None:
    open_config = router_config(replicas, redis_url=redis_url, fleet_keys=False)
    async with run_router(open_config) as router:
        anonymous = await router.client.post("/v1/chat/completions", json=chat())
    static_config = router_config(
        replicas, redis_url=redis_url, fleet_keys=False, api_keys=["sk-static"]
    )
    async with run_router(static_config) as router:
        missing = await router.client.post("/v1/chat/completions", json=chat())
        good = await router.client.post(
            "/v1/chat/completions", json=chat(), headers=bearer("sk-static")
        )
    assert anonymous.status_code == 200
    assert missing.status_code == 401 and good.status_code == 200


async def test_admin_drain_through_one_router_holds_for_another(replicas, redis_url) -> None:
    prefix = f"rt-{uuid.uuid4().hex[:10]}"
    leases = [
        MembershipLease(
            ReplicaInfo(id=f"lease-{i}", url=fake.url, model=MODEL), redis_url, prefix=prefix
        )
        for i, fake in enumerate(replicas[:2])
    ]
    for lease in leases:
        await lease.register()
    watchers = [MembershipWatcher(redis_url, prefix=prefix, resync_interval=0.2) for _ in "ab"]
    config_a = router_config([], policy="round-robin")
    config_b = router_config([], policy="round-robin")
    try:
        async with (
            run_router(config_a, watcher=watchers[0]) as a,
            run_router(config_b, watcher=watchers[1]) as b,
        ):
            drained = await a.client.post("/admin/replicas/lease-0/drain", headers=ADMIN)
            await asyncio.sleep(0.5)
            served_by = {
                (await b.client.post("/v1/chat/completions", json=chat())).headers[
                    "x-fleet-replica"
                ]
                for _ in range(6)
            }
            listed = (await b.client.get("/admin/replicas", headers=ADMIN)).json()["data"]
            await b.client.post("/admin/replicas/lease-0/undrain", headers=ADMIN)
            await asyncio.sleep(0.5)
            back = {
                (await a.client.post("/v1/chat/completions", json=chat())).headers[
                    "x-fleet-replica"
                ]
                for _ in range(6)
            }
    finally:
        for lease in leases:
            await lease.close()
    assert drained.status_code == 200 and drained.json()["scope"] == "fleet"
    assert served_by == {"lease-1"}
    assert {r["id"]: r["state"] for r in listed}["lease-0"] == "draining"
    assert back == {"lease-0", "lease-1"}
