"""The data path's HTTP client against small raw asyncio servers: keep-alive reuse, a connection the
server closed while idle, `Connection: close`, chunked bodies, large bodies with flow control,
broken responses, refused connections and aborted requests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from router.http.upstream import HttpClient, UpstreamConnection, UpstreamConnectionError


class Server:
    """Answers each request on a connection with `reply(n)` (n = requests so far on it)."""

    def __init__(self, reply: Callable[[int], bytes], close_after: int | None = None) -> None:
        self.reply = reply
        self.close_after = close_after
        self.connections = 0
        self.requests = 0
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                if length:
                    await reader.readexactly(length)
                served += 1
                self.requests += 1
                writer.write(self.reply(served))
                await writer.drain()
                if self.close_after is not None and served >= self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


class Collector:
    """A listener that gathers one answer: streamed piece by piece, or collected whole."""

    def __init__(self, stream: bool = False, slow: bool = False) -> None:
        self.stream = stream
        self.slow = slow  # pause reading after every piece, resume on the next loop turn
        self.status = 0
        self.content_type: bytes | None = None
        self.pieces: list[bytes] = []
        self.conn: UpstreamConnection | None = None
        self.outcome: asyncio.Future = asyncio.get_running_loop().create_future()

    def upstream_body(self, data: bytes) -> None:
        self.pieces.append(data)
        if self.slow and self.conn is not None:
            self.conn.pause_reading()
            asyncio.get_running_loop().call_soon(self.conn.resume_reading)

    def head(self, conn: UpstreamConnection | None) -> None:
        assert conn is not None
        self.status = conn.status
        self.content_type = conn.header(b"content-type")

    def upstream_done(self, conn: UpstreamConnection) -> None:
        self.head(conn)
        if not conn.streaming:
            self.pieces.append(conn.body())
        self.outcome.set_result(b"".join(self.pieces))

    def upstream_failed(self, exc: OSError) -> None:
        self.outcome.set_exception(exc)


@pytest.fixture
async def client() -> AsyncIterator[HttpClient]:
    http = HttpClient(2.0, [("Content-Type", "application/json")])
    yield http
    http.close()


def send(
    client: HttpClient,
    server: Server,
    listener: Collector,
    method: str = "POST",
    body: bytes = b"{}",
) -> UpstreamConnection:
    listener.conn = client.send(
        "127.0.0.1", server.port, False, b"x", method, "/p", body, listener, listener.stream
    )
    return listener.conn


async def call(client: HttpClient, server: Server, body: bytes = b"{}") -> tuple[int, bytes]:
    listener = Collector()
    send(client, server, listener, body=body)
    data = await listener.outcome
    return listener.status, data


async def test_keep_alive_connections_are_reused(client) -> None:
    async with Server(lambda n: ok(b"answer %d" % n)) as server:
        results = [await call(client, server) for _ in range(5)]
    assert results == [(200, b"answer %d" % n) for n in range(1, 6)]
    assert server.connections == 1


async def test_a_connection_closed_while_idle_is_replaced_transparently(client) -> None:
    async with Server(lambda n: ok(b"fine"), close_after=1) as server:
        first = await call(client, server)
        await asyncio.sleep(0.05)  # the server has closed it; the pool may not know yet
        second = await call(client, server)
    assert first == second == (200, b"fine")
    assert server.connections == 2


async def test_connection_close_responses_are_not_pooled(client) -> None:
    async with Server(lambda n: ok(b"bye", b"Connection: close\r\n"), close_after=1) as server:
        for _ in range(3):
            assert await call(client, server) == (200, b"bye")
    assert server.connections == 3
    assert all(not pool.idle for pool in client.pools.values())


async def test_chunked_body_arrives_piece_by_piece(client) -> None:
    chunks = [b"data: %d\n\n" % i for i in range(5)]
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    head = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n"
    )
    async with Server(lambda n: head + body) as server:
        listener = Collector(stream=True)
        send(client, server, listener, "GET", b"")
        received = await listener.outcome
    assert listener.content_type == b"text/event-stream"
    assert received == b"".join(chunks)
    assert len(listener.pieces) >= 1


async def test_large_bodies_pass_with_flow_control(client) -> None:
    big = bytes(range(256)) * 16384  # 4 MiB
    async with Server(lambda n: ok(big)) as server:
        listener = Collector(stream=True, slow=True)
        send(client, server, listener, "GET", b"")
        received = await listener.outcome
        assert await call(client, server) == (200, big)  # and the connection was reusable
    assert received == big
    assert len(listener.pieces) > 1
    assert server.connections == 1


async def test_a_response_cut_short_is_an_error(client) -> None:
    async with Server(
        lambda n: b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly a bit", close_after=1
    ) as server:
        with pytest.raises(UpstreamConnectionError):
            await call(client, server)


async def test_refused_connections_fail_with_oserror(client) -> None:
    async with Server(lambda n: ok(b"")) as server:
        port = server.port
    listener = Collector()
    client.send("127.0.0.1", port, False, b"x", "GET", "/", b"", listener)
    with pytest.raises(OSError):
        await listener.outcome


async def test_an_aborted_request_tells_its_listener_nothing(client) -> None:
    async with Server(lambda n: ok(b"late")) as server:
        listener = Collector()
        send(client, server, listener).abort()
        await asyncio.sleep(0.1)
        assert not listener.outcome.done()
        assert await call(client, server) == (200, b"late")  # a fresh connection serves on
    assert server.connections == 2
