"""OpenAI-style error bodies, shared by the router and the replica server so both speak alike.

No HTTP framework here: fleet.web_errors turns an APIError into a starlette Response.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

# nginx's "client closed request": recorded (never sent) when a client left before its answer
# ended; the router and the replica both count such requests under it.
CLIENT_GONE_STATUS = 499

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "timeout",
}


@dataclass
class APIError(Exception):
    """Raise anywhere in a handler; the app turns it into `{"error": {...}}` with `status`."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": self.type or _TYPES.get(self.status, "api_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def sse_frames(self) -> bytes:
        """An error after streaming began: one `data:` frame with the body, then `[DONE]`."""
        return b"data: " + orjson.dumps(self.body()) + b"\n\ndata: [DONE]\n\n"
