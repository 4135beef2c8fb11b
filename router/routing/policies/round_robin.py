"""Each replica in turn, blind to load and prompts: the baseline the other policies must beat."""

from __future__ import annotations

from router.backends.backend import Replica
from router.routing.policies.base import Decision, Policy, RouteRequest


class RoundRobinPolicy(Policy):
    name = "round-robin"

    def __init__(self) -> None:
        self._turn = 0

    def choose(self, request: RouteRequest, candidates: list[Replica]) -> Decision:
        self._turn += 1
        return Decision(candidates[self._turn % len(candidates)], "round_robin")
