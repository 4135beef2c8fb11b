"""A lean HTTP/1.1 client for the data path: keep-alive connections to replicas, one request at a
time per connection, responses parsed by httptools (llhttp, the parser uvicorn uses), and the
answer delivered by callbacks to a `Listener` (the router's Exchange).

Why callbacks, not `await`, aiohttp or httpx: README, "Why our own HTTP server and clients".
Timeouts are the caller's (router.backends.watchdog).

A request sent with `stream=True` whose answer is a 200 has its body passed on as it arrives
(`upstream_body`, once per read from the socket, so frames that arrived together leave together);
any other answer is collected whole. Then the listener hears
`upstream_done`, or `upstream_failed` once if the connection breaks first. After `upstream_done`
a keep-alive connection goes back to its pool by itself; a listener that walks away early calls
`abort`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Iterable
from typing import Protocol, cast

import httptools

log = logging.getLogger("router.upstream")


class UpstreamConnectionError(ConnectionError):
    """The connection failed or closed before the response was complete."""


class AnswerTooLarge(UpstreamConnectionError):
    """A whole (not streamed) answer outgrew the client's limit: the router holds whole answers
    in memory, so their size is bounded like a request body's."""


class Listener(Protocol):
    def upstream_body(self, data: bytes) -> None: ...
    def upstream_done(self, conn: UpstreamConnection) -> None: ...
    def upstream_failed(self, exc: OSError) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection, and the request currently on it."""

    def __init__(self, pool: HostPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.listener: Listener | None = None
        self.request = b""
        self.reused = False
        self.received_any = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.size = 0  # of a whole answer collected so far
        self.stream = False  # pass a 200's body on as it arrives
        self.streaming = False
        self.complete = False
        self.keep_alive = True
        self.closed = False

    def send(self, request: bytes, listener: Listener, stream: bool) -> None:
        """Write a request on this idle, connected connection."""
        assert self.transport is not None
        self.request = request
        self.listener = listener
        self.stream = stream
        self.reused = True
        self.transport.write(request)

    def header(self, name: bytes) -> bytes | None:
        """A response header by its lower-case name (most servers send them lower-case)."""
        for key, value in self.headers:
            if key == name or key.lower() == name:
                return value
        return None

    def body(self) -> bytes:
        """The collected body (not streaming), once `upstream_done` was called."""
        chunks = self.chunks
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def abort(self) -> None:
        """Stop listening and close the connection: how an unfinished request is cancelled."""
        self.listener = None
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # create_connection's: a stream's
        self.transport = transport
        if self.closed:  # aborted while connecting
            transport.abort()
        else:
            transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if exc.__cause__ is not None:
                log.error("upstream listener failed", exc_info=exc.__cause__)
            self._fail(UpstreamConnectionError(f"unreadable response: {exc}"))
            self.abort()
            return
        if self.size > self.pool.max_answer_bytes:
            limit = self.pool.max_answer_bytes
            self._fail(AnswerTooLarge(f"The replica's answer is larger than {limit} bytes."))
            self.abort()
        elif self.streaming and self.chunks:
            self._pass_on()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.listener is None or self.complete:
            return
        if self.reused and not self.received_any:
            # Most often the replica closed this idle keep-alive connection just as the request
            # went out: nothing was processed, so the request goes once more on a fresh one.
            self._renew()
            self.pool.open(self)
        else:
            self._fail(
                UpstreamConnectionError(f"connection closed by the replica ({exc or 'EOF'})")
            )

    # -- httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self.streaming = self.stream and status == 200

    def on_body(self, body: bytes) -> None:
        if not self.streaming:
            self.size += len(body)
            if self.size > self.pool.max_answer_bytes:
                self.chunks = []
                return
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        if self.size > self.pool.max_answer_bytes:
            return  # data_received fails it once the parser returns
        if self.streaming and self.chunks:
            self._pass_on()
        self.complete = True
        listener, self.listener = self.listener, None
        if listener is None:
            return
        listener.upstream_done(self)
        if self.keep_alive and not self.closed:
            self._reset()
            self.pool.put(self)
        else:
            self.abort()

    # -- state

    def _pass_on(self) -> None:
        chunks, self.chunks = self.chunks, []
        if self.listener is not None:
            self.listener.upstream_body(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _fail(self, exc: OSError) -> None:
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.upstream_failed(exc)

    def _reset(self) -> None:
        self.status = 0
        self.headers = []
        self.chunks = []
        self.size = 0
        self.streaming = False
        self.complete = False
        self.received_any = False

    def _renew(self) -> None:
        """Ready this object to carry its request again on a new transport."""
        self._reset()
        self.parser = httptools.HttpResponseParser(self)
        self.transport = None
        self.closed = False
        self.reused = False
        self.keep_alive = True


class HostPool:
    """Idle connections to one replica (host, port), and the connections being opened."""

    def __init__(
        self,
        host: str,
        port: int,
        tls: ssl.SSLContext | None,
        loop: asyncio.AbstractEventLoop,
        max_idle: int,
        connect_timeout_s: float,
        max_answer_bytes: int,
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.loop = loop
        self.max_idle = max_idle
        self.connect_timeout_s = connect_timeout_s
        self.max_answer_bytes = max_answer_bytes
        self.idle: list[UpstreamConnection] = []
        self.connecting: set[asyncio.Task[None]] = set()

    def put(self, conn: UpstreamConnection) -> None:
        if len(self.idle) < self.max_idle:
            self.idle.append(conn)
        else:
            conn.abort()

    def forget(self, conn: UpstreamConnection) -> None:
        if conn in self.idle:
            self.idle.remove(conn)

    def open(self, conn: UpstreamConnection) -> None:
        """Connect `conn` (it writes its request once connected); failures go to its listener."""
        task = self.loop.create_task(self._connect(conn))
        self.connecting.add(task)
        task.add_done_callback(self.connecting.discard)

    async def _connect(self, conn: UpstreamConnection) -> None:
        timeout = self.connect_timeout_s
        connecting = self.loop.create_connection(lambda: conn, self.host, self.port, ssl=self.tls)
        try:
            await asyncio.wait_for(connecting, timeout)
        except asyncio.TimeoutError:
            conn._fail(UpstreamConnectionError(f"no connection within {timeout:g} s"))
        except OSError as exc:
            conn._fail(exc)

    def close(self) -> None:
        for task in self.connecting:
            task.cancel()
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
        max_answer_bytes: int = 64 * 1024 * 1024,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.max_answer_bytes = max_answer_bytes
        self.max_idle_per_host = max_idle_per_host
        self.extra = b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in headers)
        self.pools: dict[tuple[str, int, bool], HostPool] = {}
        self._tls = tls  # for https:// replicas; None: the system's CAs

    def _pool(self, host: str, port: int, tls: bool) -> HostPool:
        pool = self.pools.get((host, port, tls))
        if pool is None:
            if tls and self._tls is None:
                self._tls = ssl.create_default_context()
            pool = self.pools[(host, port, tls)] = HostPool(
                host, port, self._tls if tls else None, asyncio.get_running_loop(),
                self.max_idle_per_host, self.connect_timeout_s, self.max_answer_bytes,
            )  # fmt: skip
        return pool

    def send(
        self,
        host: str,
        port: int,
        tls: bool,
        host_header: bytes,
        method: str,
        target: str,
        body: bytes,
        listener: Listener,
        stream: bool = False,
        headers: bytes = b"",
    ) -> UpstreamConnection:
        """Send one request; its answer goes to `listener`, never before this returns. The
        connection returned is the handle to abort the request with. `headers`: this request's
        own head lines, each ending in CRLF."""
        pool = self._pool(host, port, tls)
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\n%s%sContent-Length: %d\r\n\r\n" % (
            method.encode(), target.encode("latin-1"), host_header, self.extra, headers,
            len(body),
        )  # fmt: skip
        request = head + body if body else head
        idle = pool.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                conn.send(request, listener, stream)
                return conn
        conn = UpstreamConnection(pool)
        conn.request = request
        conn.listener = listener
        conn.stream = stream
        pool.open(conn)
        return conn

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()
