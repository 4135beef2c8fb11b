"""Routing through real router servers to fake replica processes: pass-through, policies, models,
pinning, tokenize, and the OpenAI-style errors for bad requests."""

from __future__ import annotations

import collections

import orjson
from router_harness import ADMIN, MODEL, chat, router_config, run_router, sse_events


async def test_non_streaming_passes_the_replica_answer_through(replicas) -> None:
    async with run_router(router_config(replicas)) as router:
        response = await router.client.post("/v1/chat/completions", json=chat())
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == "t0 t1 t2 t3 t4 t5 t6 t7 "
    assert body["usage"]["completion_tokens"] == 8
    assert response.headers["x-fleet-replica"] in {r.id for r in replicas}
    assert int(response.headers["content-length"]) == len(response.content)


async def test_stream_is_identical_to_a_direct_stream(replicas) -> None:
    request = chat(stream=True)
    async with run_router(router_config(replicas[:1])) as router:
        routed = await router.client.post("/v1/chat/completions", json=request)
    direct = await _direct(replicas[0].url, request)
    assert routed.status_code == 200
    assert routed.headers["content-type"] == "text/event-stream"
    # Same frames except the id (it counts the replica's requests) and the creation second.
    same = {"id": "-", "created": 0}
    routed_frames = [orjson.loads(e) | same for e in sse_events(routed.text)[:-1]]
    direct_frames = [orjson.loads(e) | same for e in sse_events(direct.text)[:-1]]
    assert routed_frames == direct_frames
    assert routed.text.endswith("data: [DONE]\n\n")
    assert "usage" not in routed.text


async def _direct(url: str, request: dict):
    import httpx

    async with httpx.AsyncClient() as client:
        return await client.post(url + "/v1/chat/completions", json=request)


async def test_round_robin_spreads_requests_evenly(replicas) -> None:
    async with run_router(router_config(replicas)) as router:
        seen = collections.Counter()
        for _ in range(30):
            response = await router.client.post(
                "/v1/completions", json={"model": MODEL, "prompt": "x"}
            )
            seen[response.headers["x-fleet-replica"]] += 1
    assert sorted(seen.values()) == [10, 10, 10]


async def test_prefix_policy_keeps_a_prompt_prefix_on_one_replica(replicas) -> None:
    tenants = [f"tenant {t} system prompt. " * 40 for t in range(6)]
    async with run_router(router_config(replicas, policy="prefix")) as router:
        homes: dict[int, set[str]] = collections.defaultdict(set)
        for round_ in range(4):
            for t, system in enumerate(tenants):
                request = {
                    "model": MODEL,
                    "messages": [
                        {"role": "system", "content": system},
                        {"role": "user", "content": f"question {round_}"},
                    ],
                }
                response = await router.client.post("/v1/chat/completions", json=request)
                assert response.status_code == 200
                homes[t].add(response.headers["x-fleet-replica"])
        stats = (await router.client.get("/admin/stats", headers=ADMIN)).json()
    assert all(len(h) == 1 for h in homes.values()), homes
    assert len({next(iter(h)) for h in homes.values()}) >= 2, "tenants should spread over replicas"
    assert stats["policy_decisions"]["prefix:prefix_hit"] == 18
    assert stats["policy_decisions"]["prefix:prefix_miss"] == 6


async def test_multi_turn_chat_follows_its_history(replicas) -> None:
    history = [{"role": "system", "content": "You are terse. " * 30}]
    async with run_router(router_config(replicas, policy="prefix")) as router:
        served = set()
        for turn in range(5):
            history.append({"role": "user", "content": f"turn {turn} question " * 5})
            response = await router.client.post(
                "/v1/chat/completions", json={"model": MODEL, "messages": history}
            )
            served.add(response.headers["x-fleet-replica"])
            history.append(response.json()["choices"][0]["message"])
    assert len(served) == 1


async def test_session_header_pins_a_conversation(replicas) -> None:
    async with run_router(router_config(replicas, policy="least-load")) as router:
        seen = set()
        for i in range(12):
            response = await router.client.post(
                "/v1/completions",
                json={"model": MODEL, "prompt": f"different prompt {i}"},
                headers={"X-Session-Id": "conversation-42"},
            )
            seen.add(response.headers["x-fleet-replica"])
    assert len(seen) == 1


async def test_unknown_model_is_404_and_bad_bodies_are_400(replicas) -> None:
    async with run_router(router_config(replicas)) as router:
        unknown = await router.client.post("/v1/chat/completions", json=chat() | {"model": "nope"})
        not_json = await router.client.post("/v1/chat/completions", content=b"{not json")
        no_model = await router.client.post("/v1/completions", json={"prompt": "hi"})
        no_route = await router.client.get("/v1/nothing-here")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"
    assert unknown.json()["error"]["param"] == "model"
    assert not_json.status_code == 400
    assert not_json.json()["error"]["type"] == "invalid_request_error"
    assert no_model.status_code == 400 and no_model.json()["error"]["param"] == "model"
    assert no_route.status_code == 404 and "error" in no_route.json()


async def test_models_lists_the_fleet_models(replicas) -> None:
    async with run_router(router_config(replicas)) as router:
        response = await router.client.get("/v1/models")
    assert response.status_code == 200
    cards = response.json()["data"]
    assert [c["id"] for c in cards] == [MODEL]
    assert cards[0]["max_model_len"] == 4096


async def test_replica_pinning_reaches_exactly_that_replica(replicas) -> None:
    target = replicas[1]
    async with run_router(router_config(replicas)) as router:
        for _ in range(4):
            response = await router.client.post(
                f"/replicas/{target.id}/v1/completions", json={"model": MODEL, "prompt": "p"}
            )
            assert response.status_code == 200
            assert response.headers["x-fleet-replica"] == target.id
        load = await router.client.get(f"/replicas/{target.id}/load")
        missing = await router.client.post("/replicas/nobody/v1/completions", json={"model": MODEL})
    assert target.stats()["requests"] == 4
    assert load.status_code == 404, "a replica's internal routes are not pinned routes"
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "replica_not_found"


async def test_tokenize_is_proxied(replicas) -> None:
    async with run_router(router_config(replicas)) as router:
        response = await router.client.post(
            "/tokenize", json={"model": MODEL, "prompt": "abcdefgh"}
        )
    assert response.status_code == 200
    assert response.json()["count"] == 2


async def test_metrics_count_requests_by_route_model_replica_status(replicas) -> None:
    async with run_router(router_config(replicas[:1])) as router:
        await router.client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
        await router.client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
        text = (await router.client.get("/metrics")).text
    replica = replicas[0].id
    assert (
        f'fleet_router_requests_total{{model="{MODEL}",replica="{replica}",route="completions",status="200"}} 1.0'
        in text
    )
    assert 'route="completions",status="404"} 1.0' in text
    assert "fleet_router_ttft_seconds_bucket" in text
    assert (
        'fleet_router_policy_decisions_total{outcome="round_robin",policy="round-robin"} 1.0'
        in text
    )


async def test_oversized_bodies_are_413(replicas) -> None:
    async with run_router(router_config(replicas, max_body_bytes=1000)) as router:
        big = await router.client.post(
            "/v1/completions", json={"model": MODEL, "prompt": "x" * 2000}
        )
        small = await router.client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert big.status_code == 413 and "1000 bytes" in big.json()["error"]["message"]
    assert small.status_code == 200
    assert sum(r.stats()["requests"] for r in replicas) == 1


async def test_client_sockets_have_nodelay_and_reused_streams_do_not_stall(replicas) -> None:
    import socket
    import time

    async with run_router(router_config(replicas[:1])) as router:
        timings = []
        for _ in range(15):
            started = time.perf_counter()
            response = await router.client.post("/v1/chat/completions", json=chat(stream=True))
            assert response.status_code == 200
            timings.append(time.perf_counter() - started)
        connections = list(router.server.connections)
        flags = [
            c.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            for c in connections
        ]
    assert connections and all(flags)
    timings.sort()
    assert timings[len(timings) // 2] < 0.03, timings  # no ~40 ms Nagle/delayed-ACK stalls
