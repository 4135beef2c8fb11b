"""Attacks on the router's own HTTP/1.1 server (router.http.server), with raw sockets against a
real server on loopback: heads that never end, too many headers, huge declared bodies, pipelined
bodies, HEAD framing, `100 Continue` ordering, clients that stop reading, connection floods."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from collections.abc import AsyncIterator

import orjson

from router.http.connection import ClientConnection
from router.http.messages import Request
from router.http.server import HttpServer

MIB = 1024 * 1024


class Handler:
    """/echo answers the body; /stream sends 3 chunks; /slow waits until `release` is set;
    /later answers after 0.1 s; /big answers `big` bytes; /flood streams until the client's
    buffer is full, then waits for it (recording a disconnect)."""

    def __init__(self, big: int = MIB) -> None:
        self.release = asyncio.Event()
        self.big = b"b" * big
        self.disconnects = 0

    async def __call__(self, request: Request, conn: ClientConnection) -> None:
        path = request.path
        if path == "/echo":
            conn.respond(200, [(b"content-type", b"text/plain")], b"echo:" + request.body)
        elif path == "/stream":
            conn.start_stream(200, [(b"content-type", b"text/plain")])
            for part in (b"one,", b"two,", b"three"):
                conn.send_chunk(part)
            conn.end_stream()
        elif path == "/slow":
            await self.release.wait()
            conn.respond(200, [], b"slow")
        elif path == "/later":
            await asyncio.sleep(0.1)
            conn.respond(200, [], b"later")
        elif path == "/big":
            conn.respond(200, [], self.big)
        elif path == "/flood":
            await self._flood(conn)
        else:
            conn.respond(404, [], b"")

    async def _flood(self, conn: ClientConnection) -> None:
        gone = asyncio.Event()

        def left() -> None:
            self.disconnects += 1
            gone.set()

        conn.on_disconnect = left
        conn.start_stream(200, [])
        while not conn.writing_paused and not conn.closed:
            conn.send_chunk(b"f" * 65536)
        await gone.wait()


@contextlib.asynccontextmanager
async def serving(
    max_body: int = 1024, **options: float
) -> AsyncIterator[tuple[HttpServer, Handler]]:
    handler = Handler()
    server = HttpServer(handler, "127.0.0.1", 0, max_body_bytes=max_body, **options)
    await server.start()
    try:
        yield server, handler
    finally:
        handler.release.set()
        await server.stop(grace_s=1)


async def read_until_closed(reader: asyncio.StreamReader, timeout: float = 3.0) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while True:
        chunk = await asyncio.wait_for(reader.read(65536), deadline - time.monotonic())
        if not chunk:
            return out
        out += chunk


async def read_until(reader: asyncio.StreamReader, marker: bytes, timeout: float = 3.0) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while marker not in out:
        chunk = await asyncio.wait_for(reader.read(65536), deadline - time.monotonic())
        if not chunk:
            break
        out += chunk
    return out


def error_of(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, orjson.loads(body)["error"]


async def keep_sending(writer: asyncio.StreamWriter, chunk: bytes, total: int) -> int:
    """Send up to `total` bytes of `chunk`s; stop quietly when the server cuts us off."""
    sent = 0
    with contextlib.suppress(ConnectionError):
        while sent < total:
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)
    return sent


async def health_within(port: int, seconds: float) -> bool:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        out = await read_until(reader, b"echo:", seconds)
    finally:
        writer.close()
    return out.startswith(b"HTTP/1.1 200")


# -- 1. the request head


async def test_an_unterminated_header_value_is_cut_at_the_head_limit() -> None:
    async with serving() as (server, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX: ")
        sending = asyncio.create_task(keep_sending(writer, b"a" * 65536, 64 * MIB))
        out = await read_until_closed(reader)
        assert await health_within(server.port, 1.0)
        sent = await asyncio.wait_for(sending, 5)
        writer.close()
        assert sent < 16 * MIB  # cut off early, not after the whole 64 MiB
        status, error = error_of(out)
        assert status == 431 and "header" in error["message"].lower()
        await asyncio.sleep(0.05)
        assert not server.connections


async def test_too_many_headers_is_a_431() -> None:
    async with serving() as (server, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        headers = b"".join(b"h%d: v\r\n" % i for i in range(500))
        writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        out = await read_until_closed(reader)
        writer.close()
    status, error = error_of(out)
    assert status == 431 and error["type"] == "invalid_request_error"


async def test_a_huge_declared_body_is_refused_at_once() -> None:
    async with serving() as (server, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10737418240\r\n\r\nabc")
        started = time.monotonic()
        out = await read_until_closed(reader, timeout=2.0)
        writer.close()
    assert time.monotonic() - started < 1.0
    status, error = error_of(out)
    assert status == 413 and "1024" in error["message"]


REQUEST_ID = re.compile(rb"x-request-id: [0-9a-f]{32}\r\n")


def without_request_ids(out: bytes) -> bytes:
    """The answers as written, less the X-Request-Id the server adds to each (tested in
    tests/router/test_http_server.py), so these tests compare the rest byte for byte."""
    return REQUEST_ID.sub(b"", out)


async def test_pipelined_bodies_are_bounded_by_bytes_not_by_count() -> None:
    limit = 256 * 1024
    async with serving(max_body=limit) as (server, handler):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        body = b"p" * (limit - 1000)
        one = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n" + one * 16)
        await asyncio.sleep(0.5)
        (conn,) = server.connections
        queued = sum(len(request.body) for request, *_ in conn.queue)
        assert queued <= 2 * limit, f"{queued} bytes queued behind a slow request"
        handler.release.set()
        out = await read_until(reader, b"echo:", 5)
        while out.count(b"HTTP/1.1 200") < 17:
            out += await asyncio.wait_for(reader.read(MIB), 5)
        writer.close()
    assert without_request_ids(out).startswith(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nslow")


async def test_connections_beyond_the_limit_are_refused_with_a_503() -> None:
    async with serving(max_connections=3) as (server, _):
        held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(3)]
        await asyncio.sleep(0.05)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        out = await read_until_closed(reader)
        writer.close()
        status, error = error_of(out)
        assert status == 503 and error["code"] == "too_many_connections"
        assert len(server.connections) == 3
        held[0][1].close()
        await asyncio.sleep(0.05)
        assert await health_within(server.port, 1.0)
        for _, held_writer in held[1:]:
            held_writer.close()


# -- 2. HEAD, 3. 100 Continue


async def test_head_answers_carry_headers_but_no_body() -> None:
    async with serving() as (server, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            b"HEAD /echo HTTP/1.1\r\nHost: x\r\n\r\nHEAD /stream HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        out = await read_until_closed(reader)
        writer.close()
    first, second, third = without_request_ids(out).split(b"HTTP/1.1 ")[1:]
    assert first == b"200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\n"
    assert second.endswith(b"transfer-encoding: chunked\r\n\r\n")
    assert third.endswith(b"\r\n\r\necho:")


async def test_100_continue_waits_for_the_previous_answer() -> None:
    async with serving() as (server, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            b"GET /later HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
        )
        out = await read_until(reader, b"100 Continue")
        writer.write(b"hi")
        out += await read_until(reader, b"echo:hi")
        writer.close()
    later = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nlater"
    assert without_request_ids(out).startswith(
        later + b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK"
    )


# -- 5. clients that stop reading


def small_receive_buffer_socket(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def test_a_client_that_stops_reading_holds_one_answer_not_all() -> None:
    async with serving() as (server, _):
        sock = small_receive_buffer_socket(server.port)
        sock.send(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n" * 16)
        await asyncio.sleep(0.5)
        (conn,) = server.connections
        buffered = conn.transport.get_write_buffer_size()
        sock.close()
    assert buffered <= 2 * MIB, f"{buffered} bytes buffered for a client that reads nothing"


async def test_a_client_that_stops_reading_is_cut_after_the_send_timeout() -> None:
    async with serving(send_timeout_s=0.3) as (server, handler):
        sock = small_receive_buffer_socket(server.port)
        sock.send(b"GET /flood HTTP/1.1\r\nHost: x\r\n\r\n")
        for _ in range(150):
            if handler.disconnects:
                break
            await asyncio.sleep(0.02)
        sock.close()
        assert handler.disconnects == 1
        assert not server.connections
