"""The floor under the router's CPU figures: a proxy with nothing but HTTP in and out.

Requests go round-robin to the replicas and answers come back whole, or chunk by chunk for
streams: no auth, parsing of the body, policy, metrics, timeouts or retries. What the router
spends above this is the price of its features; this much is the price of Python and the sockets.

By default it runs as the router does: the same loop (uvloop), parser (httptools) and upstream
client (router.http.upstream, callbacks and no task per request). The variants are what the
router chose against, to re-measure the choice (README, "Why our own HTTP server and clients"):

- `--server uvicorn`: a minimal ASGI app on uvicorn (same loop and parser) instead of our
  protocol;
- `--client aiohttp|httpx`: their async clients instead of ours (a task per request);
- `--task-per-request`: our server and client, but each request awaited in a task.

    python loadtests/bare_proxy.py --port 8100 --replica http://127.0.0.1:8001 ...
    python loadtests/bare_proxy.py --server uvicorn --client httpx --port 8100 --replica ...
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httptools
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bare_clients import CLIENTS, CallbackClient, Upstream, awaited_client

Targets = Iterator[tuple[str, int]]
OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)
BAD_GATEWAY = b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n"


# ----------------------------------------------------------------------------- our server


class BareProxy(asyncio.Protocol):
    """One client connection on httptools; each request forwarded by callbacks or in a task."""

    def __init__(
        self, replicas: Targets, callbacks: CallbackClient | None, awaited: Upstream | None
    ) -> None:
        self.replicas = replicas
        self.callbacks = callbacks
        self.awaited = awaited
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.tasks: set[asyncio.Task] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body, self.body = b"".join(self.body), []
        if self.url == b"/health":
            self.write(OK)
            return
        host, port = next(self.replicas)
        stream = b'"stream":true' in body
        if self.callbacks is not None:
            self.callbacks.send(host, port, self.url.decode(), body, stream, WriteNow(self))
        else:
            assert self.awaited is not None
            forward = self.awaited.forward(host, port, self.url.decode(), body, stream, Write(self))
            task = asyncio.get_running_loop().create_task(forward)
            self.tasks.add(task)  # the loop holds tasks weakly
            task.add_done_callback(self.tasks.discard)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


class WriteNow:
    """The answer written to the client connection from callbacks."""

    def __init__(self, proxy: BareProxy) -> None:
        self.proxy = proxy

    def whole(self, status: int, content_type: bytes, body: bytes) -> None:
        self.proxy.write(b"HTTP/1.1 %d OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s"
                         % (status, content_type, len(body), body))  # fmt: skip

    def start_stream(self) -> None:
        self.proxy.write(STREAM_HEAD)

    def chunk(self, data: bytes) -> None:
        self.proxy.write(b"%x\r\n%s\r\n" % (len(data), data))

    def end_stream(self) -> None:
        self.proxy.write(b"0\r\n\r\n")

    def failed(self) -> None:
        self.proxy.write(BAD_GATEWAY)


class Write:
    """The same writes, awaited by a client's coroutine."""

    def __init__(self, proxy: BareProxy) -> None:
        self.now = WriteNow(proxy)

    async def whole(self, status: int, content_type: bytes, body: bytes) -> None:
        self.now.whole(status, content_type, body)

    async def start_stream(self) -> None:
        self.now.start_stream()

    async def chunk(self, data: bytes) -> None:
        self.now.chunk(data)

    async def end_stream(self) -> None:
        self.now.end_stream()

    async def failed(self) -> None:
        self.now.failed()


async def serve_own(port: int, replicas: Targets, client: str, task_per_request: bool) -> None:
    callbacks = CallbackClient() if client == "own" and not task_per_request else None
    awaited = None if callbacks is not None else awaited_client(client)
    if awaited is not None:
        await awaited.start()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: BareProxy(replicas, callbacks, awaited), "127.0.0.1", port, backlog=4096
    )
    await server.serve_forever()


# ----------------------------------------------------------------------------- uvicorn


class AsgiProxy:
    """The same proxy as a minimal ASGI app."""

    def __init__(self, replicas: Targets, client: Upstream) -> None:
        self.replicas = replicas
        self.client = client

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["path"] == "/health":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", b"2")]})  # fmt: skip
            await send({"type": "http.response.body", "body": b"ok"})
            return
        parts = []
        while True:
            message = await receive()
            parts.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(parts)
        host, port = next(self.replicas)
        stream = b'"stream":true' in body
        await self.client.forward(host, port, scope["path"], body, stream, AsgiWrite(send))


class AsgiWrite:
    """The answer as ASGI messages (uvicorn frames a body without a length as chunks)."""

    def __init__(self, send) -> None:
        self.send = send

    async def whole(self, status: int, content_type: bytes, body: bytes) -> None:
        headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})

    async def start_stream(self) -> None:
        headers = [(b"content-type", b"text/event-stream")]
        await self.send({"type": "http.response.start", "status": 200, "headers": headers})

    async def chunk(self, data: bytes) -> None:
        await self.send({"type": "http.response.body", "body": data, "more_body": True})

    async def end_stream(self) -> None:
        await self.send({"type": "http.response.body", "body": b""})

    async def failed(self) -> None:
        await self.whole(502, b"text/plain", b"")


async def serve_uvicorn(port: int, replicas: Targets, client: str) -> None:
    import uvicorn

    upstream = awaited_client(client)
    await upstream.start()
    config = uvicorn.Config(
        AsgiProxy(replicas, upstream), host="127.0.0.1", port=port, http="httptools",
        lifespan="off", log_level="warning", access_log=False, backlog=4096,
    )  # fmt: skip
    await uvicorn.Server(config).serve()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--replica", action="append", required=True)
    parser.add_argument("--server", choices=["own", "uvicorn"], default="own")
    parser.add_argument("--client", choices=CLIENTS, default="own")
    parser.add_argument(
        "--task-per-request",
        action="store_true",
        help="our server and client, each request awaited in a task (not by callbacks)",
    )
    args = parser.parse_args()
    replicas = itertools.cycle(
        [(u.hostname or "127.0.0.1", u.port or 80) for u in map(urlsplit, args.replica)]
    )
    if args.server == "uvicorn":
        uvloop.run(serve_uvicorn(args.port, replicas, args.client))
    else:
        uvloop.run(serve_own(args.port, replicas, args.client, args.task_per_request))


if __name__ == "__main__":
    main()
