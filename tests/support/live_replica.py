"""A real replica server (uvicorn + AsyncEngine on a tiny model) running in a thread of the test
process, on a loopback socket it was handed (no port race). The fixtures are in conftest.py."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import uvicorn

from replica.engine.async_engine import AsyncEngine
from replica.engine.config import EngineArgs
from replica.http_api.app import build_app
from replica.http_api.runtime import ReplicaRuntime, ReplicaSettings
from replica.http_api.uvicorn_runner import JsonRefusals

MODEL_NAME = "tiny-llama"
API_KEY = "sk-test-static-key"


@dataclass
class LiveReplica:
    url: str
    runtime: ReplicaRuntime
    api_key: str | None

    @property
    def engine(self) -> AsyncEngine:
        return self.runtime.engine

    def openai(self, api_key: str | None = None, **kwargs) -> openai.OpenAI:
        key = api_key or self.api_key or "unused"
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, **kwargs)

    def http(self, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)


def engine_args(model: Path, **overrides) -> EngineArgs:
    defaults = dict(
        device="cpu", dtype="float32", max_model_len=512, kv_cache_tokens=8192, max_num_seqs=64
    )
    return EngineArgs(model=str(model), **{**defaults, **overrides})


@contextlib.contextmanager
def serve(
    model: Path,
    *,
    api_key: str | None = None,
    redis_url: str | None = None,
    max_waiting: int | None = None,
    server: dict[str, Any] | None = None,
    tracer_provider: Any = None,
    **engine_overrides,
) -> Iterator[LiveReplica]:
    """`server` sets further ReplicaSettings fields; the other keywords are engine arguments.
    `tracer_provider`: an OpenTelemetry TracerProvider the replica's spans go to."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    settings = ReplicaSettings(
        model=str(model),
        served_model_name=MODEL_NAME,
        port=port,
        api_key=api_key,
        redis_url=redis_url,
        drain_grace_s=5,
    )
    if max_waiting is not None:
        settings.max_waiting = max_waiting
    settings = dataclasses.replace(settings, **(server or {}))
    args = engine_args(model, **engine_overrides)
    app = build_app(settings, lambda: AsyncEngine(args), tracer_provider)
    config = uvicorn.Config(
        app,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=2,
        http=JsonRefusals,  # as `python -m replica` serves (uvicorn_runner.uvicorn_config)
        ws="none",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("replica server did not start")
        time.sleep(0.02)
    try:
        yield LiveReplica(f"http://127.0.0.1:{port}", app.state.runtime, api_key)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()
