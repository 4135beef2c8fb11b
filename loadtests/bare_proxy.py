"""The floor under the router's CPU figures: a proxy with nothing but HTTP in and out.

Same loop (uvloop), same parser (httptools) and the same upstream client (router.upstream_http)
as the router, but no auth, parsing of the body, policy, metrics, timeouts or retries: requests go
round-robin to the replicas and answers come back whole, or chunk by chunk for streams. What the
router spends above this is the price of its features; this much is the price of Python here.

    python loadtests/bare_proxy.py --port 8100 --replica http://127.0.0.1:8001 ...
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
from urllib.parse import urlsplit

import httptools
import uvloop

from router.upstream_http import HttpClient


class BareProxy(asyncio.Protocol):
    def __init__(self, client: HttpClient, replicas: itertools.cycle) -> None:
        self.client = client
        self.replicas = replicas
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []

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
            self.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        else:
            asyncio.get_running_loop().create_task(self.forward(self.url.decode(), body))

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def forward(self, path: str, body: bytes) -> None:
        host, port = next(self.replicas)
        conn = await self.client.request(host, port, False, b"replica", "POST", path, body)
        kind = conn.header(b"content-type") or b"application/json"
        if kind.startswith(b"text/event-stream"):
            self.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ntransfer-encoding: chunked\r\n\r\n" % kind
            )
            while chunk := await conn.readany():
                self.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.write(b"0\r\n\r\n")
        else:
            payload = await conn.read()
            self.write(b"HTTP/1.1 %d OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s"
                       % (conn.status, kind, len(payload), payload))  # fmt: skip
        conn.release()


async def serve(port: int, replicas: list[str]) -> None:
    client = HttpClient(5.0, [("Content-Type", "application/json")])
    targets = itertools.cycle(
        [(u.hostname or "127.0.0.1", u.port or 80) for u in map(urlsplit, replicas)]
    )
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: BareProxy(client, targets), "127.0.0.1", port, backlog=4096
    )
    await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--replica", action="append", required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.replica))


if __name__ == "__main__":
    main()
