"""The bridge from the router's own HTTP server to an ASGI application: the router's Starlette
side app (router.side_app) for every route that is not proxied. Its answers are small, so each
is collected and sent whole.
"""

from __future__ import annotations

import asyncio
from urllib.parse import unquote

from starlette.types import ASGIApp, Message, Scope

from router.http.connection import ClientConnection
from router.http.messages import Request


async def asgi_bridge(app: ASGIApp, request: Request, conn: ClientConnection) -> None:
    """Serve `request` with an ASGI application (the router's starlette app for its local
    routes); the response is collected and sent whole."""
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": conn.server.scheme,
        "path": unquote(request.path),
        "raw_path": request.path.encode("latin-1"),
        "query_string": request.query,
        "root_path": "",
        "headers": request.headers,
        "client": conn.transport.get_extra_info("peername") if conn.transport else None,
        "server": (conn.server.host, conn.server.port),
    }
    delivered = False
    status = 500
    headers: list[tuple[bytes, bytes]] = []
    parts: list[bytes] = []

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        gone: asyncio.Future[None] = conn.loop.create_future()

        def disconnected() -> None:
            if not gone.done():
                gone.set_result(None)

        conn.on_disconnect = disconnected
        await gone
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status = message["status"]
            headers = [(k, v) for k, v in message.get("headers", []) if k != b"content-length"]
        elif message["type"] == "http.response.body":
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                conn.respond(status, headers, b"".join(parts))

    await app(scope, receive, send)
