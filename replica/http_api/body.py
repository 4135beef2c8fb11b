"""Small request/response helpers every route uses."""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson
from starlette.requests import Request
from starlette.responses import Response

from fleet.control.errors import APIError

if TYPE_CHECKING:
    from replica.http_api.runtime import ReplicaRuntime


def runtime_of(request: Request) -> ReplicaRuntime:
    return request.app.state.runtime


def json_response(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


async def read_body(request: Request) -> bytes:
    """The whole body, refusing (413) anything over the configured limit before buffering it."""
    limit = runtime_of(request).settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body is larger than the limit of {limit} bytes")
