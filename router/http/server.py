"""The router's HTTP/1.1 server: an asyncio protocol over httptools (llhttp) on uvloop.

Why not uvicorn: per request, an ASGI server builds a scope dict, a request-response cycle object,
`receive`/`send` message dicts and a flow-control gate; on the proxy's data path that cost more CPU
than the router's own work (measured: ~200 µs per proxied request under uvicorn, ~85 µs for a bare
protocol proxy). Here a request is parsed whole (the router needs the body before it can route),
handed to the handler as one `Request` (router.http.messages), and answered through its
`ClientConnection` (router.http.connection, which lists the response API). A handler either
answers later from callbacks (it returns None: the proxy's data path, which spends no task or
future per request) or returns an awaitable, which is run as a task (everything that waits on
Redis or on starlette).

Everything else (the starlette app for /health, /metrics, /v1/models, /admin) is reached through
`asgi_bridge` (router.http.asgi). Keep-alive, pipelined requests (answered in order), `Expect:
100-continue`, HEAD (the head of the answer, never its body), malformed requests (400), idle
connection reaping, graceful shutdown, TLS (an `ssl.SSLContext`) and CORS (router.http.cors) are
here (the per-connection parts in router.http.connection), and so are the limits that keep one
client from taking the router's memory:

- the request head: counted as it arrives, so a head that never ends is cut at MAX_HEAD_BYTES
  (431), as is one with more than MAX_HEADERS headers;
- the body: a declared Content-Length over the limit is a 413 at once; a chunked body is counted;
- pipelined requests waiting behind the one being served: reading pauses once their bodies pass
  the body limit (or MAX_PIPELINED of them wait), and the next one is not served while the client
  has not read the previous answer (the write buffer pauses past WRITE_BUFFER_HIGH);
- a client that reads nothing for `send_timeout_s` while an answer waits for it is disconnected
  (nginx's `send_timeout`), which also ends its request upstream (`on_disconnect`);
- connections beyond `max_connections` get a 503 and are closed before anything is read.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import cast

from fleet.control.errors import APIError
from router.http.connection import ClientConnection
from router.http.cors import CorsPolicy
from router.http.messages import Handler, error_bytes

log = logging.getLogger("router.http")

MAX_CONNECTIONS = 10_000

_TOO_MANY_CONNECTIONS = error_bytes(
    APIError(
        503,
        "The router has too many open connections; retry shortly.",
        code="too_many_connections",
        headers={"Retry-After": "1"},
    )
)


class _Refused(asyncio.Protocol):
    """A connection over the limit: a prepared 503, then closed, nothing read or parsed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = cast(asyncio.Transport, transport)  # a stream server's
        stream.write(_TOO_MANY_CONNECTIONS)
        stream.close()


class HttpServer:
    """Listens, serves, reaps idle keep-alive connections and clients that stopped reading, and
    stops gracefully."""

    def __init__(
        self,
        handler: Handler,
        host: str,
        port: int,
        *,
        max_body_bytes: int,
        keep_alive_s: float = 60.0,
        send_timeout_s: float = 60.0,
        max_connections: int = MAX_CONNECTIONS,
        backlog: int = 4096,
        tls: ssl.SSLContext | None = None,
        cors: CorsPolicy | None = None,
        reuse_port: bool = False,
    ) -> None:
        """`reuse_port`: join the other listeners on the same port (SO_REUSEPORT), among which
        the kernel spreads new connections (`--workers`, router.workers)."""
        self.handler = handler
        self.host = host
        self.port = port
        self.max_body_bytes = max_body_bytes
        self.keep_alive_s = keep_alive_s
        self.send_timeout_s = send_timeout_s
        self.max_connections = max_connections
        self.backlog = backlog
        self.tls = tls
        self.cors = cors
        self.reuse_port = reuse_port
        self.accepted = 0  # connections taken, refused ones included (how evenly workers share)
        self.connections: set[ClientConnection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._server: asyncio.AbstractServer | None = None
        self._reaper: asyncio.Task[None] | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._server = await self.loop.create_server(
            self._protocol,
            self.host,
            self.port,
            backlog=self.backlog,
            ssl=self.tls,
            reuse_port=self.reuse_port or None,
        )
        if self.port == 0:
            self.port = self._server.sockets[0].getsockname()[1]
        self._reaper = self.loop.create_task(self._reap_idle())

    def _protocol(self) -> asyncio.Protocol:
        self.accepted += 1
        if len(self.connections) >= self.max_connections:
            return _Refused()
        return ClientConnection(self)

    async def stop(self, grace_s: float = 30.0) -> None:
        """Stop listening, close idle connections, let requests in flight finish (up to
        `grace_s`), then close the rest."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        if self._reaper is not None:
            self._reaper.cancel()
        deadline = time.monotonic() + grace_s
        while True:
            for conn in list(self.connections):
                if not conn.active:
                    conn.close()
            if not self.connections or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.close()

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(min(self.keep_alive_s / 4, self.send_timeout_s / 4, 5.0))
            now = time.monotonic()
            idle_cutoff = now - self.keep_alive_s
            send_cutoff = now - self.send_timeout_s
            for conn in list(self.connections):
                if conn.writing_paused and conn.paused_since < send_cutoff:
                    conn.abort()  # the client read nothing for send_timeout_s
                elif not conn.active and conn.idle_since < idle_cutoff:
                    conn.close()


async def run_until_signalled(
    server: HttpServer,
    startup: Callable[[], Awaitable[None]],
    shutdown: Callable[[], Awaitable[None]],
    grace_s: float = 30.0,
    listening: Callable[[], None] = lambda: None,
) -> None:
    """Start the app and the server, serve until SIGTERM or SIGINT, then stop both gracefully;
    `listening` hears that the server took its port (a worker tells its parent)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await startup()
    try:
        await server.start()
        log.info("listening on %s://%s:%d", server.scheme, server.host, server.port)
        listening()
        await stop.wait()
        log.info("shutting down: finishing requests in flight (up to %g s)", grace_s)
        await server.stop(grace_s)
    finally:
        await shutdown()
