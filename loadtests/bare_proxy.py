"""The floor under the router's CPU figures: a proxy with nothing but HTTP in and out.

Same loop (uvloop), same parser (httptools) and the same upstream client (router.http.upstream,
callbacks and no task per request) as the router, but no auth, parsing of the body, policy,
metrics, timeouts or retries: requests go round-robin to the replicas and answers come back whole,
or chunk by chunk for streams. What the router spends above this is the price of its features;
this much is the price of Python and the sockets here.

    python loadtests/bare_proxy.py --port 8100 --replica http://127.0.0.1:8001 ...
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
from urllib.parse import urlsplit

import httptools
import uvloop

from router.http.upstream import HttpClient, UpstreamConnection


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
            return
        host, port = next(self.replicas)
        stream = b'"stream":true' in body
        self.client.send(
            host, port, False, b"replica", "POST", self.url.decode(), body, Answer(self), stream
        )

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


class Answer:
    """The upstream listener: passes the replica's answer to the client as it comes."""

    def __init__(self, proxy: BareProxy) -> None:
        self.proxy = proxy
        self.started = False

    def upstream_body(self, data: bytes) -> None:
        if not self.started:
            self.started = True
            self.proxy.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
            )
        self.proxy.write(b"%x\r\n%s\r\n" % (len(data), data))

    def upstream_done(self, conn: UpstreamConnection) -> None:
        if conn.streaming:
            if not self.started:
                self.upstream_body(b"")
            self.proxy.write(b"0\r\n\r\n")
            return
        payload = conn.body()
        kind = conn.header(b"content-type") or b"application/json"
        self.proxy.write(b"HTTP/1.1 %d OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s"
                         % (conn.status, kind, len(payload), payload))  # fmt: skip

    def upstream_failed(self, exc: OSError) -> None:
        self.proxy.write(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")


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
