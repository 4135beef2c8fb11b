"""Who may see the dashboard: the admin key, presented once on the login form and then carried by
a session cookie, or sent as `Authorization: Bearer` by scripts.

The cookie never holds the key itself: it is `<expiry>.<nonce>.<mac>`, a MAC under a secret
derived from the admin key, so it expires by itself, a stolen one is worth twelve hours at most,
and changing the admin key ends every session. Actions (drain, revoke) also need the session's
CSRF token in a header, which only a page of the same origin can read (from /dashboard/state):
SameSite=Strict already keeps the cookie off cross-site requests; the token is the second lock.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from starlette.requests import Request

from fleet.control.errors import APIError
from fleet.control.keys import bearer_token, is_admin_key, require_admin

COOKIE = "fleet_dashboard"
COOKIE_PATH = "/dashboard"
CSRF_HEADER = "x-csrf-token"
SESSION_S = 12 * 3600


@dataclass(frozen=True)
class Caller:
    """An authenticated dashboard caller; `session` is its cookie value (None for a bearer key)."""

    session: str | None


class Sessions:
    def __init__(self, admin_key: str | None) -> None:
        self.admin_key = admin_key
        seed = (admin_key or "").encode()
        self._secret = hashlib.sha256(b"fleetserve-dashboard-session\0" + seed).digest()

    def check_key(self, presented: str | None) -> bool:
        return is_admin_key(presented, self.admin_key)

    def new_session(self, now: float | None = None) -> str:
        expires = int((now or time.time()) + SESSION_S)
        body = f"{expires}.{secrets.token_urlsafe(12)}"
        return f"{body}.{self._mac('session', body)}"

    def valid_session(self, value: str | None, now: float | None = None) -> bool:
        if not value or not self.admin_key or value.count(".") != 2:
            return False
        body, _, mac = value.rpartition(".")
        if not _same(mac, self._mac("session", body)):
            return False
        expires = body.partition(".")[0]
        return expires.isdigit() and int(expires) > (now or time.time())

    def csrf_token(self, session: str) -> str:
        return self._mac("csrf", session)

    def caller(self, request: Request) -> Caller:
        """The caller, or APIError: 403 when no admin key is set, 401 without a valid credential."""
        session = request.cookies.get(COOKIE)
        if self.admin_key and self.valid_session(session):
            return Caller(session)
        require_admin(request.headers.get("authorization"), self.admin_key)
        return Caller(None)

    def check_action(self, request: Request) -> Caller:
        """An action's caller: the admin key as a bearer token, or a session that also sends
        its CSRF token."""
        if self.check_key(bearer_token(request.headers.get("authorization"))):
            return Caller(None)
        caller = self.caller(request)
        assert caller.session is not None  # caller() let no other credential through
        token = request.headers.get(CSRF_HEADER) or ""
        if not _same(token, self.csrf_token(caller.session)):
            raise APIError(
                403,
                f"Dashboard actions need the session's {CSRF_HEADER} header.",
                code="csrf_token_invalid",
            )
        return caller

    def cookie_header(self, value: str, *, secure: bool, max_age: int = SESSION_S) -> str:
        parts = [
            f"{COOKIE}={value}",
            f"Path={COOKIE_PATH}",
            f"Max-Age={max_age}",
            "HttpOnly",
            "SameSite=Strict",
        ]
        if secure:
            parts.append("Secure")
        return "; ".join(parts)

    def _mac(self, purpose: str, body: str) -> str:
        return hmac.new(self._secret, f"{purpose}:{body}".encode(), hashlib.sha256).hexdigest()


def _same(presented: str, expected: str) -> bool:
    """Constant-time equality that any presented text (non-ASCII included) may reach."""
    return hmac.compare_digest(presented.encode("utf-8", "replace"), expected.encode())
