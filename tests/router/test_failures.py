"""What the router does when replicas fail, stall or get drained, and when clients leave."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time

import httpx
import orjson
from router_harness import ADMIN, MODEL, chat, router_config, run_router, sse_events

from router.backends.pool import PoolSettings

COMPLETION = {"model": MODEL, "prompt": "hello"}


async def test_503_before_the_first_byte_is_retried_on_another_replica(replicas) -> None:
    bad, good = replicas[0], replicas[1]
    bad.configure(status=503)
    async with run_router(router_config([bad, good])) as router:
        results = [await router.client.post("/v1/completions", json=COMPLETION) for _ in range(6)]
        streams = [
            await router.client.post("/v1/chat/completions", json=chat(stream=True))
            for _ in range(2)
        ]
        stats = (await router.client.get("/admin/stats", headers=ADMIN)).json()
    assert [r.status_code for r in results + streams] == [200] * 8
    assert all(sse_events(r.text)[-1] == "[DONE]" for r in streams)
    assert {r.headers["x-fleet-replica"] for r in results} == {good.id}
    assert bad.stats()["requests"] >= 1
    assert stats["retries"] >= 1


async def test_a_dead_replica_costs_no_failed_request(replicas) -> None:
    dead = replicas[2]
    config = router_config(replicas)
    config.pool = PoolSettings(probe_interval_s=30, load_interval_s=30)  # only passive health
    async with run_router(config) as router:
        dead.stop()
        results = await asyncio.gather(
            *(router.client.post("/v1/completions", json=COMPLETION) for _ in range(24))
        )
        view = router.replica(dead.id)
    assert [r.status_code for r in results] == [200] * 24
    assert dead.id not in {r.headers["x-fleet-replica"] for r in results}
    assert view.breaker.state == "open"


async def test_no_retry_after_the_first_byte_sse_error_then_done(replicas) -> None:
    flaky = replicas[0]
    flaky.configure(fail_after_chunks=3)
    async with run_router(router_config(replicas)) as router:
        response = await router.client.post(
            f"/replicas/{flaky.id}/v1/chat/completions", json=chat(stream=True)
        )
        # Through the balanced route too: the first replica chosen fails mid-stream.
        router.replica(replicas[1].id).admin_drained = True
        router.replica(replicas[2].id).admin_drained = True
        balanced = await router.client.post("/v1/chat/completions", json=chat(stream=True))
    for result in (response, balanced):
        events = sse_events(result.text)
        assert result.status_code == 200
        assert len(events) == 5  # three good frames, the error, [DONE]
        assert orjson.loads(events[-2])["error"]["code"] == "upstream_error"
        assert events[-1] == "[DONE]"
    assert flaky.stats()["requests"] == 2, "a started stream must not be retried"


async def test_ttfb_timeout_is_a_504_and_not_retried(replicas) -> None:
    """The replica accepted the request and is still at it: the request, not the replica, is
    the likely cause, so it is not sent on (see tests/security for why)."""
    stuck, good = replicas[0], replicas[1]
    stuck.configure(hang=True)
    config = router_config([stuck, good], ttfb_timeout_s=0.5)
    async with run_router(config) as router:
        started = time.monotonic()
        results = [await router.client.post("/v1/completions", json=COMPLETION) for _ in range(2)]
        elapsed = time.monotonic() - started
    assert sorted(r.status_code for r in results) == [200, 504]
    assert good.stats()["requests"] == 1 and stuck.stats()["requests"] == 1
    assert elapsed < 3.0
    await asyncio.sleep(0.2)
    assert stuck.stats()["active"] == 0, "the timed-out upstream request was closed"


async def test_idle_stream_gets_an_sse_timeout_error(replicas) -> None:
    slow = replicas[0]
    slow.configure(chunk_delay=2.0)
    config = router_config([slow], idle_timeout_s=0.4)
    async with run_router(config) as router:
        response = await router.client.post("/v1/chat/completions", json=chat(stream=True))
    events = sse_events(response.text)
    assert orjson.loads(events[-2])["error"]["code"] == "upstream_idle"
    assert events[-1] == "[DONE]"


async def test_client_disconnect_closes_upstream_and_releases_counters(replicas) -> None:
    slow = replicas[0]
    slow.configure(chunk_delay=0.2, chunks=50)
    async with run_router(router_config([slow])) as router:
        async with httpx.AsyncClient(base_url=router.url) as client:
            for _ in range(5):
                async with client.stream(
                    "POST", "/v1/chat/completions", json=chat(stream=True)
                ) as response:
                    async for _line in response.aiter_lines():
                        break
        await asyncio.sleep(0.5)
        view = router.replica(slow.id)
        assert view.in_flight == 0
        assert view.pending_prefill == 0
        assert not router.app.proxy.watchdog.watched
    stats = slow.stats()
    assert stats["aborted"] == 5
    assert stats["active"] == 0


async def test_non_streaming_disconnect_aborts_upstream(replicas) -> None:
    slow = replicas[0]
    slow.configure(delay=5.0)
    async with run_router(router_config([slow])) as router:
        async with httpx.AsyncClient(base_url=router.url, timeout=0.3) as client:
            with contextlib.suppress(httpx.ReadTimeout):
                await client.post("/v1/completions", json=COMPLETION)
        await asyncio.sleep(0.5)
        assert router.replica(slow.id).in_flight == 0
    assert slow.stats()["aborted"] == 1


async def test_ejection_half_open_and_growing_ejection_time(replicas) -> None:
    flaky, good = replicas[0], replicas[1]
    config = router_config([flaky, good], max_attempts=2)
    config.pool = PoolSettings(probe_interval_s=30, load_interval_s=30, breaker_base_s=1.5)
    flaky.configure(status=502)
    async with run_router(config) as router:
        breaker = router.replica(flaky.id).breaker
        for _ in range(6):
            assert (await router.client.post("/v1/completions", json=COMPLETION)).status_code == 200
        assert breaker.state == "open" and breaker.ejections == 1
        first_ejection = breaker.open_until
        sent_while_open = flaky.stats()["requests"]
        for _ in range(4):
            await router.client.post("/v1/completions", json=COMPLETION)
        assert time.monotonic() < first_ejection, "the machine is too slow for this test's timing"
        assert flaky.stats()["requests"] == sent_while_open, "ejected replica gets nothing"
        # Half-open after 1.5 s: one trial, which fails again: ejected for twice as long.
        await asyncio.sleep(first_ejection - time.monotonic() + 0.1)
        for _ in range(4):
            await router.client.post("/v1/completions", json=COMPLETION)
        assert flaky.stats()["requests"] == sent_while_open + 1
        assert breaker.state == "open" and breaker.ejections == 2
        assert breaker.open_until - first_ejection > 2.0
        # Healed: the next trial closes the breaker.
        flaky.configure(status=0)
        await asyncio.sleep(breaker.open_until - time.monotonic() + 0.1)
        for _ in range(6):
            await router.client.post("/v1/completions", json=COMPLETION)
        assert breaker.state == "closed"
        text = (await router.client.get("/metrics")).text
    assert f'fleet_router_ejections_total{{replica="{flaky.id}"}} 2.0' in text


async def test_unhealthy_replica_is_skipped_until_it_recovers(replicas) -> None:
    sick, good = replicas[0], replicas[1]
    async with run_router(router_config([sick, good])) as router:
        sick.configure(healthy=False)
        await asyncio.sleep(0.7)
        assert not router.replica(sick.id).healthy
        results = [await router.client.post("/v1/completions", json=COMPLETION) for _ in range(4)]
        assert {r.headers["x-fleet-replica"] for r in results} == {good.id}
        sick.configure(healthy=True)
        await asyncio.sleep(0.5)
        assert router.replica(sick.id).healthy


async def test_drained_replica_finishes_its_streams_and_gets_nothing_new(replicas) -> None:
    target, other = replicas[0], replicas[1]
    target.configure(chunk_delay=0.05, chunks=20)
    async with run_router(router_config([target, other])) as router:
        streams = [
            asyncio.create_task(
                router.client.post(
                    f"/replicas/{target.id}/v1/chat/completions", json=chat(stream=True)
                )
            )
            for _ in range(3)
        ]
        await asyncio.sleep(0.2)
        drained = await router.client.post(f"/admin/replicas/{target.id}/drain", headers=ADMIN)
        assert drained.status_code == 200 and drained.json()["state"] == "draining"
        before = target.stats()["requests"]
        results = [await router.client.post("/v1/completions", json=COMPLETION) for _ in range(6)]
        finished = await asyncio.gather(*streams)
        listing = (await router.client.get("/admin/replicas", headers=ADMIN)).json()["data"]
        refused = await router.client.post(f"/replicas/{target.id}/v1/completions", json=COMPLETION)
        await router.client.post(f"/admin/replicas/{target.id}/undrain", headers=ADMIN)
        again = [await router.client.post("/v1/completions", json=COMPLETION) for _ in range(4)]
    assert target.stats()["requests"] - before == 2, "only the undrained round-robin turns"
    assert {r.headers["x-fleet-replica"] for r in results} == {other.id}
    for stream in finished:
        assert sse_events(stream.text)[-1] == "[DONE]" and "error" not in stream.text
    state = {r["id"]: r["state"] for r in listing}
    assert state[target.id] == "draining" and state[other.id] == "ready"
    assert refused.status_code == 503
    assert {r.headers["x-fleet-replica"] for r in again} == {target.id, other.id}


async def test_admin_api_needs_the_admin_key(replicas) -> None:
    async with run_router(router_config(replicas)) as router:
        missing = await router.client.get("/admin/replicas")
        wrong = await router.client.get("/admin/stats", headers={"Authorization": "Bearer nope"})
        good = await router.client.get("/admin/replicas", headers=ADMIN)
    async with run_router(router_config(replicas, admin_key=None)) as router:
        disabled = await router.client.get("/admin/replicas", headers=ADMIN)
    assert missing.status_code == 401 and wrong.status_code == 401
    assert good.status_code == 200
    ids = {r["id"] for r in good.json()["data"]}
    assert ids == {r.id for r in replicas}
    urls = {r["url"] for r in good.json()["data"]}
    assert urls == {r.url for r in replicas}
    assert disabled.status_code == 403


async def test_all_replicas_failing_gives_a_clear_502(replicas) -> None:
    for fake in replicas:
        fake.configure(status=502)
    async with run_router(router_config(replicas)) as router:
        response = await router.client.post("/v1/completions", json=COMPLETION)
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "upstream_error"
    assert "tried 3 replicas" in error["message"]
    assert not any(r.id in error["message"] for r in replicas), "replica ids are not the client's"


async def test_a_lone_failing_replica_reports_its_own_failure(replicas) -> None:
    replicas[0].configure(status=503)
    async with run_router(router_config(replicas[:1])) as router:
        response = await router.client.post("/v1/completions", json=COMPLETION)
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "upstream_error" and "status 503" in error["message"]
    assert "no other replica" in error["message"]


async def test_a_slow_client_pauses_the_replica_stream_without_an_idle_timeout(replicas) -> None:
    """Backpressure: while the client does not read, the router stops reading the replica (its
    buffers stay bounded); the pause is the client's doing, so the replica's idle timeout does
    not fire (a client that reads nothing for a whole idle timeout is cut: tests/security)."""
    source = replicas[0]
    source.configure(chunks=4000)
    async with run_router(router_config([source], idle_timeout_s=5.0)) as router:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", router.server.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        while not router.server.connections:
            await asyncio.sleep(0.01)
        for conn in router.server.connections:  # small kernel buffers on both ends
            assert conn.transport is not None
            conn.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
            )
        body = orjson.dumps(chat(stream=True))
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(1.0)  # not reading, for a fifth of the idle timeout
        held_back = [c for c in router.server.connections if c.writing_paused]
        received = b""
        while not received.endswith(b"0\r\n\r\n"):
            part = await asyncio.wait_for(reader.read(65536), 10)
            assert part, "the router closed the stream"  # (an empty read at EOF would spin)
            received += part
        writer.close()
        await asyncio.sleep(0.1)
        view = router.replica(source.id)
    assert held_back, "the client's connection never filled up: the test proves nothing"
    assert b"upstream_idle" not in received
    assert received.count(b'"chat.completion.chunk"') >= 4000
    assert b"data: [DONE]" in received
    assert view.in_flight == 0 and not router.app.proxy.watchdog.watched


async def test_mixed_failures_under_load_fail_no_unstarted_request_and_leak_nothing(
    replicas,
) -> None:
    """One replica answers 503, one breaks every stream after 3 frames, some clients leave
    early: no request fails before its first byte, and every counter comes back to zero."""
    refusing, breaking, healthy = replicas
    refusing.configure(status=503)
    breaking.configure(fail_after_chunks=3, chunk_delay=0.002)
    healthy.configure(chunks=40, chunk_delay=0.005)  # long enough streams to leave in the middle
    rng = random.Random(7)
    plans = [(rng.random() < 0.5, rng.random() < 0.1) for _ in range(150)]
    outcomes: list[str] = []
    async with run_router(router_config(replicas, policy="prefix")) as router:

        async def one(i: int, stream: bool, leave: bool) -> None:
            body = chat(f"tenant {i % 5} " + "x" * (i * 7 % 300), stream=stream)
            if stream and leave:
                async with router.client.stream("POST", "/v1/chat/completions", json=body) as r:
                    async for _line in r.aiter_lines():
                        break
                outcomes.append("left")
                return
            r = await router.client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            broke = stream and any('"error"' in event for event in sse_events(r.text))
            outcomes.append("sse_error" if broke else "ok")

        gate = asyncio.Semaphore(16)

        async def limited(i: int, stream: bool, leave: bool) -> None:
            async with gate:
                await one(i, stream, leave)

        await asyncio.gather(*(limited(i, s, leave) for i, (s, leave) in enumerate(plans)))
        await asyncio.sleep(0.3)
        views = list(router.app.pool.replicas.values())
        watched = router.app.proxy.watchdog.watched
        tasks = router.server.tasks
    assert len(outcomes) == 150 and outcomes.count("ok") > 75
    assert all(v.in_flight == 0 and v.pending_prefill == 0 for v in views)
    assert not watched and not tasks
