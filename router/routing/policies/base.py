"""The one interface every routing policy implements, and the request facts they may use."""

from __future__ import annotations

from dataclasses import dataclass, field

from router.backends.backend import Replica
from router.routing.prompt_key import Units


@dataclass(slots=True)
class RouteRequest:
    """What a policy may look at: the model, the prompt in hashable units, and its token estimate."""

    model: str
    units: Units
    prompt_tokens: int
    units_per_token: float = 4.0
    session_id: str | None = None
    hashes: list[int] | None = field(default=None)
    # Exact affinity (router/routing/exact.py), when this request's prompt was tokenized: its
    # block keys per block size, how they were made (only replicas hashing alike match them)
    # and the prompt's token count.
    blocks: dict[int, list[int]] | None = None
    recipe: object = None
    block_tokens: int = 0


@dataclass(slots=True)
class Decision:
    replica: Replica
    outcome: str
    cached_tokens: int = 0


class Policy:
    """Choose one of `candidates` (never empty, all routable) for `request`."""

    name = "base"

    def choose(self, request: RouteRequest, candidates: list[Replica]) -> Decision:
        raise NotImplementedError

    def place(self, request: RouteRequest, replica: Replica, outcome: str) -> Decision:
        """Record a choice made elsewhere (sticky sessions) so the policy's own state stays true."""
        return Decision(replica, outcome)

    def forget(self, replica_id: str) -> None:
        """The replica left the fleet: drop whatever the policy kept about it."""


def rotated(candidates: list[Replica], start: int) -> list[Replica]:
    """The same replicas starting at `start`, so ties are broken evenly rather than by list order."""
    k = start % len(candidates)
    return candidates[k:] + candidates[:k] if k else candidates
