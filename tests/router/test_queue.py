"""The router queue (#15 item 3): a request no replica can take now waits, fairly across keys and
within a deadline, instead of a 503 at once. Real router, fake replica processes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
from router_harness import ADMIN, chat, router_config, run_router

from router.__main__ import config_from_args, parse_args
from router.dashboard.snapshot import router_view
from router.queueing.request_queue import QueueSettings

PATH = "/v1/chat/completions"


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until `check()` holds (the in-process router's state), not for a guessed time."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out waiting for the router"
        await asyncio.sleep(0.01)


def in_flight(router) -> int:
    return sum(r.in_flight for r in router.app.pool.replicas.values())


def queued(router) -> int:
    return router.app.proxy.queue.depth


async def queue_depth(router) -> int:
    stats = (await router.client.get("/admin/stats", headers=ADMIN)).json()
    return stats["queue"]["depth"]


async def test_a_request_waits_for_a_free_slot_instead_of_a_503(replicas) -> None:
    replicas[0].configure(delay=0.4)
    config = router_config(replicas[:1], queue=QueueSettings(replica_max_in_flight=1))
    async with run_router(config) as router:
        first = asyncio.create_task(router.client.post(PATH, json=chat("one")))
        await until(lambda: in_flight(router) == 1)
        started = time.perf_counter()
        second = asyncio.create_task(router.client.post(PATH, json=chat("two")))
        await until(lambda: queued(router) == 1)
        assert await queue_depth(router) == 1
        assert replicas[0].stats()["active"] == 1  # held by the router, not piled on the replica
        dashboard = router_view(router.app, router.app.dashboard.history)
        assert dashboard["queue"]["queued"] == 1
        answers = await asyncio.gather(first, second)
        waited = time.perf_counter() - started
        metrics = (await router.client.get("/metrics")).text
        assert await queue_depth(router) == 0
    assert [a.status_code for a in answers] == [200, 200]
    assert waited >= 0.4  # sent once the first answer was out, then its own 0.4 s
    assert "fleet_router_queue_depth 0.0" in metrics
    assert "fleet_router_queue_wait_seconds_count 1.0" in metrics


async def test_a_full_queue_is_429_with_retry_after(replicas) -> None:
    replicas[0].configure(delay=0.5)
    config = router_config(replicas[:1], queue=QueueSettings(size=1, replica_max_in_flight=1))
    async with run_router(config) as router:
        sent = [asyncio.create_task(router.client.post(PATH, json=chat(f"{i}"))) for i in range(2)]
        await until(lambda: in_flight(router) == 1 and queued(router) == 1)
        refused = await router.client.post(PATH, json=chat("third"))
        answers = await asyncio.gather(*sent)
        metrics = (await router.client.get("/metrics")).text
        replica = router.replica(replicas[0].id)
    assert [a.status_code for a in answers] == [200, 200]
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "queue_full"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert 'fleet_router_queue_rejections_total{reason="full"} 1.0' in metrics
    assert replica.failures == 0 and replica.breaker.state == "closed"


async def test_a_key_over_its_share_of_the_queue_is_429_while_others_still_queue(replicas) -> None:
    replicas[0].configure(delay=0.5)
    queue = QueueSettings(per_key=1, replica_max_in_flight=1)
    config = router_config(replicas[:1], api_keys=["sk-a", "sk-b"], queue=queue)
    async with run_router(config) as router:
        post = router.client.post
        held = asyncio.create_task(post(PATH, json=chat("0"), headers=bearer("sk-a")))
        await until(lambda: in_flight(router) == 1)
        waiting = asyncio.create_task(post(PATH, json=chat("1"), headers=bearer("sk-a")))
        other = asyncio.create_task(post(PATH, json=chat("2"), headers=bearer("sk-b")))
        await until(lambda: queued(router) == 2)
        refused = await post(PATH, json=chat("3"), headers=bearer("sk-a"))
        answers = await asyncio.gather(held, waiting, other)
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"


async def test_past_the_deadline_is_503_with_retry_after_and_no_replica_blamed(replicas) -> None:
    replicas[0].configure(delay=1.0)
    queue = QueueSettings(timeout_s=0.3, replica_max_in_flight=1)
    async with run_router(router_config(replicas[:1], queue=queue)) as router:
        first = asyncio.create_task(router.client.post(PATH, json=chat("one")))
        await until(lambda: in_flight(router) == 1)
        started = time.perf_counter()
        late = await router.client.post(PATH, json=chat("two"))
        waited = time.perf_counter() - started
        assert (await first).status_code == 200
        metrics = (await router.client.get("/metrics")).text
        replica = router.replica(replicas[0].id)
    assert late.status_code == 503 and int(late.headers["retry-after"]) >= 1
    assert late.json()["error"]["code"] == "queue_timeout"
    assert waited >= 0.3  # and a 503 before the slot freed (1 s): answered at its deadline
    assert 'fleet_router_queue_rejections_total{reason="timeout"} 1.0' in metrics
    assert replica.failures == 0 and replica.breaker.state == "closed"
    assert replicas[0].stats()["requests"] == 1


async def test_requests_wait_out_a_drain_of_every_replica(replicas) -> None:
    """A rolling restart: no replica takes new work for a moment, and nobody gets a 503."""
    async with run_router(router_config(replicas[:2])) as router:
        for fake in replicas[:2]:
            await router.client.post(f"/admin/replicas/{fake.id}/drain", headers=ADMIN)
        waiting = asyncio.create_task(router.client.post(PATH, json=chat()))
        await until(lambda: queued(router) == 1)
        await asyncio.sleep(0.3)  # probes and load polls (every 0.2 s) must not let it out
        assert not waiting.done() and await queue_depth(router) == 1
        await router.client.post(f"/admin/replicas/{replicas[1].id}/undrain", headers=ADMIN)
        answer = await asyncio.wait_for(waiting, 2)
    assert answer.status_code == 200
    assert answer.headers["x-fleet-replica"] == replicas[1].id


async def test_queue_size_zero_keeps_the_instant_503(replicas) -> None:
    config = router_config(replicas[:1], queue=QueueSettings(size=0))
    async with run_router(config) as router:
        await router.client.post(f"/admin/replicas/{replicas[0].id}/drain", headers=ADMIN)
        started = time.perf_counter()
        answer = await router.client.post(PATH, json=chat())
    assert answer.status_code == 503 and time.perf_counter() - started < 0.5
    assert answer.json()["error"]["code"] == "no_replica_available"


async def test_a_client_that_leaves_the_queue_frees_its_place_and_its_key_slot(
    replicas, key_store
) -> None:
    _, busy = await key_store.admin.create("busy")
    _, single = await key_store.admin.create("single", max_concurrent=1)
    replicas[0].configure(delay=0.8)
    config = router_config(replicas[:1], queue=QueueSettings(replica_max_in_flight=1))
    async with run_router(config, key_store=key_store) as router:
        holder = asyncio.create_task(
            router.client.post(PATH, json=chat("hold"), headers=bearer(busy))
        )
        await until(lambda: in_flight(router) == 1)
        async with httpx.AsyncClient(base_url=router.url, timeout=5) as leaving:
            gone = asyncio.create_task(leaving.post(PATH, json=chat("x"), headers=bearer(single)))
            await until(lambda: queued(router) == 1)
            gone.cancel()  # closes its connection
        await until(lambda: queued(router) == 0, timeout=0.5)  # at once, not at a deadline
        again = await router.client.post(PATH, json=chat("y"), headers=bearer(single))
        assert (await holder).status_code == 200
        metrics = (await router.client.get("/metrics")).text
    assert again.status_code == 200  # its key's one concurrency slot was given back
    assert replicas[0].stats()["requests"] == 2  # the one that left never reached the replica
    assert 'fleet_router_queue_rejections_total{reason="client_left"} 1.0' in metrics


def test_queue_flags_reach_the_config() -> None:
    args = parse_args(
        ["--replica", "http://127.0.0.1:9", "--queue-size", "10", "--queue-timeout", "2.5",
         "--queue-per-key", "4", "--replica-max-in-flight", "8"]
    )  # fmt: skip
    assert config_from_args(args).queue == QueueSettings(10, 2.5, 4, 8)
    defaults = config_from_args(parse_args(["--replica", "http://127.0.0.1:9"])).queue
    assert defaults == QueueSettings()


async def test_a_burst_of_ten_times_capacity_from_one_key_does_not_starve_another(
    replicas,
) -> None:
    """Two replicas, each answering `cap` requests at a time in `service_s` (with room for `cap`
    more waiting, then 503 - a real replica's --max-num-seqs and --max-waiting): capacity is 4
    requests at once, and the router holds the rest (--replica-max-in-flight 2). The big key sends 10x that at once (40); the small key sends a steady
    trickle of 10, one every 0.2 s (5/s), starting just after.

    Fair share: with two keys queued, round-robin gives each half the slots, 2 at a time, so
    2 / 0.3 s = 6.7 requests/s, more than the small key's 5/s. A key that sends within its share
    never waits behind another key's backlog, only for the next slot that frees: at most one
    service time, SERVICE_S. That is its fair-share wait; its p99 must stay within 2x of it.
    First-come-first-served would make it wait behind the big key's whole backlog, ~40/4 x 0.3 s
    = 3 s. Every request must complete: zero 5xx (and no 429: the queue is big enough).
    """
    cap, service_s, big_n, small_n, gap_s = 2, 0.3, 40, 10, 0.2
    for fake in replicas[:2]:
        fake.configure(delay=service_s, max_running=cap, max_waiting=cap)
    config = router_config(
        replicas[:2], api_keys=["sk-big", "sk-small"],
        queue=QueueSettings(replica_max_in_flight=cap),
    )  # fmt: skip
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with (
        run_router(config) as router,
        httpx.AsyncClient(base_url=router.url, timeout=30, limits=limits) as client,
    ):

        async def timed(secret: str, i: int) -> tuple[int, float]:
            started = time.perf_counter()
            answer = await client.post(PATH, json=chat(f"{secret} {i}"), headers=bearer(secret))
            return answer.status_code, time.perf_counter() - started

        async def trickle() -> list[tuple[int, float]]:
            sent = []
            for i in range(small_n):
                await asyncio.sleep(gap_s)
                sent.append(asyncio.create_task(timed("sk-small", i)))
            return await asyncio.gather(*sent)

        began = time.perf_counter()
        big = [asyncio.create_task(timed("sk-big", i)) for i in range(big_n)]
        small = await trickle()
        big_done = await asyncio.gather(*big)
        took = time.perf_counter() - began
        stats = (await router.client.get("/admin/stats", headers=ADMIN)).json()

    statuses = [s for s, _ in big_done + small]
    small_waits = sorted(max(t - service_s, 0.0) for _, t in small)
    big_waits = sorted(max(t - service_s, 0.0) for _, t in big_done)
    p99_small = small_waits[min(len(small_waits) - 1, int(0.99 * len(small_waits)))]
    p99_big = big_waits[min(len(big_waits) - 1, int(0.99 * len(big_waits)))]
    fivexx = sum(s >= 500 for s in statuses)
    print(
        f"\nburst: {big_n} big + {small_n} small requests in {took:.2f} s; 5xx={fivexx}; "
        f"statuses={sorted(set(statuses))}; p99 wait small={p99_small:.3f} s "
        f"(fair share {service_s:.2f} s, limit {2 * service_s:.2f} s), big={p99_big:.3f} s; "
        f"queue={stats.get('queue')}"
    )
    assert fivexx == 0
    assert statuses == [200] * (big_n + small_n)
    assert p99_small <= 2 * service_s


async def test_fleet_status_shows_the_router_queue(replicas, redis_url) -> None:
    from rich.console import Console

    from fleet.launch.status import collect_status
    from fleet.launch.view import fleet_view

    replicas[0].configure(delay=0.6)
    config = router_config(replicas[:1], queue=QueueSettings(replica_max_in_flight=1))
    async with run_router(config) as router:
        sent = [asyncio.create_task(router.client.post(PATH, json=chat(f"{i}"))) for i in range(3)]
        await until(lambda: queued(router) == 2)
        status = await collect_status(
            redis_url=redis_url, router_url=router.url, admin_key="admin-secret"
        )
        await asyncio.gather(*sent)
    assert status["router"]["view"]["queue"]["depth"] == 2
    console = Console(record=True, width=160)
    console.print(fleet_view({**status, "fleet": {"name": "t", "events": []}}))
    text = console.export_text()
    assert "queue" in text and "2 waiting" in text
