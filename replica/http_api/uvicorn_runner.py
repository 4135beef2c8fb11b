"""Run the app under uvicorn with a graceful drain on SIGTERM, over TLS and with CORS when set.

Uvicorn's own handler stops accepting connections at once and re-raises the signal when it is done
(so the exit status is not 0). Instead, the first SIGTERM or SIGINT drains through the runtime (new
requests get 503 while in-flight ones finish, the replica leaves the fleet), then uvicorn shuts
down; a second signal stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import signal
from collections.abc import Iterator
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from fleet.control.errors import APIError
from fleet.web_security import CORSSettings
from replica.http_api.runtime import ReplicaRuntime, ReplicaSettings
from replica.http_api.tracing import RequestIdFilter

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def add_cors(app: Starlette, cors: CORSSettings | None) -> None:
    """Starlette's CORSMiddleware, only when origins are configured (off by default)."""
    if cors is not None:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors.origins,
            allow_methods=cors.methods,
            allow_headers=cors.headers,
            allow_credentials=cors.credentials,
        )


class JsonRefusals(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol, refusing malformed requests with OpenAI error JSON instead of
    plain text, and only after the requests before them on the connection are answered (a valid
    request followed by junk keeps its answer). Whatever follows the malformed bytes is dropped.

    A request whose Transfer-Encoding does not end in `chunked` has no knowable length (RFC 9112
    section 6.3 says to answer 400 and close); llhttp would read its body until the client closes,
    so the request would wait for ever."""

    _refusal: str | None = None
    _reason: str | None = None

    def on_headers_complete(self) -> None:
        codings = [v for name, v in self.headers if name == b"transfer-encoding"]
        if codings and b",".join(codings).rsplit(b",", 1)[-1].strip().lower() != b"chunked":
            self._reason = "its Transfer-Encoding does not end in chunked"
            raise ValueError(self._reason)  # the parser fails; send_400_response refuses
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        if self._refusal is None:
            super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        self._refusal = msg
        if not self._answering():
            self._refuse()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._refusal is not None and not self._answering():
            self._refuse()

    def _answering(self) -> bool:
        cycle = self.cycle
        return bool(self.pipeline) or (cycle is not None and not cycle.response_complete)

    def _refuse(self) -> None:
        why = self._reason or self._refusal
        body = orjson.dumps(APIError(400, f"Malformed HTTP request: {why}").body())
        head = (
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        )
        if not self.transport.is_closing():
            self.transport.write(head + body)
            self.transport.close()


def logging_config() -> dict[str, Any]:
    """uvicorn's logging, its access lines ending with the request's id (X-Request-Id)."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["filters"] = {"request_id": {"()": RequestIdFilter}}
    config["formatters"]["access"]["fmt"] += " request=%(request_id)s"
    config["handlers"]["access"]["filters"] = ["request_id"]
    return config


def uvicorn_config(app: Starlette, settings: ReplicaSettings, log_level: str) -> uvicorn.Config:
    """The server's settings, TLS included (uvicorn's ssl_* arguments, as vLLM passes them)."""
    tls = settings.tls
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        log_config=logging_config(),
        lifespan="on",
        http=JsonRefusals,
        ws="none",  # no WebSocket routes: an Upgrade is ignored, the request answered as HTTP
        # The drain already waited for in-flight work; uvicorn's own wait only closes sockets.
        timeout_graceful_shutdown=2,
        ssl_certfile=tls.certfile if tls else None,
        ssl_keyfile=tls.keyfile if tls else None,
        ssl_ca_certs=tls.ca_certs if tls else None,
        ssl_cert_reqs=int(tls.verify_mode) if tls else 0,
    )


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, runtime: ReplicaRuntime) -> None:
        super().__init__(config)
        self.runtime = runtime
        self._drain: asyncio.Task | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in _SIGNALS:
            loop.add_signal_handler(sig, self._on_signal)
        try:
            yield
        finally:
            for sig in _SIGNALS:
                loop.remove_signal_handler(sig)

    def _on_signal(self) -> None:
        if self._drain is not None:
            self.force_exit = True
            self.should_exit = True
            return
        self._drain = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self.runtime.drain()
        finally:
            self.should_exit = True
