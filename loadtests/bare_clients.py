"""The upstream clients bare_proxy.py can forward with: the router's own (router.http.upstream), and
aiohttp's and httpx's for comparison.

Each forwards one request and hands the answer to a `Reply` as it comes (a stream chunk by chunk,
anything else whole). `CallbackClient` is how the router uses its client: no task, coroutine or
future per request, the answer delivered by callbacks. `AwaitedOwnClient` is the same client
awaited from a task per request (what an ASGI server or an `async def` handler needs), so the two
rows side by side show what the callbacks save, and its rows next to aiohttp's and httpx's show
what the client itself saves.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

from router.http.upstream import HttpClient, UpstreamConnection

JSON = {"Content-Type": "application/json"}
CONNECT_TIMEOUT_S = 5.0
CLIENTS = ("own", "aiohttp", "httpx")


class Reply(Protocol):
    """Where a forwarded request's answer goes (the bare proxy's client connection)."""

    async def whole(self, status: int, content_type: bytes, body: bytes) -> None: ...
    async def start_stream(self) -> None: ...
    async def chunk(self, data: bytes) -> None: ...
    async def end_stream(self) -> None: ...
    async def failed(self) -> None: ...


class CallbackReply(Protocol):
    """The callback form of `Reply`, for `CallbackClient`."""

    def whole(self, status: int, content_type: bytes, body: bytes) -> None: ...
    def start_stream(self) -> None: ...
    def chunk(self, data: bytes) -> None: ...
    def end_stream(self) -> None: ...
    def failed(self) -> None: ...


class Upstream(Protocol):
    """An awaited client: `forward` returns once the whole answer went to `reply`."""

    async def start(self) -> None: ...
    async def forward(
        self, host: str, port: int, path: str, body: bytes, stream: bool, reply: Reply
    ) -> None: ...


class _Relay:
    """A router.http.upstream listener that passes the answer to callbacks as it comes."""

    def __init__(self, reply: CallbackReply) -> None:
        self.reply = reply
        self.started = False

    def upstream_body(self, data: bytes) -> None:
        if not self.started:
            self.started = True
            self.reply.start_stream()
        self.reply.chunk(data)

    def upstream_done(self, conn: UpstreamConnection) -> None:
        if conn.streaming:
            if not self.started:
                self.reply.start_stream()
            self.reply.end_stream()
            return
        kind = conn.header(b"content-type") or b"application/json"
        self.reply.whole(conn.status, kind, conn.body())

    def upstream_failed(self, exc: OSError) -> None:
        self.reply.failed()


class CallbackClient:
    """The router's way: the request goes out now, the answer comes back by callbacks."""

    def __init__(self) -> None:
        self.client = HttpClient(CONNECT_TIMEOUT_S, JSON.items())

    def send(
        self, host: str, port: int, path: str, body: bytes, stream: bool, reply: CallbackReply
    ) -> None:
        self.client.send(host, port, False, b"replica", "POST", path, body, _Relay(reply), stream)


@dataclass
class _Whole:
    status: int
    content_type: bytes
    body: bytes


class _Queued:
    """A router.http.upstream listener that queues the answer for a coroutine (read at once: the
    connection goes back to its pool as `upstream_done` returns)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | _Whole | OSError | None] = asyncio.Queue()

    def upstream_body(self, data: bytes) -> None:
        self.queue.put_nowait(data)

    def upstream_done(self, conn: UpstreamConnection) -> None:
        if conn.streaming:
            self.queue.put_nowait(None)
        else:
            kind = conn.header(b"content-type") or b"application/json"
            self.queue.put_nowait(_Whole(conn.status, kind, conn.body()))

    def upstream_failed(self, exc: OSError) -> None:
        self.queue.put_nowait(exc)


class AwaitedOwnClient:
    """The router's client awaited from a coroutine, chunks through a queue."""

    def __init__(self) -> None:
        self.client = HttpClient(CONNECT_TIMEOUT_S, JSON.items())

    async def start(self) -> None:
        return None

    async def forward(
        self, host: str, port: int, path: str, body: bytes, stream: bool, reply: Reply
    ) -> None:
        queued = _Queued()
        self.client.send(host, port, False, b"replica", "POST", path, body, queued, stream)
        started = False
        while True:
            item = await queued.queue.get()
            if isinstance(item, bytes):
                if not started:
                    started = True
                    await reply.start_stream()
                await reply.chunk(item)
            elif isinstance(item, _Whole):
                await reply.whole(item.status, item.content_type, item.body)
                return
            elif isinstance(item, OSError):
                await reply.failed()
                return
            else:
                if not started:
                    await reply.start_stream()
                await reply.end_stream()
                return


class AiohttpClient:
    """aiohttp's client session, one keep-alive pool without a connection limit."""

    def __init__(self) -> None:
        self.session = None

    async def start(self) -> None:
        import aiohttp

        self.errors = (aiohttp.ClientError, OSError, asyncio.TimeoutError)
        timeout = aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT_S)
        connector = aiohttp.TCPConnector(limit=0)
        self.session = aiohttp.ClientSession(connector=connector, timeout=timeout)

    async def forward(
        self, host: str, port: int, path: str, body: bytes, stream: bool, reply: Reply
    ) -> None:
        assert self.session is not None
        try:
            async with self.session.post(
                f"http://{host}:{port}{path}", data=body, headers=JSON
            ) as response:
                if stream and response.status == 200:
                    await reply.start_stream()
                    async for data in response.content.iter_any():
                        await reply.chunk(data)
                    await reply.end_stream()
                    return
                kind = response.headers.get("content-type", "application/json").encode()
                await reply.whole(response.status, kind, await response.read())
        except self.errors:
            await reply.failed()


class HttpxClient:
    """httpx's async client, one keep-alive pool without a connection limit."""

    def __init__(self) -> None:
        self.client = None

    async def start(self) -> None:
        import httpx

        self.errors = (httpx.HTTPError, OSError)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        timeout = httpx.Timeout(None, connect=CONNECT_TIMEOUT_S)
        self.client = httpx.AsyncClient(limits=limits, timeout=timeout)

    async def forward(
        self, host: str, port: int, path: str, body: bytes, stream: bool, reply: Reply
    ) -> None:
        assert self.client is not None
        url = f"http://{host}:{port}{path}"
        try:
            async with self.client.stream("POST", url, content=body, headers=JSON) as response:
                if stream and response.status_code == 200:
                    await reply.start_stream()
                    async for data in response.aiter_raw():
                        await reply.chunk(data)
                    await reply.end_stream()
                    return
                kind = response.headers.get("content-type", "application/json").encode()
                await reply.whole(response.status_code, kind, await response.aread())
        except self.errors:
            await reply.failed()


def awaited_client(name: str) -> Upstream:
    """The awaited client called `name` (one of CLIENTS)."""
    factories = {"own": AwaitedOwnClient, "aiohttp": AiohttpClient, "httpx": HttpxClient}
    return factories[name]()
