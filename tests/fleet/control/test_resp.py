"""The hot-path Redis client against a real server: replies, pipelining, errors, stalls."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from fleet.control.resp import LuaScript, RespClient
from fleet.embedded_redis import EmbeddedRedis


async def test_replies_and_pipelining(redis_url: str, prefix: str) -> None:
    client = RespClient(redis_url)
    try:
        assert await client.execute("SET", f"{prefix}:a", "x" * 5000) == b"OK"
        assert await client.execute("GET", f"{prefix}:a") == b"x" * 5000
        assert await client.execute("GET", f"{prefix}:missing") is None
        counts = await asyncio.gather(*(client.execute("INCR", f"{prefix}:n") for _ in range(500)))
        assert sorted(counts) == list(range(1, 501)) and counts == sorted(counts)  # in order
        await client.execute("RPUSH", f"{prefix}:l", "a", b"b", 3, 1.5)
        assert await client.execute("LRANGE", f"{prefix}:l", 0, -1) == [b"a", b"b", b"3", b"1.5"]
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await client.execute("INCR", f"{prefix}:l")
        assert await client.execute("PING") == b"PONG"  # the connection survived the error
    finally:
        await client.aclose()


async def test_evalsha_loads_the_script_when_missing(redis_url: str, prefix: str) -> None:
    script = LuaScript(f"return {{KEYS[1], tonumber(ARGV[1]) * 2, {{'{prefix}'}}}}")
    client = RespClient(redis_url)
    try:
        with redis.Redis.from_url(redis_url) as sync:
            assert sync.script_exists(script.sha) == [False]
        expected = [b"k", 42, [prefix.encode()]]
        assert await client.evalsha(script, ["k"], [21]) == expected  # NOSCRIPT -> EVAL
        assert await client.evalsha(script, ["k"], [21]) == expected  # now cached
    finally:
        await client.aclose()


async def test_cancelled_caller_does_not_desync_the_connection(redis_url: str, prefix: str) -> None:
    client = RespClient(redis_url)
    try:
        await client.execute("SET", f"{prefix}:v", "1")
        slow = asyncio.ensure_future(client.execute("BLPOP", f"{prefix}:empty", "0.3"))
        fast = asyncio.ensure_future(client.execute("GET", f"{prefix}:v"))
        await asyncio.sleep(0.05)
        slow.cancel()
        assert await fast == b"1"  # its reply comes after BLPOP's, and is still its own
        assert await client.execute("GET", f"{prefix}:v") == b"1"
    finally:
        await client.aclose()


async def test_stalled_and_restarted_redis() -> None:
    server = EmbeddedRedis().start()
    port = server.port
    client = RespClient(server.url, timeout=0.3)
    try:
        assert await client.execute("PING") == b"PONG"
        stall = threading.Thread(
            target=lambda: redis.Redis(port=port).execute_command("DEBUG", "SLEEP", "1")
        )
        stall.start()
        await asyncio.sleep(0.1)
        start = time.monotonic()
        with pytest.raises(RedisTimeoutError):
            await client.execute("PING")
        assert time.monotonic() - start < 0.6
        stall.join()
        assert await client.execute("PING") == b"PONG"  # reconnected by itself
        server.stop()
        with pytest.raises(RedisConnectionError):
            await client.execute("PING")
        server = EmbeddedRedis(port=port).start()
        assert await client.execute("PING") == b"PONG"
    finally:
        await client.aclose()
        server.stop()
