"""The router's own HTTP/1.1 server on loopback: framing, keep-alive, pipelining, limits, errors,
disconnects and the ASGI bridge, spoken to with raw sockets and httpx."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from router.http.asgi import asgi_bridge
from router.http.connection import ClientConnection
from router.http.messages import Request
from router.http.server import HttpServer


class Echo:
    """Handler under test: /echo answers the body, /stream sends it back in 3 chunks, /slow waits
    (recording a disconnect), /boom raises, anything else goes to a starlette app."""

    def __init__(self) -> None:
        self.disconnects = 0
        self.web = Starlette(routes=[Route("/web", lambda r: JSONResponse({"web": True}))])

    async def __call__(self, request: Request, conn: ClientConnection) -> None:
        if request.path == "/echo":
            body = orjson.dumps({"method": request.method, "body": request.body.decode(),
                                 "query": request.query.decode()})  # fmt: skip
            conn.respond(200, [(b"content-type", b"application/json")], body)
        elif request.path == "/stream":
            conn.start_stream(200, [(b"content-type", b"text/plain")])
            for part in (b"one,", b"two,", b"three"):
                conn.send_chunk(part)
                await asyncio.sleep(0.01)
            conn.end_stream(b"!")
        elif request.path == "/slow":
            gone = asyncio.Event()

            def left() -> None:
                self.disconnects += 1
                gone.set()

            conn.on_disconnect = left
            await gone.wait()
        elif request.path == "/boom":
            raise RuntimeError("handler bug")
        elif request.path == "/late-boom":  # answers, then fails while the next one is served
            conn.respond(200, [], b"answered")
            await asyncio.sleep(0.02)
            raise RuntimeError("bug after the answer")
        elif request.path == "/later":
            await asyncio.sleep(0.1)
            conn.respond(200, [], b"later")
        else:
            await asgi_bridge(self.web, request, conn)


@contextlib.asynccontextmanager
async def serving(max_body: int = 1024) -> AsyncIterator[tuple[HttpServer, Echo]]:
    handler = Echo()
    server = HttpServer(handler, "127.0.0.1", 0, max_body_bytes=max_body)
    await server.start()
    try:
        yield server, handler
    finally:
        await server.stop(grace_s=1)


async def raw(port: int, data: bytes, until: bytes | None = None) -> bytes:
    """Send `data`, read until `until` appears (or the server closes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    out = b""
    try:
        while until is None or until not in out:
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            if not chunk:
                break
            out += chunk
    finally:
        writer.close()
    return out


async def test_keep_alive_and_query() -> None:
    async with serving() as (server, _), httpx.AsyncClient() as client:
        base = f"http://127.0.0.1:{server.port}"
        for i in range(3):
            r = await client.post(f"{base}/echo?x={i}", content=b"hello")
            assert r.json() == {"method": "POST", "body": "hello", "query": f"x={i}"}
        assert len(server.connections) == 1


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with serving() as (server, _):
        one = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\na"
        two = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nConnection: close\r\n\r\nb"
        out = await raw(server.port, one + two)
    assert out.count(b"HTTP/1.1 200 OK") == 2
    assert out.index(b'"body":"a"') < out.index(b'"body":"b"')
    assert b"connection: close" in out


async def test_expect_continue_and_chunked_request_body() -> None:
    async with serving() as (server, _):
        head = (b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")  # fmt: skip
        out = await raw(server.port, head + b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK")
    assert b'"body":"abcde"' in out


async def test_streamed_response_is_chunked() -> None:
    async with serving() as (server, _), httpx.AsyncClient() as client:
        r = await client.get(f"http://127.0.0.1:{server.port}/stream")
    assert r.headers["transfer-encoding"] == "chunked"
    assert r.content == b"one,two,three!"


async def test_http_1_0_streams_are_not_chunked_and_end_with_the_connection() -> None:
    async with serving() as (server, _):
        out = await raw(server.port, b"GET /stream HTTP/1.0\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding" not in head.lower()
    assert b"connection: close" in head.lower()
    assert body == b"one,two,three!"


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n" + b"x" * 2000, 413),
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
        (b"GET /echo HTTP/1.1\r\n" + b"X-Big: %s\r\n\r\n" % (b"y" * 70_000), 431),
    ],
    ids=["body-over-limit", "malformed", "head-over-limit"],
)
async def test_bad_requests_get_an_error_body_and_a_closed_connection(request_bytes, status):
    async with serving(max_body=1024) as (server, _):
        out = await raw(server.port, request_bytes)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d" % status)
    assert orjson.loads(body)["error"]["message"]


async def test_handler_error_is_a_500_json_and_the_server_lives_on() -> None:
    async with serving() as (server, _), httpx.AsyncClient() as client:
        base = f"http://127.0.0.1:{server.port}"
        r = await client.get(f"{base}/boom")
        assert r.status_code == 500
        assert r.json()["error"]["type"] == "internal_server_error"
        assert (await client.post(f"{base}/echo", content=b"ok")).status_code == 200


async def test_a_handler_failing_after_its_answer_leaves_the_next_request_alone() -> None:
    async with serving() as (server, _):
        out = await raw(
            server.port,
            b"GET /late-boom HTTP/1.1\r\nHost: x\r\n\r\nGET /later HTTP/1.1\r\nHost: x\r\n\r\n",
            until=b"later",
        )
    assert out.count(b"HTTP/1.1 200 OK") == 2 and b" 500 " not in out
    tail = (
        rb"answeredHTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-request-id: [0-9a-f]{32}\r\n\r\nlater"
    )
    assert re.search(tail + rb"$", out)


async def test_disconnect_reaches_the_request_in_flight() -> None:
    async with serving() as (server, handler):
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.close()
        for _ in range(50):
            if handler.disconnects:
                break
            await asyncio.sleep(0.02)
        assert handler.disconnects == 1
        await asyncio.sleep(0.05)
        assert not server.connections


async def test_asgi_bridge_serves_the_starlette_routes() -> None:
    async with serving() as (server, _), httpx.AsyncClient() as client:
        base = f"http://127.0.0.1:{server.port}"
        assert (await client.get(f"{base}/web")).json() == {"web": True}
        assert (await client.get(f"{base}/nowhere")).status_code == 404


async def test_stop_lets_the_request_in_flight_finish() -> None:
    async with serving() as (server, _), httpx.AsyncClient() as client:
        streaming = asyncio.create_task(client.get(f"http://127.0.0.1:{server.port}/stream"))
        while not any(conn.active for conn in server.connections):
            await asyncio.sleep(0.001)
        await server.stop(grace_s=5)
        assert (await streaming).content == b"one,two,three!"
