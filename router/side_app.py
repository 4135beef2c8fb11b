"""The router's own routes: `/health`, `/metrics`, `/v1/models[/{id}]` and the admin API.

None of them is on the data path, so they are an ordinary Starlette app, reached through the
HTTP server's ASGI bridge (router.http.asgi) for any path the request handlers (router.app)
do not proxy. It is built from the parts it reads, never from the RouterApp.
"""

from __future__ import annotations

import time
from typing import TypedDict

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fleet.control.errors import APIError
from fleet.control.keys import bearer_token, is_admin_key
from fleet.web_errors import error_response
from router.auth import Gate
from router.backends.backend import Replica
from router.backends.pool import ReplicaPool
from router.config import RouterConfig
from router.metrics import RouterMetrics
from router.plan import model_not_found


class ReplicaCard(TypedDict):
    id: str
    state: str


class ModelCard(TypedDict):
    """OpenAI's model object, with vLLM's `max_model_len` and the replicas behind the name."""

    id: str
    object: str
    created: int
    owned_by: str
    max_model_len: int | None
    replicas: list[ReplicaCard]


def side_app(
    info: InfoRoutes, admin_routes: list[Route], dashboard_routes: list[Route]
) -> Starlette:
    web = Starlette(
        routes=[
            Route("/health", info.health),
            Route("/metrics", info.prometheus),
            Route("/v1/models", info.models),
            Route("/v1/models/{model:path}", info.model),
            *admin_routes,
            *dashboard_routes,
        ],
        exception_handlers={APIError: _api_error, HTTPException: _http_error},
    )
    web.router.redirect_slashes = False  # a 404 body, not a redirect built from Host
    return web


class InfoRoutes:
    """What anyone (or the key's holder, or Prometheus) may ask of the router itself."""

    def __init__(
        self,
        config: RouterConfig,
        pool: ReplicaPool,
        gate: Gate,
        metrics: RouterMetrics,
        started_at: float,
    ) -> None:
        self.config = config
        self.pool = pool
        self.gate = gate
        self.metrics = metrics
        self.started_at = started_at

    async def health(self, request: Request) -> Response:
        now = time.monotonic()
        routable = sum(r.routable(now) for r in self.pool.replicas.values())
        body = {"status": "ok", "replicas": len(self.pool.replicas), "routable": routable}
        return Response(orjson.dumps(body), media_type="application/json")

    async def prometheus(self, request: Request) -> Response:
        """Open unless the operator set a metrics key (Prometheus sends it as a bearer token)."""
        expected = self.config.metrics_key
        if expected is not None:
            presented = bearer_token(request.headers.get("authorization"))
            admin = self.config.admin_key
            if not (is_admin_key(presented, expected) or is_admin_key(presented, admin)):
                raise APIError(401, "/metrics needs the metrics key.", code="invalid_api_key")
        return Response(self.metrics.exposition(), media_type="text/plain; version=0.0.4")

    async def models(self, request: Request) -> Response:
        """Each name the fleet answers to, once, with the replicas behind it (the key's names only)."""
        record = await self.gate.authenticate(request.headers.get("authorization"), None)
        cards = [
            self._model_card(name, max_model_len)
            for name, max_model_len in sorted(self.pool.models().items())
            if record is None or record.allows_model(name)
        ]
        return Response(
            orjson.dumps({"object": "list", "data": cards}), media_type="application/json"
        )

    async def model(self, request: Request) -> Response:
        """`GET /v1/models/{id}` (the SDK's `models.retrieve`; ids may hold '/'). A name the key
        may not use is answered as OpenAI answers a model you cannot see: 404."""
        record = await self.gate.authenticate(request.headers.get("authorization"), None)
        name = request.path_params["model"]
        models = self.pool.models()
        if name not in models or (record is not None and not record.allows_model(name)):
            raise model_not_found(name)
        card = self._model_card(name, models[name])
        return Response(orjson.dumps(card), media_type="application/json")

    def _model_card(self, name: str, max_model_len: int | None) -> ModelCard:
        """OpenAI's model object plus vLLM's `max_model_len` and the replicas serving it: their
        ids and states, which a user may see (pinned routes take the id), never their URLs."""
        now = time.monotonic()
        replicas = self.pool.by_model.get(name, [])
        return {
            "id": name,
            "object": "model",
            "created": int(self.started_at),
            "owned_by": "fleetserve",
            "max_model_len": max_model_len,
            "replicas": [{"id": r.id, "state": replica_state(r, now)} for r in replicas],
        }


def replica_state(replica: Replica, now: float) -> str:
    """What a user may know of a replica: taking work, draining, or out for now (unhealthy or
    ejected by the breaker; which one is the operator's business)."""
    if replica.draining:
        return "draining"
    return "ready" if replica.routable(now) else "unavailable"


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = "Not found." if exc.status_code == 404 else str(exc.detail)
    return error_response(
        APIError(exc.status_code, f"{message} ({request.method} {request.url.path})")
    )
