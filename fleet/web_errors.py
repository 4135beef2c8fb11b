"""APIError as a starlette Response, for the starlette apps of the replica server and the router.

It lives outside fleet/control so the control plane speaks no HTTP framework: APIError there only
knows its status, headers and OpenAI-style body.
"""

from __future__ import annotations

import orjson
from starlette.responses import Response

from fleet.control.errors import APIError


def error_response(error: APIError) -> Response:
    return Response(
        orjson.dumps(error.body()),
        status_code=error.status,
        headers=error.headers,
        media_type="application/json",
    )
