"""A lean HTTP/1.1 client for the data path: keep-alive connections to replicas, one request at a
time per connection, responses parsed by httptools (llhttp, the parser uvicorn uses).

Why not aiohttp: per request, aiohttp builds request and response objects, header multidicts, a
cookie-jar lookup, payload and writer objects and timer contexts; the router needs none of it. This
client writes the request head and body in one `send`, hands body bytes through as they arrive
(chunked encoding already decoded), and reuses each connection object for the next request.
Timeouts are the caller's business (router.flight): nothing here arms a timer per request.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable

import httptools

READ_HIGH_WATER = 1 << 20


class UpstreamConnectionError(ConnectionError):
    """The connection failed or closed before the response was complete."""


class Connection(asyncio.Protocol):
    """One keep-alive connection, and the response currently arriving on it."""

    def __init__(self, pool: HostPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.complete = False
        self.keep_alive = True
        self.closed = False
        self.paused = False
        self.high_water = READ_HIGH_WATER
        self.received_any = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future | None = None
        self.headers_done = False

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamConnectionError(f"unreadable response: {exc}"))
            self.abort()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        if not self.complete:
            self._fail(
                UpstreamConnectionError(f"connection closed by the replica ({exc or 'EOF'})")
            )
        self.pool.forget(self)

    # -- httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > self.high_water and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    # -- the response API

    async def _wait(self) -> None:
        if self.error is not None:
            raise self.error
        self.waiter = self.pool.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    async def start(self, request: bytes) -> None:
        """Send the whole request, then wait for the response head."""
        assert self.transport is not None
        self.transport.write(request)
        while not self.headers_done:
            await self._wait()

    def header(self, name: bytes) -> bytes | None:
        """A response header by its lower-case name."""
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    async def readany(self) -> bytes:
        """Whatever body bytes have arrived (waiting for some); b"" once the body is complete."""
        while not self.chunks:
            if self.complete:
                return b""
            await self._wait()
        chunks = self.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    async def read(self) -> bytes:
        """The whole body (buffered without limit: the caller asked for all of it)."""
        self.high_water = float("inf")  # type: ignore[assignment]
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        while not self.complete:
            await self._wait()
        data = b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        return data

    def is_eof(self) -> bool:
        return self.complete and not self.chunks

    def release(self) -> None:
        """Back to the pool when the response was read to its end on a live keep-alive connection;
        otherwise closed, which is also how an unfinished upstream request is aborted."""
        if self.complete and self.keep_alive and not self.closed and self.error is None:
            self._reset()
            self.pool.put(self)
        else:
            self.abort()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()

    def _reset(self) -> None:
        self.status = 0
        self.headers = []
        self.chunks.clear()
        self.buffered = 0
        self.complete = False
        self.headers_done = False
        self.received_any = False
        self.high_water = READ_HIGH_WATER


class HostPool:
    """Idle connections to one replica (host, port)."""

    def __init__(
        self,
        host: str,
        port: int,
        tls: ssl.SSLContext | None,
        loop: asyncio.AbstractEventLoop,
        max_idle: int,
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.loop = loop
        self.max_idle = max_idle
        self.idle: list[Connection] = []

    def put(self, conn: Connection) -> None:
        if len(self.idle) < self.max_idle:
            self.idle.append(conn)
        else:
            conn.abort()

    def forget(self, conn: Connection) -> None:
        if conn in self.idle:
            self.idle.remove(conn)

    async def connect(self, timeout: float) -> Connection:
        connecting = self.loop.create_connection(
            lambda: Connection(self), self.host, self.port, ssl=self.tls
        )
        try:
            _, conn = await asyncio.wait_for(connecting, timeout)
        except asyncio.TimeoutError:
            raise UpstreamConnectionError(f"no connection within {timeout:g} s") from None
        return conn

    def close(self) -> None:
        for conn in self.idle:
            conn.abort()
        self.idle.clear()


class HttpClient:
    """Connection pools per replica and the request head builder."""

    def __init__(
        self,
        connect_timeout_s: float,
        headers: Iterable[tuple[str, str]] = (),
        max_idle_per_host: int = 512,
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.max_idle_per_host = max_idle_per_host
        self.extra = b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in headers)
        self.pools: dict[tuple[str, int, bool], HostPool] = {}
        self._tls: ssl.SSLContext | None = None

    def _pool(self, host: str, port: int, tls: bool) -> HostPool:
        pool = self.pools.get((host, port, tls))
        if pool is None:
            if tls and self._tls is None:
                self._tls = ssl.create_default_context()
            pool = self.pools[(host, port, tls)] = HostPool(
                host, port, self._tls if tls else None, asyncio.get_running_loop(),
                self.max_idle_per_host,
            )  # fmt: skip
        return pool

    async def request(
        self,
        host: str,
        port: int,
        tls: bool,
        host_header: bytes,
        method: str,
        target: str,
        body: bytes,
    ) -> Connection:
        """Send one request; returns the connection once the response head has arrived.

        A failure on a reused connection before any response byte is most often the replica
        having closed it while idle: that request is sent once more on a fresh connection.
        """
        pool = self._pool(host, port, tls)
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\n%sContent-Length: %d\r\n\r\n" % (
            method.encode(), target.encode("latin-1"), host_header, self.extra, len(body),
        )  # fmt: skip
        request = head + body if body else head
        idle = pool.idle
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            try:
                await conn.start(request)
                return conn
            except UpstreamConnectionError:
                conn.abort()
                if conn.received_any:
                    raise
            except BaseException:
                conn.abort()
                raise
        conn = await pool.connect(self.connect_timeout_s)
        try:
            await conn.start(request)
        except BaseException:
            conn.abort()
            raise
        return conn

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()
