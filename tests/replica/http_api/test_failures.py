"""Clean failure: client disconnects abort their engine requests at once (streaming or not), and an
engine failure after a stream began reaches the client as one SSE error event then [DONE]."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import httpx
import pytest
from live_replica import LiveReplica, serve, wait_until
from openai_schema import assert_valid

# Long enough that no request can finish while the others are still connecting.
LONG = {"prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True, "temperature": 0}


def _engine_idle(replica: LiveReplica) -> bool:
    load = replica.engine.load()
    return (
        load["running"] == 0
        and load["waiting"] == 0
        and load["free_blocks"] == load["num_blocks"]
        and replica.runtime.inflight == 0
    )


async def test_cancelled_streams_free_everything_within_a_second(replica: LiveReplica) -> None:
    streams = 50
    all_streaming = asyncio.Event()
    release = asyncio.Event()  # the clients disconnect only after the checks below
    ready = 0

    async def one(client: httpx.AsyncClient) -> int:
        nonlocal ready
        frames = 0
        async with client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    frames += 1
                if frames == 2:
                    ready += 1
                    if ready == streams:
                        all_streaming.set()
                    await release.wait()
                    break  # leaving the block closes the connection mid-stream
        return frames

    limits = httpx.Limits(max_connections=streams)
    async with httpx.AsyncClient(base_url=replica.url, limits=limits, timeout=60) as client:
        client.headers["Authorization"] = f"Bearer {replica.api_key}"
        tasks = [asyncio.create_task(one(client)) for _ in range(streams)]
        await asyncio.wait_for(all_streaming.wait(), 60)
        # Every request is mid-stream in the engine right now.
        assert replica.engine.load()["running"] + replica.engine.load()["waiting"] == streams
        assert replica.runtime.inflight == streams
        release.set()
        assert await asyncio.gather(*tasks) == [2] * streams
    closed_at = time.monotonic()
    assert await asyncio.to_thread(wait_until, lambda: _engine_idle(replica), 1.0)
    assert time.monotonic() - closed_at <= 1.0


async def test_cancelled_non_streaming_requests_are_aborted(replica: LiveReplica) -> None:
    async with httpx.AsyncClient(base_url=replica.url, timeout=60) as client:
        client.headers["Authorization"] = f"Bearer {replica.api_key}"
        tasks = [
            asyncio.create_task(client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "tell me a story"}],
                "max_tokens": 2000, "ignore_eos": True,
            }))
            for _ in range(5)
        ]  # fmt: skip
        assert await asyncio.to_thread(
            wait_until, lambda: replica.engine.load()["running"] == 5, 30
        )
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert await asyncio.to_thread(wait_until, lambda: _engine_idle(replica), 1.0)
    text = httpx.get(f"{replica.url}/metrics").text
    assert 'fleetserve_requests_total{route="/v1/chat/completions",status="499"} 5.0' in text


def test_engine_failure_mid_stream_is_an_error_event(tiny_model) -> None:
    with serve(tiny_model, max_model_len=2048) as replica, replica.http() as http:
        with http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first.removeprefix("data: "))["choices"]
            replica.engine.shutdown()  # the step thread goes away under a live stream
            rest = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
        *content, error, done = rest
        assert done == "[DONE]"
        body = json.loads(error)
        assert_valid("ErrorResponse", body)
        assert body["error"]["type"] == "internal_server_error"
        assert all("error" not in json.loads(c) for c in content)
        # The replica now says it cannot serve, instead of hanging new requests.
        assert http.get("/health").status_code == 503
        response = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert response.status_code == 503
        assert_valid("ErrorResponse", response.json())


def test_full_queue_is_503_with_retry_after(tiny_model) -> None:
    with (
        serve(tiny_model, max_waiting=1, max_num_seqs=1, max_model_len=2048) as replica,
        httpx.Client(base_url=replica.url, timeout=60) as http,
        contextlib.ExitStack() as streams,
    ):
        for _ in range(2):
            r = streams.enter_context(
                http.stream("POST", "/v1/completions", json={**LONG, "stream": True})
            )
            assert r.status_code == 200
        # One request runs, one waits: the queue is at its limit.
        assert wait_until(lambda: replica.engine.load()["waiting"] == 1, 10)
        refused = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["code"] == "overloaded"
        streams.close()  # both streams disconnect mid-way
        assert wait_until(lambda: _engine_idle(replica), 1.0)


@pytest.fixture(scope="module")
def replica(tiny_model) -> LiveReplica:
    """Its own server: these tests load it with many long requests."""
    with serve(tiny_model, api_key="sk-failures", max_model_len=2048) as live:
        yield live


def test_an_unexpected_error_is_a_500_with_its_request_id(tiny_model, monkeypatch) -> None:
    """Starlette answers a bug outside every middleware; the answer still carries the id the
    logs and traces know the request by, and nothing of the exception."""

    def broken(name: str | None) -> str:
        raise RuntimeError("a bug in check_model")

    with serve(tiny_model) as replica, replica.http() as http:
        monkeypatch.setattr(replica.runtime, "check_model", broken)
        answer = http.post(
            "/v1/completions",
            json={"prompt": "x", "max_tokens": 1},
            headers={"X-Request-Id": "bug-1"},
        )
    assert answer.status_code == 500
    assert answer.headers["x-request-id"] == "bug-1"
    assert_valid("ErrorResponse", answer.json())
    assert "a bug" not in answer.text
