"""Admissions and settlements batched per event-loop tick (fleet.control.keys.batch), against a
real Redis: one EVALSHA per tick, each caller its own answer, limits exact within a batch and
across routers, and a stall mid-batch that leaves every caller answered and no slot behind."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections.abc import AsyncIterator

import pytest
import redis

from fleet.control.errors import APIError
from fleet.control.keys import KeyRecord, KeyStore, Ticket
from fleet.control.redis_conn import async_client
from fleet.embedded_redis import EmbeddedRedis


@pytest.fixture
async def stores(redis_url: str, prefix: str) -> AsyncIterator[tuple[KeyStore, KeyStore]]:
    """Two stores as two routers would hold them: separate clients, one Redis."""
    a, b = KeyStore(redis_url, prefix=prefix), KeyStore(redis_url, prefix=prefix)
    await a.start()
    await b.start()
    yield a, b
    await a.close()
    await b.close()


def script_calls(url: str) -> int:
    """EVALSHA and EVAL calls Redis has run so far (all clients)."""
    with redis.Redis.from_url(url) as client:
        stats = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval"))


async def attempt(store: KeyStore, record: KeyRecord, reserve: int = 0) -> Ticket | APIError:
    try:
        return await store.admit(record, reserve)
    except APIError as err:
        return err


async def test_one_tick_is_one_call_and_admits_exactly_the_limit(
    stores: tuple[KeyStore, KeyStore], redis_url: str
) -> None:
    a, _ = stores
    record, secret = await a.admin.create("burst", rpm=20)
    rec = await a.authenticate(secret)
    await a.release(await a.admit(rec))  # the script is loaded, the connection open
    before = script_calls(redis_url)
    results = await asyncio.gather(*(attempt(a, rec) for _ in range(100)))
    calls = script_calls(redis_url) - before
    assert calls == 1  # 100 admissions, one EVALSHA
    admitted = [r for r in results if isinstance(r, Ticket)]
    refused = [r for r in results if isinstance(r, APIError)]
    assert len(admitted) == 19 and len(refused) == 81  # 20 a minute, one taken above
    assert len({t.id for t in admitted}) == 19
    for err in refused:
        assert err.status == 429 and "requests per minute (rpm): 20" in err.message
        assert 58 <= int(err.headers["Retry-After"]) <= 60  # when the oldest second ages out
    usage = await a.admin.usage(record.id)
    assert (usage.requests, usage.window_requests) == (20, 20)


async def test_mixed_keys_in_one_batch_each_get_their_own_limits(
    stores: tuple[KeyStore, KeyStore], redis_url: str
) -> None:
    a, _ = stores
    recs = {}
    for name, limits in {
        "rpm": {"rpm": 5},
        "tpm": {"tpm": 1000},
        "slots": {"max_concurrent": 2},
        "free": {},
    }.items():
        _, secret = await a.admin.create(name, **limits)  # type: ignore[arg-type]
        recs[name] = await a.authenticate(secret)
    await a.release(await a.admit(recs["slots"]))
    await a.settle(await a.admit(recs["slots"]))  # connection and script ready
    order = [name for _ in range(10) for name in ("rpm", "tpm", "slots", "free")]
    random.Random(7).shuffle(order)
    before = script_calls(redis_url)
    results = await asyncio.gather(*(attempt(a, recs[n], 300) for n in order))
    assert script_calls(redis_url) - before == 1  # three limited keys, one call; "free" none
    by_key: dict[str, list[Ticket | APIError]] = {n: [] for n in recs}
    for name, result in zip(order, results, strict=True):
        by_key[name].append(result)

    def admitted(name: str) -> int:
        return sum(isinstance(r, Ticket) for r in by_key[name])

    assert (admitted("rpm"), admitted("tpm"), admitted("slots"), admitted("free")) == (5, 3, 2, 10)
    refusals = {
        "rpm": ("requests per minute (rpm): 5", 58),
        "tpm": ("tokens per minute (tpm): 1000", 58),
        "slots": ("concurrent requests (max_concurrent): 2", 1),
    }
    for name, (text, retry_at_least) in refusals.items():
        for err in (r for r in by_key[name] if isinstance(r, APIError)):
            assert err.status == 429 and text in err.message
            assert retry_at_least <= int(err.headers["Retry-After"]) <= 60
    tickets = [r for results in by_key.values() for r in results if isinstance(r, Ticket)]
    tpm_tickets = [r for r in by_key["tpm"] if isinstance(r, Ticket)]
    assert {t.reserved_tokens for t in tpm_tickets} == {300}
    await asyncio.gather(*(a.release(t) for t in tickets))
    assert (await a.admin.usage(recs["slots"].id)).concurrent == 0
    assert (await a.admin.usage(recs["tpm"].id)).window_tokens == 0  # all refunded


async def test_batched_settlements_charge_exactly_and_free_slots_in_order(
    stores: tuple[KeyStore, KeyStore], redis_url: str
) -> None:
    a, b = stores
    record, secret = await a.admin.create("settled", tpm=100_000, max_concurrent=40)
    rec = await a.authenticate(secret)
    tickets = await asyncio.gather(*(a.admit(rec, 500) for _ in range(40)))
    assert (await a.admin.usage(record.id)).window_tokens == 40 * 500
    before = script_calls(redis_url)
    await asyncio.gather(*(a.settle(t, i, 2 * i) for i, t in enumerate(tickets)))
    assert script_calls(redis_url) - before == 1
    usage = await a.admin.usage(record.id)
    assert usage.window_tokens == sum(3 * i for i in range(40))  # reservations refunded
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        sum(range(40)),
        sum(2 * i for i in range(40)),
    )
    assert usage.concurrent == 0 and usage.requests == 40
    # A settlement queued before an admission in the same tick frees its slot for it.
    held = await asyncio.gather(*(b.admit(rec) for _ in range(40)))
    with pytest.raises(APIError):
        await b.admit(rec)
    before = script_calls(redis_url)
    settle = asyncio.ensure_future(b.settle(held[0], 1, 1))
    admit = asyncio.ensure_future(b.admit(rec))
    await settle
    again = await admit
    assert script_calls(redis_url) - before == 1
    await asyncio.gather(*(b.release(t) for t in [again, *held[1:]]))
    assert (await a.admin.usage(record.id)).concurrent == 0


async def test_two_routers_batching_never_exceed_the_shared_limits(
    stores: tuple[KeyStore, KeyStore],
) -> None:
    a, b = stores
    record, secret = await a.admin.create("contended", rpm=150, max_concurrent=5)
    recs = (await a.authenticate(secret), await b.authenticate(secret))
    held = peak = admitted = 0
    rng = random.Random(3)

    async def worker(i: int) -> None:
        nonlocal held, peak, admitted
        store, rec = (a, recs[0]) if i % 2 else (b, recs[1])
        for _ in range(6):
            try:
                ticket = await store.admit(rec)
            except APIError as err:
                assert err.status == 429
                await asyncio.sleep(rng.random() * 0.01)
                continue
            held += 1
            admitted += 1
            peak = max(peak, held)
            await asyncio.sleep(rng.random() * 0.01)
            held -= 1  # before the slot is freed, so `held` never counts more than Redis holds
            await store.settle(ticket, 1, 1)

    await asyncio.gather(*(worker(i) for i in range(60)))
    assert peak == 5  # reached, never passed
    assert 5 < admitted <= 150
    usage = await a.admin.usage(record.id)
    assert usage.concurrent == 0 and usage.window_requests == admitted


async def test_a_caller_gone_before_the_answer_gives_its_hold_back(
    stores: tuple[KeyStore, KeyStore],
) -> None:
    a, _ = stores
    record, secret = await a.admin.create("impatient", max_concurrent=1, tpm=1000)
    rec = await a.authenticate(secret)
    waiting = asyncio.ensure_future(a.admit(rec, 400))
    await asyncio.sleep(0)  # queued in this tick's batch
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting

    async def given_back() -> bool:
        usage = await a.admin.usage(record.id)
        return usage.concurrent == 0 and usage.window_tokens == 0 and usage.requests == 1

    deadline = time.monotonic() + 2.0
    while not await given_back():
        assert time.monotonic() < deadline, "the hold of a caller that left was not given back"
        await asyncio.sleep(0.01)
    await a.release(await a.admit(rec))  # the slot is free again


async def test_a_stall_mid_batch_answers_every_caller_and_leaves_no_slot() -> None:
    server = EmbeddedRedis().start()
    admin_client = async_client(server.url)
    store = KeyStore(server.url, prefix="stall", retry_interval=0.2)
    try:
        await store.start()
        record, secret = await store.admin.create("stalled", rpm=1000, max_concurrent=50)
        rec = await store.authenticate(secret)
        before_stall = await asyncio.gather(*(store.admit(rec) for _ in range(5)))
        stall = threading.Thread(
            target=lambda: redis.Redis(port=server.port).execute_command("DEBUG", "SLEEP", "2")
        )
        stall.start()
        await asyncio.sleep(0.1)
        start = time.monotonic()
        # One tick: 20 admissions and 5 settlements, stuck behind the stall in one EVALSHA.
        results = await asyncio.gather(
            *(attempt(store, rec) for _ in range(20)),
            *(store.settle(t, 3, 4) for t in before_stall),
        )
        assert time.monotonic() - start < 1.8  # one socket timeout (1 s), then local counters
        tickets = results[:20]
        assert all(isinstance(t, Ticket) and t.local for t in tickets)
        assert results[20:] == [None] * 5
        assert not store.health.up
        stall.join()
        # Redis ran the stalled batch after all: its 20 slots are phantoms until voided.
        deadline = time.monotonic() + 5.0
        while not store.health.up or store.limits.in_doubt:
            assert time.monotonic() < deadline, "the store did not recover"
            await asyncio.sleep(0.02)
        assert (await store.admin.usage(record.id)).concurrent == 0
        for ticket in tickets:
            assert isinstance(ticket, Ticket)
            await store.release(ticket)  # local: nothing in Redis to free
        late = await store.admit(rec)
        assert not late.local
        await store.settle(late, 1, 1)
        usage = await store.admin.usage(record.id)
        assert usage.concurrent == 0
        # The stalled settlements' usage is counted once it was written back (or ran).
        assert usage.prompt_tokens >= 5 * 3 and usage.completion_tokens >= 5 * 4
    finally:
        await store.close()
        await admin_client.aclose()
        server.stop()


def test_ticket_ids_differ_in_a_forked_child() -> None:
    from fleet.control.keys.limits import TICKET_IDS

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its prefix and leave at once
        os.write(write, TICKET_IDS.prefix.encode())
        os._exit(0)
    os.close(write)
    child_prefix = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child_prefix) == len(TICKET_IDS.prefix) == 16
    assert child_prefix != TICKET_IDS.prefix
