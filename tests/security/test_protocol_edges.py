"""What the fuzzer found at the HTTP edge of both servers, replayed with raw sockets: a valid
request followed by junk keeps its answer (then a JSON 400), Upgrade requests are answered as
plain HTTP, trailing slashes are a 404 body rather than a redirect built from the Host header,
malformed requests get OpenAI error JSON, and a wrong method on a generation route is a 405."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
from live_replica import API_KEY, LiveReplica, serve
from router_harness import MODEL, FakeReplica, fake_replicas, router_config, run_router

from router.routing.prompt_key import chat_units


def exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes, read until the server closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                part = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not part:
                break
            received += part
        return received


def answers(raw: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each response in `raw` (content-length framing only)."""
    out = []
    while raw.startswith(b"HTTP/1.1 "):
        head, _, rest = raw.partition(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        out.append((status, rest[:length]))
        raw = rest[length:]
    return out


def is_openai_error(body: bytes) -> bool:
    error = orjson.loads(body).get("error")
    return isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error)


# -- the router


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeReplica]:
    with fake_replicas(1, "--model", MODEL) as started:
        yield started[0]


@pytest.fixture
async def router_port(fake: FakeReplica):
    async with run_router(router_config([fake])) as router:
        yield router.server.port


async def test_router_answers_a_request_followed_by_junk_then_refuses(router_port: int) -> None:
    import asyncio

    raw = await asyncio.to_thread(
        exchange, router_port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n\x8ab junk\r\n\r\n"
    )
    got = answers(raw)
    assert [status for status, _ in got] == [200, 400]
    assert orjson.loads(got[0][1])["status"] == "ok"
    assert is_openai_error(got[1][1])


async def test_router_answers_upgrade_requests_as_http(router_port: int) -> None:
    import asyncio

    request = (
        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    got = answers(await asyncio.to_thread(exchange, router_port, request))
    assert [status for status, _ in got] == [200]


async def test_router_wrong_method_trailing_slash_and_odd_roles(fake: FakeReplica) -> None:
    async with run_router(router_config([fake])) as router:
        patch = await router.client.patch("/v1/chat/completions", json={})
        slash = await router.client.get("/health/")
        roles = await router.client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": ["x"], "content": "hi"}]},
        )
    assert patch.status_code == 405 and patch.headers["allow"] == "POST"
    assert slash.status_code == 404 and is_openai_error(slash.content)
    assert roles.status_code < 500
    assert chat_units([{"role": ["x"], "content": [{"type": "text", "text": 3}]}]) == "\x1f\x1e"


# -- the replica


@pytest.fixture(scope="module")
def replica(model_factory: Callable[..., Path]) -> Iterator[LiveReplica]:
    with serve(model_factory("llama", "tiny", seed=0), api_key=API_KEY) as live:
        yield live


def replica_port(replica: LiveReplica) -> int:
    return int(replica.url.rsplit(":", 1)[1])


def test_replica_answers_a_request_followed_by_junk_then_refuses(replica: LiveReplica) -> None:
    raw = exchange(replica_port(replica), b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n\xa8\xcc\r")
    got = answers(raw)
    assert [status for status, _ in got] == [200, 400]
    assert is_openai_error(got[1][1])


@pytest.mark.parametrize(
    "request_line",
    [
        b"FOO / HTTP/1.1",
        b"GET noslash HTTP/1.1",
        b"GET /\xff HTTP/1.1",
        b"GET / HTTP/1.1\r\nX\x00: 1",
    ],
)
def test_replica_refuses_malformed_requests_with_error_json(
    replica: LiveReplica, request_line: bytes
) -> None:
    got = answers(exchange(replica_port(replica), request_line + b"\r\nHost: x\r\n\r\n"))
    assert len(got) == 1 and got[0][0] == 400 and is_openai_error(got[0][1])


def test_replica_answers_upgrades_as_http_and_slashes_with_a_404(replica: LiveReplica) -> None:
    upgrade = (
        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    assert [s for s, _ in answers(exchange(replica_port(replica), upgrade))] == [200]
    slash = answers(
        exchange(
            replica_port(replica), b"GET /health/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
    )
    assert slash[0][0] == 404 and is_openai_error(slash[0][1])


@pytest.mark.parametrize("coding", [b"gzip", b"identity", b"chunked, gzip"])
def test_replica_refuses_a_body_of_unknowable_length(replica: LiveReplica, coding: bytes) -> None:
    """llhttp reads such a body until the client closes: the request used to wait for ever."""
    request = (
        b"POST /tokenize HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + API_KEY.encode()
        + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: "
        + coding
        + b'\r\n\r\n{"prompt": "hi"}'
    )
    got = answers(exchange(replica_port(replica), request, timeout=5.0))
    assert len(got) == 1 and got[0][0] == 400 and is_openai_error(got[0][1])


@pytest.mark.parametrize("coding", [b"gzip", b"identity"])
async def test_router_refuses_a_body_of_unknowable_length(router_port: int, coding: bytes) -> None:
    import asyncio

    request = (
        b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: " + coding + b'\r\n\r\n{"prompt": "hi"}'
    )
    got = answers(await asyncio.to_thread(exchange, router_port, request, 5.0))
    assert len(got) == 1 and got[0][0] == 400 and is_openai_error(got[0][1])
