"""Run the router under uvicorn: uvloop, httptools, no access log, and two changes to how client
sockets are written:

- TCP_NODELAY on every client socket (an SSE proxy without it can stall reused connections by
  ~40 ms: Nagle's algorithm meeting delayed ACKs);
- a response's head waits for its first body bytes and both go out in one `send` (uvicorn writes
  them separately; on loopback each syscall costs more than the router's own work);
- a dropped connection is reported to its request through a scope hook (router.flight), saving
  a watcher task per request.
"""

from __future__ import annotations

import asyncio
import socket

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from router.app import RouterApp
from router.config import RouterConfig
from router.flight import DISCONNECT_HOOK


class CorkedTransport:
    """Holds a response's first write (its head) until the next write or the end of the loop
    iteration, so head and body leave in one `send`; later writes (stream chunks) go straight out."""

    __slots__ = ("_buffer", "_hold", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._buffer: list[bytes] = []
        self._hold = False

    def hold_next(self) -> None:
        self._hold = True

    def write(self, data: bytes) -> None:
        if self._buffer:
            self._buffer.append(data)
            self.flush()
        elif self._hold:
            self._hold = False
            self._buffer.append(data)
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        if self._buffer:
            data = b"".join(self._buffer)
            self._buffer.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


class RouterHttpProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._corked = CorkedTransport(transport, asyncio.get_running_loop())
        super().connection_made(self._corked)  # type: ignore[arg-type]

    def on_headers_complete(self) -> None:
        self.scope[DISCONNECT_HOOK] = None
        super().on_headers_complete()
        self._corked.hold_next()

    def connection_lost(self, exc: Exception | None) -> None:
        """Tell the request in progress at once (no watcher task per request needed)."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            hook = cycle.scope.get(DISCONNECT_HOOK)
            if hook is not None:
                hook()
        super().connection_lost(exc)


def uvicorn_config(app: RouterApp, config: RouterConfig, log_level: str = "info") -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        loop="uvloop",
        http=RouterHttpProtocol,
        lifespan="on",
        access_log=False,
        proxy_headers=False,
        server_header=False,
        date_header=False,
        log_level=log_level,
        timeout_keep_alive=60,
        timeout_graceful_shutdown=30,
        backlog=4096,
    )


def serve(config: RouterConfig, log_level: str = "info") -> None:
    uvicorn.Server(uvicorn_config(RouterApp(config), config, log_level)).run()
