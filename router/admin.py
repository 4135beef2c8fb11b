"""The admin API (admin key required): replicas with their load, drain / undrain, router stats.

A drained replica keeps serving what it has and gets nothing new. For replicas known through the
fleet's membership the drain is recorded in Redis, so every router honours it (`"scope": "fleet"`);
for `--replica` URLs it is this router's own flag (`"scope": "router"`). A replica that drains
itself (SIGTERM) is seen by every router through membership.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fleet.control.errors import APIError
from fleet.control.keys import require_admin
from router.backends.backend import Replica, ReplicaView
from router.backends.pool import ReplicaPool
from router.backends.retry_budget import RetryBudget
from router.metrics import RouterMetrics
from router.routing.exact import ExactAffinity
from router.routing.policies import Policy
from router.routing.tokens import TokenEstimator


def _json(data: object) -> Response:
    return Response(orjson.dumps(data), media_type="application/json")


def routes(
    admin_key: str | None,
    pool: ReplicaPool,
    policy: Policy,
    tokens: TokenEstimator,
    budget: RetryBudget,
    metrics: RouterMetrics,
    started_at: float,
    exact: ExactAffinity | None = None,
) -> list[Route]:
    """The admin routes, over the parts they read and change (never the whole RouterApp)."""

    def check(request: Request) -> None:
        require_admin(request.headers.get("authorization"), admin_key)

    def replica_of(request: Request) -> Replica:
        replica_id = request.path_params["replica_id"]
        replica = pool.replicas.get(replica_id)
        if replica is None:
            raise APIError(404, f"No replica with id '{replica_id}'.", code="replica_not_found")
        return replica

    def describe(replica: Replica) -> ReplicaView:
        view = replica.describe()
        indexed: Callable[[str], int] | None = getattr(policy, "indexed_chunks", None)  # prefix
        if indexed is not None:
            view["prefix_index_chunks"] = indexed(replica.id)
        if exact is not None and exact.reader.tracking(replica.id):
            index = exact.reader.index(replica.id)  # None: out of sync, on the estimate
            view["kv_exact_blocks"] = len(index.blocks) if index is not None else None
        return view

    async def list_replicas(request: Request) -> Response:
        check(request)
        replicas = sorted(pool.replicas.values(), key=lambda r: (r.model or "", r.id))
        return _json({"object": "list", "data": [describe(r) for r in replicas]})

    async def drain(request: Request) -> Response:
        check(request)
        replica = replica_of(request)
        scope = await pool.set_drained(replica, True)
        return _json({**describe(replica), "scope": scope})

    async def undrain(request: Request) -> Response:
        check(request)
        replica = replica_of(request)
        scope = await pool.set_drained(replica, False)
        return _json({**describe(replica), "scope": scope})

    async def stats(request: Request) -> Response:
        check(request)
        now = time.monotonic()
        replicas = list(pool.replicas.values())
        return _json(
            {
                "policy": policy.name,
                "uptime_s": round(time.time() - started_at, 3),
                "replicas": len(replicas),
                "routable": sum(r.routable(now) for r in replicas),
                "in_flight": sum(r.in_flight for r in replicas),
                "models": pool.models(),
                "chars_per_token": tokens.chars_per_token,
                "retry_budget": round(budget.tokens, 2),
                **({"kv_events": exact.describe()} if exact is not None else {}),
                **metrics.snapshot(),
            }
        )

    return [
        Route("/admin/replicas", list_replicas),
        Route("/admin/replicas/{replica_id}/drain", drain, methods=["POST"]),
        Route("/admin/replicas/{replica_id}/undrain", undrain, methods=["POST"]),
        Route("/admin/stats", stats),
    ]
