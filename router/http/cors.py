"""CORS on the router's own server (router.http.connection): preflights are answered there, and the
Access-Control headers join every answer to an allowed origin, proxied ones included. The rules
are starlette's CORSMiddleware's (what the replica runs), so a browser sees the same answers from
either; only a refused preflight differs, as an OpenAI-style error. With CORS off the server
holds no policy and does no CORS work at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from fleet.control.errors import APIError
from fleet.web_security import CORSSettings

if TYPE_CHECKING:
    from router.http.messages import Request

ALL_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
SAFELISTED_HEADERS = frozenset({"accept", "accept-language", "content-language", "content-type"})
MAX_AGE = b"600"
_ALLOW_ORIGIN = b"access-control-allow-origin"
_ALLOW_CREDENTIALS = (b"access-control-allow-credentials", b"true")
_PREFLIGHT_VARY = (
    b"vary",
    b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
)

Headers = list[tuple[bytes, bytes]]


def _header(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


class CorsPolicy:
    """Which origins may call, and the headers that tell their browsers so."""

    def __init__(self, settings: CORSSettings) -> None:
        self.any_origin = "*" in settings.origins
        self.origins = frozenset(origin.encode() for origin in settings.origins)
        methods = ALL_METHODS if "*" in settings.methods else settings.methods
        self.methods = frozenset(method.upper() for method in methods)
        self.any_header = "*" in settings.headers
        self.headers = SAFELISTED_HEADERS | {h.lower() for h in settings.headers}
        self.credentials = settings.credentials
        self.echo_origin = not self.any_origin or self.credentials  # never "*" with credentials
        self.preflight_base: Headers = [
            _PREFLIGHT_VARY,
            (b"access-control-allow-methods", ", ".join(sorted(self.methods)).encode()),
            (b"access-control-max-age", MAX_AGE),
        ]
        if not self.any_header:
            allowed = ", ".join(sorted(self.headers)).encode()
            self.preflight_base.append((b"access-control-allow-headers", allowed))
        if self.credentials:
            self.preflight_base.append(_ALLOW_CREDENTIALS)

    def allows(self, origin: bytes) -> bool:
        return self.any_origin or origin in self.origins

    def answer_headers(self, headers: Headers) -> Headers:
        """For an answer to a request from an allowed origin; none for any other request."""
        origin = _header(headers, b"origin")
        if origin is None or not self.allows(origin):
            return []
        if not self.echo_origin:
            return [(_ALLOW_ORIGIN, b"*")]
        out = [(_ALLOW_ORIGIN, origin), (b"vary", b"Origin")]
        if self.credentials:
            out.append(_ALLOW_CREDENTIALS)
        return out

    def preflight(self, request: Request) -> tuple[int, Headers, bytes] | None:
        """The answer to a CORS preflight (OPTIONS with Origin and Access-Control-Request-
        Method); None for any other request."""
        if request.method != "OPTIONS":
            return None
        origin = _header(request.headers, b"origin")
        method = _header(request.headers, b"access-control-request-method")
        if origin is None or method is None:
            return None
        wanted = _header(request.headers, b"access-control-request-headers")
        headers = list(self.preflight_base)
        failures = []
        if self.allows(origin):
            headers.append((_ALLOW_ORIGIN, origin if self.echo_origin else b"*"))
        else:
            failures.append("origin")
        if method.decode("latin-1").upper() not in self.methods:
            failures.append("method")
        if wanted is not None:
            if self.any_header:
                headers.append((b"access-control-allow-headers", wanted))
            elif not self._headers_allowed(wanted):
                failures.append("headers")
        if failures:
            err = APIError(400, f"Disallowed CORS {', '.join(failures)}.", code="cors_disallowed")
            headers.append((b"content-type", b"application/json"))
            return 400, headers, orjson.dumps(err.body())
        return 200, [*headers, (b"content-type", b"text/plain; charset=utf-8")], b"OK"

    def _headers_allowed(self, wanted: bytes) -> bool:
        names = wanted.decode("latin-1").lower().split(",")
        return all(name.strip() in self.headers for name in names if name.strip())
