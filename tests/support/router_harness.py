"""Helpers for router tests: fake replicas as real processes, routers as real servers on loopback.

Routers run in the test's event loop on the same server code `python -m router` runs,
so tests can also look at their state.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from fleet.embedded_redis import free_port
from router.app import RouterApp
from router.backends.pool import PoolSettings
from router.config import RouterConfig
from router.http.server import HttpServer
from router.serve import http_server

ROOT = Path(__file__).resolve().parents[2]
FAKE = ROOT / "tests" / "support" / "fake_replica.py"
MODEL = "fake-model"


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not come up in {timeout} s")


@dataclass
class FakeReplica:
    """A fake replica process; `configure()` and `stats()` talk to its /fake endpoints."""

    port: int
    args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def spec(self) -> str:
        return f"r{self.port}={self.url}"

    @property
    def id(self) -> str:
        return f"r{self.port}"

    def start(self) -> FakeReplica:
        cmd = [
            sys.executable,
            str(FAKE),
            "--port",
            str(self.port),
            "--id",
            f"r{self.port}",
            *self.args,
        ]
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(self.url + "/health")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def configure(self, **changes: object) -> None:
        httpx.post(self.url + "/fake/config", json=changes, timeout=5).raise_for_status()

    def reset(self) -> None:
        httpx.post(self.url + "/fake/reset", timeout=5).raise_for_status()

    def stats(self) -> dict:
        return httpx.get(self.url + "/fake/stats", timeout=5).json()


@contextlib.contextmanager
def fake_replicas(count: int, *args: str) -> Iterator[list[FakeReplica]]:
    fakes = [FakeReplica(free_port(), list(args)) for _ in range(count)]
    try:
        for fake in fakes:
            fake.process = subprocess.Popen(
                [sys.executable, str(FAKE), "--port", str(fake.port), "--id", fake.id, *args],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        for fake in fakes:
            wait_http(fake.url + "/health")
        yield fakes
    finally:
        for fake in fakes:
            fake.stop()


def fresh(fakes: list[FakeReplica]) -> list[FakeReplica]:
    """The fakes as a test should find them: running (restarted if a test killed one), reset."""
    for fake in fakes:
        if fake.process is None or fake.process.poll() is not None:
            fake.start()
        fake.reset()
    return fakes


@dataclass
class RunningRouter:
    app: RouterApp
    url: str
    client: httpx.AsyncClient
    server: HttpServer

    def replica(self, replica_id: str):
        return self.app.pool.replicas[replica_id]


FAST_POOL = PoolSettings(probe_interval_s=0.2, load_interval_s=0.2, probe_timeout_s=0.5)


@contextlib.asynccontextmanager
async def run_router(config: RouterConfig, **app_kwargs) -> AsyncIterator[RunningRouter]:
    config.port = config.port or free_port()
    app = RouterApp(config, **app_kwargs)
    server = http_server(app, config)
    await app.start()
    try:
        await server.start()
        url = f"http://127.0.0.1:{config.port}"
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            yield RunningRouter(app, url, client, server)
    finally:
        await asyncio.wait_for(server.stop(grace_s=10), 15)
        await app.stop()


def router_config(replicas: list[FakeReplica], **overrides) -> RouterConfig:
    settings = dict(
        replicas=[r.spec for r in replicas],
        admin_key="admin-secret",
        pool=FAST_POOL,
        policy="round-robin",
        port=0,  # a free port, picked by run_router
    )
    settings.update(overrides)
    return RouterConfig(**settings)


def chat(content: str = "hello", **extra: object) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


def sse_events(text: str) -> list[str]:
    return [frame[len("data: ") :] for frame in text.split("\n\n") if frame.startswith("data: ")]


ADMIN = {"Authorization": "Bearer admin-secret"}
