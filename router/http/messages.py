"""The two ends of an HTTP/1.1 exchange as the router's server handles them: the `Request` a
handler gets (parsed whole: the router needs the body before it can route), and the bytes of a
response head, built once per answer without an HTTP library's header objects.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING

import orjson

from fleet.control.errors import APIError
from fleet.request_id import new_request_id

if TYPE_CHECKING:
    from router.http.connection import ClientConnection

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


@dataclass(slots=True, eq=False)
class Request:
    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]  # names in lower case
    body: bytes
    request_id: bytes = field(default_factory=new_request_id)  # fleet.request_id


# What the server calls per request: answers through the connection, now or from callbacks
# (returns None), or in the awaitable it returns, which the server runs as a task; that one's
# answer is out when it is done, unless it returns True (it handed the answer to callbacks).
Handler = Callable[[Request, "ClientConnection"], Awaitable[bool | None] | None]


def response_head(status: int, headers: list[tuple[bytes, bytes]], framing: bytes) -> bytes:
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))]
    for name, value in headers:
        lines.append(b"%s: %s\r\n" % (name, value))
    lines.append(framing)
    return b"".join(lines)


def error_bytes(err: APIError) -> bytes:
    """A whole error response that closes the connection."""
    body = orjson.dumps(err.body())
    headers = [(b"content-type", b"application/json")]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    framing = b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
    return response_head(err.status, headers, framing) + body
