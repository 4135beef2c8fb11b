"""The replica's ASGI app: routes, error handlers, request counting, and the runtime's lifespan."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from prometheus_client import disable_created_metrics
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from replica.http_api import info_routes
from replica.http_api.body import json_response
from replica.http_api.chat import create_chat_completion
from replica.http_api.completions import create_completion
from replica.http_api.embeddings import create_embedding
from replica.http_api.errors import EXCEPTION_HANDLERS
from replica.http_api.metrics import ReplicaMetrics
from replica.http_api.openapi import openapi_document
from replica.http_api.runtime import ReplicaRuntime, ReplicaSettings
from replica.http_api.tracing import RequestTracing

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from replica.engine.async_engine import AsyncEngine


async def openapi_json(request: Request) -> Response:
    info_routes.check_info_access(request)
    return json_response(openapi_document())


ROUTES = [
    Route("/v1/completions", create_completion, methods=["POST"]),
    Route("/v1/chat/completions", create_chat_completion, methods=["POST"]),
    Route("/v1/embeddings", create_embedding, methods=["POST"]),
    Route("/v1/models", info_routes.list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", info_routes.get_model, methods=["GET"]),
    Route("/tokenize", info_routes.tokenize, methods=["POST"]),
    Route("/detokenize", info_routes.detokenize, methods=["POST"]),
    Route("/health", info_routes.health, methods=["GET"]),
    Route("/load", info_routes.load, methods=["GET"]),
    Route("/metrics", info_routes.metrics, methods=["GET"]),
    Route("/version", info_routes.version_route, methods=["GET"]),
    # What SGLang's model gateway reads from a worker (and the older names it falls back to).
    Route("/server_info", info_routes.server_info, methods=["GET"]),
    Route("/get_server_info", info_routes.server_info, methods=["GET"]),
    Route("/model_info", info_routes.model_info, methods=["GET"]),
    Route("/get_model_info", info_routes.model_info, methods=["GET"]),
    Route("/openapi.json", openapi_json, methods=["GET"]),
]


class RequestCounter:
    """Counts every response by route template and status (pure ASGI: leaves `receive` untouched,
    so the handlers' disconnect watching sees the real channel)."""

    def __init__(self, app: ASGIApp, metrics: ReplicaMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(_route_of(scope), str(status)).inc()


def _route_of(scope: Scope) -> str:
    """The router leaves the matched route in the (shared) scope; unknown paths have none."""
    route = scope.get("route")
    return route.path if isinstance(route, Route) else "unmatched"


def build_app(
    settings: ReplicaSettings,
    engine_factory: Callable[[], AsyncEngine],
    tracer_provider: TracerProvider | None = None,
) -> Starlette:
    """`engine_factory` builds the AsyncEngine (called in a thread at startup: loading is slow).
    Spans go to `tracer_provider` (tests pass one), else to `settings.otlp_endpoint` if set."""
    if tracer_provider is None and settings.otlp_endpoint:
        from fleet.telemetry import otlp_provider

        tracer_provider = otlp_provider(settings.otlp_endpoint, "fleet-replica")
    # `*_created` series double the scrape size and no dashboard reads them (process-wide switch).
    disable_created_metrics()
    runtime = ReplicaRuntime(settings, engine_factory)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()
            if tracer_provider is not None:
                tracer_provider.shutdown()  # send the spans still batched

    app = Starlette(routes=ROUTES, exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)
    app.router.redirect_slashes = False  # a 404 body, not a redirect built from the Host header
    app.state.runtime = runtime
    app.add_middleware(RequestCounter, metrics=runtime.metrics)
    app.add_middleware(RequestTracing, replica_id=settings.replica_id, provider=tracer_provider)
    return app
