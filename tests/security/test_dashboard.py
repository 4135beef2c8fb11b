"""Attacks on the fleet dashboard (router.dashboard) against a real router and fake replicas:
no credential, wrong or forged credentials, the key in a URL, actions without the CSRF header
(what a cross-site form could send), paths outside the allow-listed files, and the headers that
keep the page from being framed, sniffed or made to run inline script."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from router_harness import ADMIN, MODEL, FakeReplica, chat, fake_replicas, fresh, router_config
from router_harness import run_router as run_router_

from router.dashboard.session import COOKIE, Sessions

ADMIN_KEY = "admin-secret"  # router_config's admin key
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture(scope="module")
def fakes() -> Iterator[list[FakeReplica]]:
    with fake_replicas(2, "--model", MODEL, "--chunks", "4") as started:
        yield started


@pytest.fixture
def replicas(fakes: list[FakeReplica]) -> list[FakeReplica]:
    return fresh(fakes)


def run_router(replicas: list[FakeReplica], **kwargs):
    return run_router_(router_config(replicas, **kwargs.pop("config", {})), **kwargs)


async def login(client: httpx.AsyncClient, key: str = ADMIN_KEY) -> httpx.Response:
    return await client.post("/dashboard/login", content=f"key={key}", headers=FORM)


async def session_cookie(client: httpx.AsyncClient) -> str:
    response = await login(client)
    assert response.status_code == 303
    return response.cookies[COOKIE]


def with_cookie(value: str, **headers: str) -> dict[str, bytes]:
    """Headers as UTF-8 bytes, so tests may send what no browser would."""
    return {k: v.encode() for k, v in {"Cookie": f"{COOKIE}={value}", **headers}.items()}


async def test_without_a_credential_the_page_redirects_to_login_and_the_rest_is_401(
    replicas,
) -> None:
    async with run_router(replicas) as router:
        c = router.client
        page = await c.get("/dashboard")
        state = await c.get("/dashboard/state")
        script = await c.get("/dashboard/static/dashboard.js")
        drain = await c.post(f"/dashboard/replicas/{replicas[0].id}/drain")
        revoke = await c.post("/dashboard/keys/key_x/revoke")
        login_css = await c.get("/dashboard/static/login.css")
        form = await c.get("/dashboard/login")
    assert page.status_code == 303 and page.headers["location"] == "/dashboard/login"
    for response in (state, script, drain, revoke):
        assert response.status_code == 401, response.url
        assert response.json()["error"]["code"] == "invalid_admin_key"
    assert login_css.status_code == 200 and login_css.headers["content-type"].startswith("text/css")
    assert form.status_code == 200 and b'name="key"' in form.content
    assert not router.replica(replicas[0].id).admin_drained


async def test_a_wrong_key_gets_no_cookie_and_forged_or_expired_cookies_are_refused(
    replicas,
) -> None:
    sessions = Sessions(ADMIN_KEY)
    other = Sessions("another-admin-key")
    forged = [
        "x",
        "9999999999.nonce.deadbeef",
        other.new_session(),  # signed under another key
        sessions.new_session(now=time.time() - 13 * 3600),  # expired an hour ago
        sessions.new_session() + "0",
        "é.é.é",  # non-ASCII must be a 401, not a 500
    ]
    async with run_router(replicas) as router:
        c = router.client
        wrong = await login(c, "sk-wrong")
        empty = await c.post("/dashboard/login", content="", headers=FORM)
        huge = await c.post("/dashboard/login", content="key=" + "a" * 10_000, headers=FORM)
        refused = [await c.get("/dashboard/state", headers=with_cookie(v)) for v in forged]
        wrong_bearer = await c.get("/dashboard/state", headers={"Authorization": "Bearer nope"})
    for response in (wrong, empty, huge):
        assert response.status_code == 401
        assert "set-cookie" not in response.headers
        assert b"That is not the admin key." in response.content
        assert b'class="error" hidden' not in response.content
    assert [r.status_code for r in refused] == [401] * len(forged)
    assert wrong_bearer.status_code == 401


async def test_login_sets_a_strict_httponly_cookie_that_holds_no_key(replicas) -> None:
    async with run_router(replicas) as router:
        c = router.client
        response = await login(c)
        value = response.cookies[COOKIE]
        state = await c.get("/dashboard/state", headers=with_cookie(value))
        key_in_url = await c.get(f"/dashboard/login?key={ADMIN_KEY}")
        key_in_query_post = await c.post(f"/dashboard/login?key={ADMIN_KEY}", headers=FORM)
    assert response.status_code == 303 and response.headers["location"] == "/dashboard"
    cookie = response.headers["set-cookie"]
    for attribute in ("HttpOnly", "SameSite=Strict", "Path=/dashboard", "Max-Age="):
        assert attribute in cookie
    assert "Secure" not in cookie  # plain http here; see the unit test below for TLS
    assert ADMIN_KEY not in cookie
    assert state.status_code == 200
    body = state.json()
    assert {r["id"] for r in body["replicas"]} == {r.id for r in replicas}
    assert body["csrf"] and body["csrf"] not in value
    assert "set-cookie" not in key_in_url.headers  # a key in a URL logs nobody in
    assert key_in_query_post.status_code == 401 and "set-cookie" not in key_in_query_post.headers


def test_the_cookie_is_secure_under_tls() -> None:
    header = Sessions(ADMIN_KEY).cookie_header("v", secure=True)
    assert header.endswith("; Secure") and "HttpOnly" in header


async def test_actions_need_the_csrf_header_with_a_cookie_but_not_with_the_bearer_key(
    replicas,
) -> None:
    target = replicas[0].id
    async with run_router(replicas) as router:
        c = router.client
        value = await session_cookie(c)
        csrf = (await c.get("/dashboard/state", headers=with_cookie(value))).json()["csrf"]
        drain_url = f"/dashboard/replicas/{target}/drain"
        no_header = await c.post(drain_url, headers=with_cookie(value))
        wrong_header = await c.post(drain_url, headers=with_cookie(value, **{"X-CSRF-Token": "x"}))
        other_session = Sessions(ADMIN_KEY).new_session()
        stolen_token = await c.post(
            drain_url, headers=with_cookie(other_session, **{"X-CSRF-Token": csrf})
        )
        non_ascii = await c.post(drain_url, headers=with_cookie(value, **{"X-CSRF-Token": "é"}))
        drained_before = router.replica(target).admin_drained
        good = await c.post(drain_url, headers=with_cookie(value, **{"X-CSRF-Token": csrf}))
        drained_after = router.replica(target).admin_drained
        by_bearer = await c.post(f"/dashboard/replicas/{target}/undrain", headers=ADMIN)
        logout_no_header = await c.post("/dashboard/logout", headers=with_cookie(value))
    for response in (no_header, wrong_header, stolen_token, non_ascii, logout_no_header):
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "csrf_token_invalid"
    assert not drained_before
    assert good.status_code == 200 and good.json()["state"] == "draining" and drained_after
    assert by_bearer.status_code == 200 and not router.replica(target).admin_drained


async def test_gets_cannot_act_and_unknown_paths_are_404_json(replicas) -> None:
    async with run_router(replicas) as router:
        c = router.client
        value = await session_cookie(c)
        cookie = with_cookie(value)
        get_drain = await c.get(f"/dashboard/replicas/{replicas[0].id}/drain", headers=cookie)
        post_state = await c.post("/dashboard/state", headers=cookie)
        missing = [
            await c.get(path, headers=cookie)
            for path in (
                "/dashboard/",
                "/dashboard/nope",
                "/dashboard/static/missing.js",
                "/dashboard/static/dashboard.html",  # pages are served at their routes only
                "/dashboard/static/../routes.py",
                "/dashboard/static/%2e%2e%2fsession.py",
                "/dashboard/static/..%2f..%2fapp.py",
            )
        ]
        no_replica = await c.post("/dashboard/replicas/nope/drain", headers=ADMIN)
        no_store = await c.post("/dashboard/keys/key_x/revoke", headers=ADMIN)
    assert get_drain.status_code == 405 and post_state.status_code == 405
    assert not router.replica(replicas[0].id).admin_drained
    for response in missing:
        assert response.status_code == 404, response.url
        assert response.headers["content-type"] == "application/json"
        assert "error" in response.json()
    assert no_replica.status_code == 404
    assert no_replica.json()["error"]["code"] == "replica_not_found"
    assert no_store.status_code == 404


async def test_pages_and_files_carry_a_strict_csp_and_their_content_types(replicas) -> None:
    async with run_router(replicas) as router:
        c = router.client
        cookie = with_cookie(await session_cookie(c))
        page = await c.get("/dashboard", headers=cookie)
        files = {
            name: await c.get(f"/dashboard/static/{name}", headers=cookie)
            for name in ("dashboard.js", "dashboard.css", "uPlot.iife.min.js", "uPlot.min.css")
        }
        state = await c.get("/dashboard/state", headers=cookie)
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert b"<script>" not in page.content and b" on" + b"click=" not in page.content
    assert page.headers["x-frame-options"] == "DENY"
    for name, response in files.items():
        assert response.status_code == 200
        kind = "text/javascript" if name.endswith(".js") else "text/css"
        assert response.headers["content-type"] == f"{kind}; charset=utf-8"
        assert response.headers["x-content-type-options"] == "nosniff"
    assert b"MIT" in files["uPlot.iife.min.js"].content[:300]
    assert state.headers["cache-control"] == "no-store"


async def test_without_an_admin_key_the_dashboard_is_disabled(replicas) -> None:
    async with run_router(replicas, config={"admin_key": None}) as router:
        c = router.client
        page = await c.get("/dashboard")
        form = await c.get("/dashboard/login")
        attempt = await login(c, "")
        forged = await c.get("/dashboard/state", headers=with_cookie(Sessions(None).new_session()))
    for response in (page, form, attempt, forged):
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "admin_disabled"


async def test_revoking_a_key_from_the_dashboard_refuses_it_at_once(replicas, key_store) -> None:
    record, secret = await key_store.admin.create("victim", rpm=100)
    async with run_router(replicas, key_store=key_store) as router:
        c = router.client
        user = {"Authorization": f"Bearer {secret}"}
        before = await c.post("/v1/chat/completions", json=chat(), headers=user)
        value = await session_cookie(c)
        state = (await c.get("/dashboard/state", headers=with_cookie(value))).json()
        csrf_less = await c.post(f"/dashboard/keys/{record.id}/revoke", headers=with_cookie(value))
        revoked = await c.post(
            f"/dashboard/keys/{record.id}/revoke",
            headers=with_cookie(value, **{"X-CSRF-Token": state["csrf"]}),
        )
        after = await c.post("/v1/chat/completions", json=chat(), headers=user)
    assert before.status_code == 200
    shown = {k["id"]: k for k in state["keys"]["data"]}[record.id]
    assert shown["rpm"] == {"used": 1, "limit": 100} and shown["status"] == "active"
    assert "secret_hash" not in shown
    assert csrf_less.status_code == 403
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    assert "secret_hash" not in revoked.json()
    assert after.status_code == 401
