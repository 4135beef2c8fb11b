"""The admin API (admin key required): replicas with their load, drain / undrain, router stats.

A drained replica keeps serving what it has and gets nothing new. For replicas known through the
fleet's membership the drain is recorded in Redis, so every router honours it (`"scope": "fleet"`);
for `--replica` URLs it is this router's own flag (`"scope": "router"`). A replica that drains
itself (SIGTERM) is seen by every router through membership.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fleet.control.errors import APIError
from fleet.control.keys import require_admin

if TYPE_CHECKING:
    from router.app import RouterApp


def _json(data: object) -> Response:
    return Response(orjson.dumps(data), media_type="application/json")


def routes(app: RouterApp) -> list[Route]:
    def check(request: Request) -> None:
        require_admin(request.headers.get("authorization"), app.config.admin_key)

    def replica_of(request: Request):
        replica_id = request.path_params["replica_id"]
        replica = app.pool.replicas.get(replica_id)
        if replica is None:
            raise APIError(404, f"No replica with id '{replica_id}'.", code="replica_not_found")
        return replica

    def describe(replica) -> dict:
        view = replica.describe()
        indexed = getattr(app.policy, "indexed_chunks", None)
        if indexed is not None:
            view["prefix_index_chunks"] = indexed(replica.id)
        return view

    async def list_replicas(request: Request) -> Response:
        check(request)
        replicas = sorted(app.pool.replicas.values(), key=lambda r: (r.model or "", r.id))
        return _json({"object": "list", "data": [describe(r) for r in replicas]})

    async def drain(request: Request) -> Response:
        check(request)
        replica = replica_of(request)
        scope = await app.pool.set_drained(replica, True)
        return _json({**describe(replica), "scope": scope})

    async def undrain(request: Request) -> Response:
        check(request)
        replica = replica_of(request)
        scope = await app.pool.set_drained(replica, False)
        return _json({**describe(replica), "scope": scope})

    async def stats(request: Request) -> Response:
        check(request)
        now = time.monotonic()
        replicas = list(app.pool.replicas.values())
        return _json(
            {
                "policy": app.policy.name,
                "uptime_s": round(time.time() - app.started_at, 3),
                "replicas": len(replicas),
                "routable": sum(r.routable(now) for r in replicas),
                "in_flight": sum(r.in_flight for r in replicas),
                "models": app.pool.models(),
                "chars_per_token": app.tokens.chars_per_token,
                "retry_budget": round(app.proxy.budget.tokens, 2),
                **app.metrics.snapshot(),
            }
        )

    return [
        Route("/admin/replicas", list_replicas),
        Route("/admin/replicas/{replica_id}/drain", drain, methods=["POST"]),
        Route("/admin/replicas/{replica_id}/undrain", undrain, methods=["POST"]),
        Route("/admin/stats", stats),
    ]
