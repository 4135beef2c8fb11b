"""API keys against a real Redis: shared limits, invalidation, hashing, usage."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from fleet.control.errors import APIError
from fleet.control.keys import (
    KeyStore,
    bearer_token,
    hash_secret,
    is_admin_key,
    parse_duration,
    require_admin,
)


@pytest.fixture
async def stores(redis_url: str, prefix: str) -> AsyncIterator[tuple[KeyStore, KeyStore]]:
    """Two stores as two routers would hold them: separate clients, one Redis."""
    a, b = KeyStore(redis_url, prefix=prefix), KeyStore(redis_url, prefix=prefix)
    await a.start()
    await b.start()
    yield a, b
    await a.close()
    await b.close()


async def _until(predicate, timeout: float = 2.0) -> float:
    start = time.monotonic()
    while not await predicate():
        assert time.monotonic() - start < timeout, "condition not reached in time"
        await asyncio.sleep(0.005)
    return time.monotonic() - start


async def _rejects(store: KeyStore, secret: str) -> bool:
    try:
        await store.authenticate(secret)
    except APIError as exc:
        assert exc.status == 401
        return True
    return False


async def test_two_stores_share_rpm_exactly(stores: tuple[KeyStore, KeyStore]) -> None:
    a, b = stores
    record, secret = await a.admin.create("shared", rpm=50)
    rec_a, rec_b = await a.authenticate(secret), await b.authenticate(secret)

    async def attempt(i: int) -> int:
        store, rec = (a, rec_a) if i % 2 else (b, rec_b)
        try:
            await store.admit(rec)
        except APIError as exc:
            assert exc.status == 429
            assert "requests per minute (rpm): 50" in exc.message
            assert 1 <= int(exc.headers["Retry-After"]) <= 60
            return 0
        return 1

    results = await asyncio.gather(*(attempt(i) for i in range(200)))
    assert sum(results) == 50
    assert a.health.up and b.health.up
    usage = await a.admin.usage(record.id)
    assert (usage.requests, usage.window_requests) == (50, 50)


async def test_revocation_reaches_other_store_within_a_second(
    stores: tuple[KeyStore, KeyStore],
) -> None:
    a, b = stores
    record, secret = await a.admin.create("soon-gone")
    assert (await b.authenticate(secret)).id == record.id
    await a.admin.revoke(record.id)
    elapsed = await _until(lambda: _rejects(b, secret), timeout=1.0)
    assert elapsed < 1.0
    with pytest.raises(APIError) as err:
        await a.authenticate(secret)
    assert err.value.status == 401 and "revoked" in err.value.message


async def test_rotation_keeps_id_and_limits(stores: tuple[KeyStore, KeyStore]) -> None:
    a, b = stores
    record, old_secret = await a.admin.create("rotating", rpm=7, tpm=900, max_concurrent=3)
    await b.authenticate(old_secret)
    rotated, new_secret = await a.admin.rotate(record.id)
    assert new_secret != old_secret and new_secret.startswith("sk-")
    assert (rotated.id, rotated.rpm, rotated.tpm, rotated.max_concurrent) == (record.id, 7, 900, 3)
    assert await _until(lambda: _rejects(b, old_secret), timeout=1.0) < 1.0
    assert (await b.authenticate(new_secret)).id == record.id


async def test_no_secret_is_stored_in_redis(
    stores: tuple[KeyStore, KeyStore], redis_client: aioredis.Redis, prefix: str
) -> None:
    a, _ = stores
    secrets = []
    for i in range(3):
        record, secret = await a.admin.create(f"k{i}", rpm=10, tpm=100, max_concurrent=2)
        secrets.append(secret)
    _, rotated = await a.admin.rotate(record.id)
    secrets.append(rotated)
    rec = await a.authenticate(rotated)
    async with a.admitted(rec, reserve_tokens=10) as ticket:
        await a.settle(ticket, 3, 4)
    dump = bytearray()
    async for key in redis_client.scan_iter(match="*", count=1000):
        dump += key
        kind = (await redis_client.type(key)).decode()
        if kind == "string":
            dump += await redis_client.get(key) or b""
        elif kind == "hash":
            for f, v in (await redis_client.hgetall(key)).items():
                dump += f + v
        elif kind == "set":
            dump += b"".join(await redis_client.smembers(key))
        elif kind == "zset":
            dump += b"".join(await redis_client.zrange(key, 0, -1))
    assert prefix.encode() in dump
    for secret in secrets:
        assert secret.encode() not in dump
        assert secret[3:].encode() not in dump  # not even without its "sk-"
        assert hash_secret(secret).encode() in dump or secret != rotated


async def test_authentication_errors(stores: tuple[KeyStore, KeyStore]) -> None:
    a, _ = stores
    _, secret = await a.admin.create("only-llama", models=["llama"])
    _, short = await a.admin.create("short-lived", expires_in=0.3)
    assert (await a.authenticate(secret, model="llama")).name == "only-llama"
    cases = [
        (None, None, 401, "Missing API key"),
        ("sk-not-a-key", None, 401, "Incorrect API key"),
        (secret, "qwen", 403, "may not use the model 'qwen'"),
    ]
    for given, model, status, text in cases:
        with pytest.raises(APIError) as err:
            await a.authenticate(given, model=model)
        assert err.value.status == status and text in err.value.message
    await a.authenticate(short)
    await asyncio.sleep(0.35)
    with pytest.raises(APIError) as err:
        await a.authenticate(short)
    assert err.value.status == 401 and "expired" in err.value.message


async def test_tpm_reserve_settle_and_refund(stores: tuple[KeyStore, KeyStore]) -> None:
    a, b = stores
    record, secret = await a.admin.create("tokens", tpm=1000)
    rec = await a.authenticate(secret)
    first = await a.admit(rec, reserve_tokens=600)
    with pytest.raises(APIError) as err:
        await b.admit(rec, reserve_tokens=600)
    assert err.value.status == 429 and "tokens per minute (tpm): 1000" in err.value.message
    await a.settle(first, prompt_tokens=100, completion_tokens=50)  # 600 reserved -> 150 used
    second = await b.admit(rec, reserve_tokens=800)
    await b.release(second)  # failure: the whole reservation comes back
    await b.release(second)  # idempotent
    third = await a.admit(rec, reserve_tokens=850)
    await a.settle(third, 20, 30)
    usage = await a.admin.usage(record.id)
    assert usage.window_tokens == 150 + 50
    assert (usage.requests, usage.prompt_tokens, usage.completion_tokens) == (3, 120, 80)
    assert usage.last_used_at is not None


async def test_max_concurrent_released_on_finish_error_and_cancel(
    stores: tuple[KeyStore, KeyStore],
) -> None:
    a, b = stores
    record, secret = await a.admin.create("narrow", max_concurrent=2)
    rec = await a.authenticate(secret)
    t1 = await a.admit(rec)
    t2 = await b.admit(rec)
    with pytest.raises(APIError) as err:
        await a.admit(rec)
    assert (
        err.value.status == 429 and "concurrent requests (max_concurrent): 2" in err.value.message
    )
    await a.settle(t1, 1, 1)
    await a.settle(t1, 1, 1)  # a second settle frees nothing more
    with pytest.raises(RuntimeError):
        async with b.admitted(rec):
            raise RuntimeError("upstream failed")

    started = asyncio.Event()

    async def streaming() -> None:
        async with a.admitted(rec):
            started.set()
            await asyncio.sleep(10)

    task = asyncio.create_task(streaming())
    await started.wait()
    task.cancel()  # the client disconnected
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await a.admin.usage(record.id)).concurrent == 1  # only t2
    await b.release(t2)
    assert (await a.admin.usage(record.id)).concurrent == 0
    held = [await a.admit(rec), await b.admit(rec)]
    for t in held:
        await a.release(t)


async def test_slots_of_a_crashed_router_expire(redis_url: str, prefix: str) -> None:
    crashed = KeyStore(redis_url, prefix=prefix, slot_ttl=0.6)
    survivor = KeyStore(redis_url, prefix=prefix, slot_ttl=0.6)
    await crashed.start()
    await survivor.start()
    try:
        _, secret = await survivor.admin.create("one-at-a-time", max_concurrent=1)
        rec = await survivor.authenticate(secret)
        long_running = await survivor.admit(rec)
        await asyncio.sleep(0.9)  # kept alive by the survivor's refreshes beyond slot_ttl
        with pytest.raises(APIError):
            await crashed.admit(rec)
        await survivor.release(long_running)
        await crashed.admit(rec)  # then the "crash": never released, never refreshed
        await crashed.close()
        with pytest.raises(APIError):
            await survivor.admit(rec)
        await asyncio.sleep(0.7)
        await survivor.release(await survivor.admit(rec))
    finally:
        await survivor.close()


async def test_new_key_is_found_on_cache_miss(stores: tuple[KeyStore, KeyStore]) -> None:
    a, b = stores
    with pytest.raises(APIError):
        await b.authenticate("sk-unknown")
    _, secret = await a.admin.create("fresh")
    assert (await b.authenticate(secret)).name == "fresh"


def test_admin_key_and_helpers() -> None:
    assert is_admin_key("sk-admin-x", "sk-admin-x")
    assert not is_admin_key("sk-admin-y", "sk-admin-x")
    assert not is_admin_key(None, "sk-admin-x")
    assert not is_admin_key("sk-admin-x", None)
    require_admin("Bearer sk-admin-x", "sk-admin-x")
    for header, expected, status in [
        ("Bearer nope", "sk-admin-x", 401),
        (None, "sk-admin-x", 401),
        ("Bearer sk-admin-x", None, 403),
    ]:
        with pytest.raises(APIError) as err:
            require_admin(header, expected)
        assert err.value.status == status
    assert bearer_token("Bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert parse_duration("30d") == 30 * 86400
    assert parse_duration("90m") == 5400
    with pytest.raises(ValueError):
        parse_duration("soon")


async def test_unlimited_keys_skip_admission_round_trips_but_count_usage(
    stores: tuple[KeyStore, KeyStore],
) -> None:
    a, _ = stores
    record, secret = await a.admin.create("free")
    rec = await a.authenticate(secret)
    for _ in range(5):
        ticket = await a.admit(rec, reserve_tokens=10**9)
        assert ticket.unlimited and not ticket.local
        await a.settle(ticket, 3, 4)

    async def flushed() -> bool:
        usage = await a.admin.usage(record.id)
        return (usage.requests, usage.prompt_tokens, usage.completion_tokens) == (5, 15, 20)

    assert await _until(flushed, timeout=3.0) < 3.0
