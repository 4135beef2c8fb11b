"""`/dashboard`: the fleet page, its login, its JSON state and its two admin actions.

Routes (all on the router's Starlette side app; none touches the proxied data path):
  GET  /dashboard                          the page (without a session: 303 to the login form)
  GET  /dashboard/login, POST              the form that trades the admin key for a session cookie
  POST /dashboard/logout                   ends the session (clears the cookie)
  GET  /dashboard/state                    everything the page shows, as JSON (polled every second)
  POST /dashboard/replicas/{id}/drain      drain / undrain, as the admin API does
  POST /dashboard/replicas/{id}/undrain
  POST /dashboard/keys/{id}/revoke         revoke an API key (fleet key store only)
  GET  /dashboard/static/{name}            the page's script, styles and vendored uPlot

Every route but the login form and its stylesheet needs the admin key (session cookie or bearer);
actions also need the session's CSRF header (see session.py). Pages carry a strict CSP: scripts
and styles only from these files, nothing inline, no framing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fleet.control.errors import APIError
from router.dashboard.history import FleetHistory
from router.dashboard.session import Sessions
from router.dashboard.snapshot import (
    KeysView,
    events_view,
    replica_view,
    router_view,
    series_view,
)

if TYPE_CHECKING:
    from router.app import RouterApp
    from router.backends.backend import Replica

STATIC = Path(__file__).with_name("static")
MAX_LOGIN_BODY = 4096
LOGIN_ERROR_MARK = b'<p id="login-error" class="error" hidden>'
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
}


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: str
    public: bool  # served before login (the login form's own stylesheet)


def load_static() -> dict[str, StaticFile]:
    """Every file the page may fetch, read once; any other name is a 404."""
    public = {"login.css"}
    return {
        path.name: StaticFile(path.read_bytes(), CONTENT_TYPES[path.suffix], path.name in public)
        for path in sorted(STATIC.iterdir())
        if path.suffix in CONTENT_TYPES and path.suffix != ".html"
    }


class Dashboard:
    def __init__(self, app: RouterApp) -> None:
        self.app = app
        self.sessions = Sessions(app.config.admin_key)
        self.history = FleetHistory(app.pool, app.metrics)
        self.keys = KeysView(app.key_store, len(app.config.api_keys))
        self.files = load_static()
        self.page_html = (STATIC / "dashboard.html").read_bytes()
        self.login_html = (STATIC / "login.html").read_bytes()

    def start(self) -> None:
        self.history.start()

    async def stop(self) -> None:
        await self.history.stop()

    def routes(self) -> list[Route]:
        return [
            Route("/dashboard", self.page),
            Route("/dashboard/login", self.login_form),
            Route("/dashboard/login", self.login, methods=["POST"]),
            Route("/dashboard/logout", self.logout, methods=["POST"]),
            Route("/dashboard/state", self.state),
            Route("/dashboard/replicas/{replica_id}/drain", self.drain, methods=["POST"]),
            Route("/dashboard/replicas/{replica_id}/undrain", self.undrain, methods=["POST"]),
            Route("/dashboard/keys/{key_id}/revoke", self.revoke, methods=["POST"]),
            Route("/dashboard/static/{name}", self.static),
        ]

    # -- pages

    async def page(self, request: Request) -> Response:
        try:
            self.sessions.caller(request)
        except APIError as err:
            if err.status != 401:
                raise
            return _secure(Response(status_code=303, headers={"Location": "/dashboard/login"}))
        return _html(self.page_html)

    async def login_form(self, request: Request) -> Response:
        self._require_admin_key()
        return _html(self.login_html)

    async def login(self, request: Request) -> Response:
        """The admin key from the form (never from the URL), traded for a session cookie."""
        self._require_admin_key()
        body = await request.body()
        form = parse_qs(body[:MAX_LOGIN_BODY].decode("utf-8", "replace"), max_num_fields=4)
        presented = (form.get("key") or [""])[0].strip()
        if len(body) > MAX_LOGIN_BODY or not self.sessions.check_key(presented):
            shown = self.login_html.replace(LOGIN_ERROR_MARK, LOGIN_ERROR_MARK[:-8] + b">")
            return _html(shown, status=401)
        cookie = self.sessions.cookie_header(
            self.sessions.new_session(), secure=request.url.scheme == "https"
        )
        self.history.record("login", "dashboard", "an admin signed in to the dashboard")
        headers = {"Location": "/dashboard", "Set-Cookie": cookie}
        return _secure(Response(status_code=303, headers=headers))

    async def logout(self, request: Request) -> Response:
        self.sessions.check_action(request)
        cookie = self.sessions.cookie_header("", secure=request.url.scheme == "https", max_age=0)
        return _secure(Response(status_code=204, headers={"Set-Cookie": cookie}))

    async def static(self, request: Request) -> Response:
        file = self.files.get(request.path_params["name"])
        if file is None:
            raise APIError(404, f"Not found. (GET {request.url.path})")
        if not file.public:
            self.sessions.caller(request)
        return _secure(Response(file.body, media_type=file.content_type))

    # -- data

    async def state(self, request: Request) -> Response:
        caller = self.sessions.caller(request)
        now = time.monotonic()
        replicas = sorted(self.app.pool.replicas.values(), key=lambda r: (r.model or "", r.id))
        body = {
            "now": time.time(),
            "router": router_view(self.app, self.history),
            "replicas": [replica_view(r, self.history, now) for r in replicas],
            "keys": await self.keys.view(),
            "events": events_view(self.history),
            "series": series_view(self.history),
            "csrf": self.sessions.csrf_token(caller.session) if caller.session else None,
        }
        return _json(body)

    # -- actions

    async def drain(self, request: Request) -> Response:
        return await self._set_drained(request, True)

    async def undrain(self, request: Request) -> Response:
        return await self._set_drained(request, False)

    async def _set_drained(self, request: Request, drained: bool) -> Response:
        self.sessions.check_action(request)
        replica = self._replica(request.path_params["replica_id"])
        scope = await self.app.pool.set_drained(replica, drained)
        verb = "drain" if drained else "undrain"
        self.history.record(
            "admin", replica.id, f"{verb} of {replica.id} from the dashboard ({scope})"
        )
        view = replica_view(replica, self.history, time.monotonic())
        return _json({**view, "scope": scope})

    async def revoke(self, request: Request) -> Response:
        self.sessions.check_action(request)
        store = self.app.key_store
        if store is None:
            raise APIError(
                404, "This router has no key store: its keys are fixed.", code="key_not_found"
            )
        record = await store.admin.revoke(request.path_params["key_id"])
        self.keys.forget()
        self.history.record("admin", record.id, f"key '{record.name}' revoked from the dashboard")
        return _json(record.public())

    def _replica(self, replica_id: str) -> Replica:
        replica = self.app.pool.replicas.get(replica_id)
        if replica is None:
            raise APIError(
                404, f"No replica with id '{replica_id:.100}'.", code="replica_not_found"
            )
        return replica

    def _require_admin_key(self) -> None:
        if not self.sessions.admin_key:
            raise APIError(
                403, "The dashboard is disabled: no admin key is set.", code="admin_disabled"
            )


def _secure(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response


def _html(body: bytes, status: int = 200) -> Response:
    return _secure(Response(body, status_code=status, media_type="text/html; charset=utf-8"))


def _json(data: object) -> Response:
    return _secure(Response(orjson.dumps(data), media_type="application/json"))
