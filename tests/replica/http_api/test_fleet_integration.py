"""The replica in a fleet, with a real Redis: fleet API keys protect direct access as the router does,
the replica joins membership once healthy, and SIGTERM drains it cleanly (subprocess)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from live_replica import MODEL_NAME, serve, wait_until
from openai_schema import assert_valid

from fleet.control.keys import KeyAdmin
from fleet.control.membership import list_replicas
from fleet.control.redis_conn import async_client


async def _membership(redis_url: str, url: str) -> list:
    client = async_client(redis_url)
    try:
        return [r for r in await list_replicas(client) if r.url == url]
    finally:
        await client.aclose()


async def test_fleet_keys_and_membership(tiny_model: Path, redis_url: str) -> None:
    admin_client = async_client(redis_url)
    admin = KeyAdmin(admin_client)
    _, open_key = await admin.create("open")
    _, other_model = await admin.create("other", models=["some-other-model"])
    limited, limited_key = await admin.create("limited", rpm=2)
    body = {"model": MODEL_NAME, "prompt": "hello", "max_tokens": 3}
    with serve(tiny_model, api_key="sk-static", redis_url=redis_url) as replica:

        def post(key: str) -> httpx.Response:
            headers = {"Authorization": f"Bearer {key}"}
            return httpx.post(f"{replica.url}/v1/completions", json=body, headers=headers)

        assert (await asyncio.to_thread(post, open_key)).status_code == 200
        assert (await asyncio.to_thread(post, "sk-static")).status_code == 200
        unknown = await asyncio.to_thread(post, "sk-unknown")
        assert unknown.status_code == 401
        forbidden = await asyncio.to_thread(post, other_model)
        assert forbidden.status_code == 403 and forbidden.json()["error"]["param"] == "model"
        statuses = [(await asyncio.to_thread(post, limited_key)).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        limited_out = await asyncio.to_thread(post, limited_key)
        assert int(limited_out.headers["Retry-After"]) >= 1
        for response in (unknown, forbidden, limited_out):
            assert_valid("ErrorResponse", response.json())
        usage = await admin.usage(limited.id)
        assert usage.requests == 2 and usage.completion_tokens == 6

        # Joined the fleet once healthy, with what a router needs.
        entries = await _membership(redis_url, replica.url)
        assert len(entries) == 1
        entry = entries[0]
        assert (entry.model, entry.state, entry.max_model_len, entry.block_size) == (
            MODEL_NAME, "ready", 512, 16,
        )  # fmt: skip
        assert entry.kv_capacity_tokens == 8192
    assert await _membership(redis_url, replica.url) == []
    await admin_client.aclose()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DRAIN_KEY = "sk-drain-test"
AUTH = {"Authorization": f"Bearer {DRAIN_KEY}"}


def _stream_completion(url: str, results: list, started: threading.Event) -> None:
    """One long streaming request; records (chunks seen before SIGTERM flag, usage, finish)."""
    body = {
        "prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True}, "temperature": 0,
    }  # fmt: skip
    frames = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                frames.append(line.removeprefix("data: "))
                started.set()
    results.append(frames)


def test_sigterm_drains_and_exits_zero(tiny_model: Path, redis_url: str) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "replica", "--model", str(tiny_model), "--port", str(port),
        "--served-model-name", "tiny-drain", "--device", "cpu", "--dtype", "float32",
        "--max-model-len", "2048", "--kv-cache-tokens", "16384", "--redis-url", redis_url,
        "--drain-grace", "240", "--log-level", "warning", "--api-key", DRAIN_KEY,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert wait_until(lambda: _status(url, "/health") == 200, 120, 0.2), "never healthy"
        assert wait_until(lambda: len(asyncio.run(_membership(redis_url, url))) == 1, 10, 0.1)
        results: list = []
        events = [threading.Event() for _ in range(4)]
        threads = [
            threading.Thread(target=_stream_completion, args=(url, results, e)) for e in events
        ]
        for t in threads:
            t.start()
        assert all(e.wait(60) for e in events)
        proc.send_signal(signal.SIGTERM)
        # New work is refused with 503 while the in-flight streams keep going.
        assert wait_until(lambda: _status(url, "/health") == 503, 5, 0.02)
        refused = httpx.post(
            f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=AUTH
        )
        assert refused.status_code == 503 and "Retry-After" in refused.headers
        assert_valid("ErrorResponse", refused.json())
        entry = asyncio.run(_membership(redis_url, url))
        assert [e.state for e in entry] == ["draining"]
        assert all(t.is_alive() for t in threads), "requests ended before the drain began"
        for t in threads:
            t.join(240)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(results) == 4
    for frames in results:
        assert frames[-1] == "[DONE]"
        usage = json.loads(frames[-2])["usage"]
        assert usage["completion_tokens"] == 1500
        assert json.loads(frames[-3])["choices"][0]["finish_reason"] == "length"
    assert asyncio.run(_membership(redis_url, url)) == []


def _status(url: str, path: str) -> int | None:
    try:
        return httpx.get(url + path, timeout=1).status_code
    except httpx.HTTPError:
        return None


pytestmark = pytest.mark.timeout(300)
