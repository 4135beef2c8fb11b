"""Routing policies, one small class each behind `Policy.choose`."""

from __future__ import annotations

from typing import Literal

from router.routing.policies.base import Decision, Policy, RouteRequest
from router.routing.policies.least_load import LeastLoadPolicy
from router.routing.policies.prefix import DEFAULT_QUEUE_WEIGHT, Placements, PrefixPolicy
from router.routing.policies.round_robin import RoundRobinPolicy

PolicyName = Literal["prefix", "least-load", "round-robin"]  # `--policy`: the keys of POLICIES
POLICIES: dict[str, type[Policy]] = {
    "prefix": PrefixPolicy,
    "least-load": LeastLoadPolicy,
    "round-robin": RoundRobinPolicy,
}


def make_policy(
    name: str, queue_weight: float | None = None, placements: Placements | None = None
) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")
    if name == "prefix":
        weight = DEFAULT_QUEUE_WEIGHT if queue_weight is None else queue_weight
        return PrefixPolicy(queue_weight=weight, placements=placements)
    return POLICIES[name]()


__all__ = [
    "POLICIES",
    "Decision",
    "Placements",
    "Policy",
    "PolicyName",
    "RouteRequest",
    "make_policy",
]
