"""The replica with the fewest requests ahead, then the emptiest KV cache; ties rotate."""

from __future__ import annotations

from router.backends.backend import Replica
from router.routing.policies.base import Decision, Policy, RouteRequest, rotated


def least_loaded(candidates: list[Replica], start: int) -> Replica:
    best = None
    best_key = (0, 0, 0.0)
    for replica in rotated(candidates, start):
        key = (replica.queue_depth(), replica.pending_prefill, replica.load.kv_usage)
        if best is None or key < best_key:
            best, best_key = replica, key
    assert best is not None
    return best


class LeastLoadPolicy(Policy):
    name = "least-load"

    def __init__(self) -> None:
        self._turn = 0

    def choose(self, request: RouteRequest, candidates: list[Replica]) -> Decision:
        self._turn += 1
        return Decision(least_loaded(candidates, self._turn), "least_load")
