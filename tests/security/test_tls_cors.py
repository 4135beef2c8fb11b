"""TLS and CORS on the router and the replica, on loopback with certificates the test makes
(trustme): client -> router over TLS (with and without client certificates), router -> replica
over TLS (a real replica on a tiny model, trusted through --upstream-ca-certs), CORS preflights
and simple requests on both sides, and CORS off by default."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trustme
import uvicorn

from fleet.web_security import CORSSettings, TLSSettings, cors_from_args, tls_from_args
from replica.engine.async_engine import AsyncEngine
from replica.engine.config import EngineArgs
from replica.http_api.app import build_app
from replica.http_api.runtime import ReplicaSettings
from replica.http_api.uvicorn_runner import add_cors, uvicorn_config
from router.app import RouterApp
from router.backends.pool import PoolSettings
from router.config import RouterConfig
from router.serve import http_server

MODEL = "tiny-tls"
ORIGIN = "https://app.example"


@dataclass
class Certs:
    ca: trustme.CA
    ca_file: str
    cert_file: str  # the servers' chain and key, for 127.0.0.1
    key_file: str
    client: trustme.LeafCert

    def context(self, with_client_cert: bool = False) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        if with_client_cert:
            self.client.configure_cert(context)
        return context


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    root = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(root / "ca.pem")
    server.cert_chain_pems[0].write_to_path(root / "server.pem")
    for extra in server.cert_chain_pems[1:]:
        extra.write_to_path(root / "server.pem", append=True)
    server.private_key_pem.write_to_path(root / "server.key")
    return Certs(
        ca, str(root / "ca.pem"), str(root / "server.pem"), str(root / "server.key"),
        ca.issue_cert("client@example"),
    )  # fmt: skip


@contextlib.contextmanager
def replica_server(settings: ReplicaSettings, model: Path) -> Iterator[str]:
    """A real replica (uvicorn + AsyncEngine) in a thread, configured as `python -m replica`
    configures it (serve.add_cors, serve.uvicorn_config)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    settings.port = sock.getsockname()[1]
    args = EngineArgs(
        model=str(model), device="cpu", dtype="float32", max_model_len=256, kv_cache_tokens=2048,
        served_model_name=MODEL,
    )  # fmt: skip
    app = build_app(settings, lambda: AsyncEngine(args))
    add_cors(app, settings.cors)
    server = uvicorn.Server(uvicorn_config(app, settings, "warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "replica did not start"
        time.sleep(0.02)
    try:
        yield settings.url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def tls_replica(certs: Certs, model_factory: Callable[..., Path]) -> Iterator[str]:
    """A replica serving HTTPS only, with CORS for ORIGIN."""
    settings = ReplicaSettings(
        model=MODEL, served_model_name=MODEL,
        tls=TLSSettings(certs.cert_file, certs.key_file),
        cors=CORSSettings((ORIGIN,), credentials=True),
    )  # fmt: skip
    with replica_server(settings, model_factory("llama", "tiny", seed=0)) as url:
        yield url


@contextlib.asynccontextmanager
async def router(config: RouterConfig) -> AsyncIterator[str]:
    app = RouterApp(config)
    server = http_server(app, config)
    await app.start()
    try:
        await server.start()
        yield f"{server.scheme}://127.0.0.1:{server.port}"
    finally:
        await server.stop(grace_s=2)
        await app.stop()


def router_config(
    replica_url: str, certs: Certs, trust_replicas: bool = True, **overrides: object
) -> RouterConfig:
    """A router for the replica; it trusts the test's CA for it (--upstream-ca-certs)."""
    pool = PoolSettings(probe_interval_s=0.2, ca_certs=certs.ca_file if trust_replicas else None)
    settings: dict = dict(port=0, policy="round-robin", replicas=[f"r1={replica_url}"], pool=pool)
    settings.update(overrides)
    return RouterConfig(**settings)


COMPLETION = {"model": MODEL, "prompt": "hello", "max_tokens": 4}


# -- TLS


async def test_client_to_router_to_replica_all_over_tls(tls_replica: str, certs: Certs) -> None:
    assert tls_replica.startswith("https://")
    config = router_config(tls_replica, certs, tls=TLSSettings(certs.cert_file, certs.key_file))
    async with router(config) as url:
        assert url.startswith("https://")
        async with httpx.AsyncClient(verify=certs.context(), timeout=30) as client:
            health = (await client.get(f"{url}/health")).json()
            assert health["routable"] == 1  # the router's probes reached the replica over TLS
            r = await client.post(f"{url}/v1/completions", json=COMPLETION)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] is not None
            streamed = await client.post(
                f"{url}/v1/completions", json={**COMPLETION, "stream": True}
            )
            assert streamed.text.rstrip().endswith("data: [DONE]")
        async with httpx.AsyncClient(timeout=5) as plain:
            with pytest.raises(httpx.HTTPError):
                await plain.get(url.replace("https://", "http://") + "/health")


async def test_router_with_a_client_ca_requires_client_certificates(
    tls_replica: str, certs: Certs
) -> None:
    tls = TLSSettings(certs.cert_file, certs.key_file, ca_certs=certs.ca_file)
    async with router(router_config(tls_replica, certs, tls=tls)) as url:
        async with httpx.AsyncClient(verify=certs.context(), timeout=5) as anonymous:
            with pytest.raises(httpx.HTTPError):
                await anonymous.get(f"{url}/health")
        context = certs.context(with_client_cert=True)
        async with httpx.AsyncClient(verify=context, timeout=5) as client:
            assert (await client.get(f"{url}/health")).status_code == 200


async def test_router_without_the_replicas_ca_does_not_trust_them(
    tls_replica: str, certs: Certs
) -> None:
    config = router_config(tls_replica, certs, trust_replicas=False)
    async with router(config) as url, httpx.AsyncClient(timeout=30) as client:
        assert (await client.get(f"{url}/health")).json()["routable"] == 0


# -- CORS


def preflight_headers(origin: str = ORIGIN) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }


async def test_router_cors_preflight_and_answers(tls_replica: str, certs: Certs) -> None:
    config = router_config(tls_replica, certs, cors=CORSSettings((ORIGIN,)))
    async with router(config) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        ok = await client.options("/v1/chat/completions", headers=preflight_headers())
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in ok.headers["access-control-allow-methods"]
        assert ok.headers["access-control-allow-headers"] == "authorization, content-type"
        refused = await client.options(
            "/v1/chat/completions", headers=preflight_headers("https://evil.example")
        )
        assert refused.status_code == 400
        assert "origin" in refused.json()["error"]["message"]
        assert "access-control-allow-origin" not in refused.headers

        local = await client.get("/health", headers={"Origin": ORIGIN})
        assert local.headers["access-control-allow-origin"] == ORIGIN
        assert local.headers["vary"] == "Origin"
        proxied = await client.post("/v1/completions", json=COMPLETION, headers={"Origin": ORIGIN})
        assert proxied.status_code == 200
        assert proxied.headers["access-control-allow-origin"] == ORIGIN
        stream = {**COMPLETION, "stream": True}
        streamed = await client.post("/v1/completions", json=stream, headers={"Origin": ORIGIN})
        assert streamed.headers["access-control-allow-origin"] == ORIGIN
        other = await client.get("/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


async def test_router_cors_is_off_by_default(tls_replica: str, certs: Certs) -> None:
    config = router_config(tls_replica, certs)
    async with router(config) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        answer = await client.get("/health", headers={"Origin": ORIGIN})
        assert "access-control-allow-origin" not in answer.headers
        preflight = await client.options("/health", headers=preflight_headers())
        assert "access-control-allow-origin" not in preflight.headers


async def test_replica_cors_preflight_and_answers(tls_replica: str, certs: Certs) -> None:
    async with httpx.AsyncClient(
        base_url=tls_replica, verify=certs.context(), timeout=30
    ) as client:
        ok = await client.options("/v1/completions", headers=preflight_headers())
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == ORIGIN
        assert ok.headers["access-control-allow-credentials"] == "true"
        refused = await client.options(
            "/v1/completions", headers=preflight_headers("https://evil.example")
        )
        assert refused.status_code == 400
        answer = await client.post("/v1/completions", json=COMPLETION, headers={"Origin": ORIGIN})
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == ORIGIN


# -- the flags


def test_router_and_replica_flags_build_tls_and_cors_settings() -> None:
    from replica.__main__ import parse_args as replica_args
    from router.__main__ import config_from_args, main, parse_args

    tls_flags = ["--ssl-certfile", "c.pem", "--ssl-keyfile", "k.pem", "--ssl-ca-certs", "ca.pem"]
    cors_flags = ["--allowed-origins", '["https://a.example"]', "--allowed-methods", "GET,POST"]
    config = config_from_args(
        parse_args(
            ["--replica", "https://r:1", "--upstream-ca-certs", "up.pem", "--max-connections",
             "50", *tls_flags, *cors_flags]
        )
    )  # fmt: skip
    assert config.tls == TLSSettings("c.pem", "k.pem", "ca.pem")
    assert config.tls.verify_mode == ssl.CERT_REQUIRED  # a client CA means client certs
    assert config.cors == CORSSettings(("https://a.example",), ("GET", "POST"), ("*",), False)
    assert config.pool.ca_certs == "up.pem" and config.max_connections == 50
    defaults = config_from_args(parse_args(["--replica", "http://r:1"]))
    assert defaults.tls is None and defaults.cors is None  # both off unless asked for
    with pytest.raises(SystemExit):
        main(["--replica", "http://r:1", "--ssl-keyfile", "k.pem"])  # a key without a cert

    args = replica_args(["--model", "m", *tls_flags, "--ssl-cert-reqs", "0", *cors_flags])
    settings = ReplicaSettings(
        model="m", served_model_name="m", host="h", port=1, tls=tls_from_args(args)
    )
    assert settings.url == "https://h:1" and settings.tls.verify_mode == ssl.CERT_NONE
    assert cors_from_args(args).methods == ("GET", "POST")
