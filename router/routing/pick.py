"""Which replica one attempt goes to: among the model's routable replicas of the request's task
that have room and were not tried yet, a sticky session's replica, else the policy's choice (an
embedding goes by load alone: it leaves no cache worth coming back to)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from router.plan import EMBEDDINGS, TASK_OF_ROUTE, Plan
from router.routing.policies import Decision, Policy
from router.routing.sessions import sticky_replica

if TYPE_CHECKING:
    from router.proxy import Proxy


class NoReplica(Exception):
    """No routable replica is left for this request (none at all, or all already tried)."""


def pick(proxy: Proxy, plan: Plan, tried: tuple[str, ...], ours_only: bool = False) -> Decision:
    """The choice for `plan`'s next attempt, or NoReplica; `ours_only`: fleetserve replicas only
    (a resumed stream)."""
    candidates = proxy.pool.routable(plan.model, tried, TASK_OF_ROUTE.get(plan.route))
    cap = proxy.replica_max_in_flight
    if cap:
        candidates = [r for r in candidates if r.in_flight < cap]
    if ours_only:
        candidates = [r for r in candidates if r.engine == "fleetserve"]
    if not candidates:
        raise NoReplica
    request = plan.routing
    policy: Policy
    if plan.route == EMBEDDINGS:
        policy = proxy.embeddings_policy
        decision = policy.choose(request, candidates)
    elif request.session_id:
        policy = proxy.policy
        decision = policy.place(request, sticky_replica(request.session_id, candidates), "session")
    else:
        policy = proxy.policy
        decision = policy.choose(request, candidates)
    proxy.metrics.decided(policy.name, decision.outcome)
    return decision
