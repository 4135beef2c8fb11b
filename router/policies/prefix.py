"""Prefix-cache affinity priced as work: send a prompt where it costs the least to serve.

Cost of a replica = prompt tokens it would have to prefill (those not in its cached prefix, as
estimated from the chunks we recently sent it) + prefill tokens already queued there + a weight
per request ahead of it. A replica holding the prompt's prefix wins while it is not much busier;
once a hot prefix has piled work onto it, a second replica becomes cheaper and picks the prefix up
too. With no match anywhere the cost reduces to least-load.

Costs are compared in steps of one queued request; within a step, a rendezvous score of the
prompt's first chunk (a hash that is the same in every process) decides, so several routers behind
a TCP balancer, each with its own index, still send a new prefix to the same replica.
"""

from __future__ import annotations

from router.policies.base import Decision, Policy, RouteRequest, rotated
from router.prefix_index import PrefixIndex
from router.prompt_key import chunk_hashes, stable_anchor
from router.replica import Replica

TEXT_CHUNK_CHARS = 128
ID_CHUNK_TOKENS = 32
DEFAULT_QUEUE_WEIGHT = 64.0
_MIX = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1


class PrefixPolicy(Policy):
    name = "prefix"

    def __init__(
        self,
        text_chunk: int = TEXT_CHUNK_CHARS,
        id_chunk: int = ID_CHUNK_TOKENS,
        queue_weight: float = DEFAULT_QUEUE_WEIGHT,
    ) -> None:
        self.text_chunk = text_chunk
        self.id_chunk = id_chunk
        self.queue_weight = queue_weight
        self._indexes: dict[str, tuple[int, PrefixIndex]] = {}
        self._turn = 0

    def _chunk_size(self, request: RouteRequest) -> int:
        return self.text_chunk if isinstance(request.units, str) else self.id_chunk

    def _hashes(self, request: RouteRequest) -> list[int]:
        if request.hashes is None:
            request.hashes = chunk_hashes(request.units, self._chunk_size(request))
        return request.hashes

    def index_for(
        self, replica: Replica, units_per_chunk: int, units_per_token: float
    ) -> PrefixIndex:
        """The replica's index, sized to hold about as many prompt chunks as its KV cache."""
        capacity = replica.capacity_tokens()
        entry = self._indexes.get(replica.id)
        if entry is not None and entry[0] == capacity:
            return entry[1]
        chunks = int(capacity * units_per_token / units_per_chunk)
        if entry is None:
            index = PrefixIndex(chunks)
        else:
            index = entry[1]
            index.resize(chunks)
        self._indexes[replica.id] = (capacity, index)
        return index

    def _queued(self, replica: Replica) -> float:
        """The work ahead of a new request there: prefill tokens queued, plus a weight per request."""
        return replica.pending_prefill + self.queue_weight * replica.queue_depth()

    def choose(self, request: RouteRequest, candidates: list[Replica]) -> Decision:
        hashes = self._hashes(request)
        step = self.queue_weight if self.queue_weight > 0 else 1.0
        self._turn += 1
        if not hashes:
            # Shorter than one chunk: nothing to match, so the least loaded (in rotation) wins.
            best = candidates[0]
            best_cost = -1
            for replica in rotated(candidates, self._turn):
                cost = int(self._queued(replica) // step)
                if best_cost < 0 or cost < best_cost:
                    best, best_cost = replica, cost
            return Decision(best, "prefix_miss")
        unit = self._chunk_size(request)
        per_token = request.units_per_token if isinstance(request.units, str) else 1.0
        tokens_per_chunk = unit / per_token
        prompt_tokens = request.prompt_tokens
        anchor = stable_anchor(request.units, unit)
        best: Replica | None = None
        best_key = (0, 0)
        best_cached = 0
        best_index: PrefixIndex | None = None
        most_matched = 0
        chosen_matched = 0
        for replica in candidates:  # the anchor's rendezvous score breaks ties, not list order
            index = self.index_for(replica, unit, per_token)
            matched = index.match(hashes)
            cached = min(int(matched * tokens_per_chunk), prompt_tokens)
            cost = prompt_tokens - cached + self._queued(replica)
            score = ((anchor ^ replica.salt) * _MIX) & _MASK
            key = (int(cost // step), -score)
            most_matched = max(most_matched, matched)
            if best is None or key < best_key:
                best, best_key, best_cached, best_index = replica, key, cached, index
                chosen_matched = matched
        assert best is not None and best_index is not None
        best_index.insert(hashes)
        if most_matched == 0:
            outcome = "prefix_miss"
        elif chosen_matched == most_matched:
            outcome = "prefix_hit"
        else:
            outcome = "load_fallback"
        return Decision(best, outcome, best_cached)

    def place(self, request: RouteRequest, replica: Replica, outcome: str) -> Decision:
        hashes = self._hashes(request)
        unit = self._chunk_size(request)
        per_token = request.units_per_token if isinstance(request.units, str) else 1.0
        index = self.index_for(replica, unit, per_token)
        cached = min(int(index.match(hashes) * unit / per_token), request.prompt_tokens)
        if hashes:
            index.insert(hashes)
        return Decision(replica, outcome, cached)

    def forget(self, replica_id: str) -> None:
        self._indexes.pop(replica_id, None)

    def indexed_chunks(self, replica_id: str) -> int:
        entry = self._indexes.get(replica_id)
        return len(entry[1]) if entry else 0
