"""Prefix-cache affinity priced as work, and new prefixes placed where the caches have room.

A known prefix (some replica holds at least a quarter of the prompt, as estimated from the chunks
we recently sent it): cost of a replica = prompt tokens it would have to prefill (those not in its
cached prefix) + prefill tokens already queued there + a weight per request ahead of it. A replica
holding the prefix wins while it is not much busier; once a hot prefix has piled work onto it, a
second replica becomes cheaper and picks the prefix up too. Costs are compared in steps of one
queued request; then the emptier cache; then a rendezvous score.

A new prefix goes where it fits. A replica's fill is the share of its KV cache that live prefixes
claim: what the replica reports (`kv_usage`, a fact every router sees, so several routers behind a
TCP balancer place a new prefix alike without talking), or, where higher, what this router has
placed there itself (prefixes it sent since the last poll; see routing/prefix_index.py). A full
cache's report says nothing about which of its blocks anyone still wants, so there only this
router's claims count. Replicas are compared by fill with the prompt added, in sixteenths of the
cache (worst fit: the emptiest first, keeping room everywhere for what each prefix's requests add
around it); then by cost as above (load); then by the rendezvous score of the prompt's first chunk
(a hash that is the same in every process). Without that, a hash alone chose, and four or five
tenants could share one replica's cache and evict each other while another stood empty.

Fleets of more than SCAN_ALL replicas: a decision weighs PROBES replicas that the prompt's first
chunk picks on a consistent-hash ring of the candidates, plus the (at most PROBES least loaded)
replicas holding the prefix, so it costs about the same at 1,000 replicas as at 64 ("power of d
choices"), and every router weighs the same ones.

Exact affinity: where the request's prompt was tokenized (router/routing/exact.py) and a replica
publishes its cache's events, its cached prefix is read from its exact index (the blocks it
actually holds) instead of estimated; replicas that publish nothing (vLLM, SGLang) keep the
estimate, so mixed fleets compare like with like (cached prompt tokens). The estimate's index is
kept for every replica all the same: placement's claims read it, and a replica whose events fall
out of sync falls back to it. The events lag what this router has just sent (a prompt's blocks
are published once the replica schedules it): for RECENT_S after sending a prefix to a replica,
the estimate's match there stands where the index has less, so a burst of one new prefix does not
scatter over replicas that all look empty. In fleets of more than SCAN_ALL replicas the weighed
replicas are still chosen by the estimate's holders.

Memory is bounded per replica: its index holds at most MAX_INDEX_CHUNKS chunks, each about 130
bytes with its share of the claims and holders maps (loadtests/sim_routing.py measures it), so
under 5 MiB per replica whatever its KV cache; a larger cache is tracked by its most recent
32,768 chunks (1M tokens of text).
"""

from __future__ import annotations

import heapq
import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from fleet.control.kv_events import ExactIndex
from router.backends.backend import Replica
from router.routing.policies.base import Decision, Policy, RouteRequest, rotated
from router.routing.prefix_index import PrefixIndex
from router.routing.prompt_key import chunk_hashes, stable_anchor

TEXT_CHUNK_CHARS = 128
ID_CHUNK_TOKENS = 32
DEFAULT_QUEUE_WEIGHT = 64.0
FILL_STEPS = 16
FIT_STEPS = 12  # the rest of a cache is working room: each request's own tokens around its prefix
SATURATED = 0.95  # a reported kv_usage this high is a full LRU cache, not a measure of what is live
KNOWN_SHARE = 0.25  # a prompt this much cached somewhere follows its cache; less, it is placed
SCAN_ALL = 64
PROBES = 16
RING_POINTS = 8
MAX_VIEWS = 16
MAX_INDEX_CHUNKS = 32768
RECENT_S = 2.0  # exact affinity: how long a prefix just sent counts as on its way to the cache
MAX_RECENT = 65536
_MIX = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    """A 64-bit finalizer (splitmix64's): spreads nearby inputs over the whole ring."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


@dataclass(slots=True)
class _Ring:
    """A large candidate list's replicas by id and its consistent-hash ring (RING_POINTS each)."""

    by_id: dict[str, Replica]
    points: list[int]
    owners: list[Replica]

    @classmethod
    def of(cls, candidates: list[Replica]) -> _Ring:
        ring = sorted(
            (_mix(r.salt + v * _MIX & _MASK), r.salt, i)
            for i, r in enumerate(candidates)
            for v in range(RING_POINTS)
        )
        return cls(
            {r.id: r for r in candidates},
            [point for point, _, _ in ring],
            [candidates[i] for _, _, i in ring],
        )

    def probe(self, anchor: int) -> dict[Replica, None]:
        """Up to PROBES distinct replicas for this anchor, the same in every router."""
        picked: dict[Replica, None] = {}
        points, owners = self.points, self.owners
        for i in range(2 * PROBES):
            j = bisect_left(points, _mix(anchor + i * _MIX & _MASK))
            picked[owners[j if j < len(owners) else 0]] = None
            if len(picked) == PROBES:
                break
        return picked


class Placements(Protocol):
    """Where the processes of one router placed new prefixes, by anchor (router.workers)."""

    def get(self, anchor: int) -> int | None: ...  # the replica's salt
    def put(self, anchor: int, salt: int) -> None: ...


class PrefixPolicy(Policy):
    name = "prefix"

    def __init__(
        self,
        text_chunk: int = TEXT_CHUNK_CHARS,
        id_chunk: int = ID_CHUNK_TOKENS,
        queue_weight: float = DEFAULT_QUEUE_WEIGHT,
        placements: Placements | None = None,
    ) -> None:
        """`placements`: shared with this router's other workers; a prefix none of this
        process's replicas holds goes where a worker placed it, as if held there."""
        self.text_chunk = text_chunk
        self.id_chunk = id_chunk
        self.queue_weight = queue_weight
        self.placements = placements
        self._indexes: dict[str, tuple[int, PrefixIndex]] = {}
        self._holders: dict[int, set[str]] = {}  # anchor chunk -> replicas whose index claims it
        self._rings: dict[tuple[Replica, ...], _Ring] = {}
        self._turn = 0
        # (replica id, recipe) -> its exact index if in sync (set by the router with KV events)
        self.exact: Callable[[str, object], ExactIndex | None] | None = None
        self._sent: dict[tuple[str, int], float] = {}  # (replica id, first chunk) -> when

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
        chunks = min(int(capacity * units_per_token / units_per_chunk), MAX_INDEX_CHUNKS)
        if entry is None:
            index = PrefixIndex(chunks)
        else:
            index = entry[1]
            self._drop_holder(replica.id, index.resize(chunks))
        self._indexes[replica.id] = (capacity, index)
        return index

    def _queued(self, replica: Replica) -> float:
        """The work ahead of a new request there: prefill tokens queued, plus a weight per request."""
        return replica.pending_prefill + self.queue_weight * replica.queue_depth()

    def _fill(self, replica: Replica, index: PrefixIndex, prompt_chunks: int) -> int:
        """Sixteenths of the replica's cache claimed once this prompt is there too: as reported,
        unless the report is of a full cache or this router has since placed a sixteenth more."""
        usage = replica.load.kv_usage
        own = index.claimed / index.capacity
        share = own if usage >= SATURATED or own >= usage + 1 / FILL_STEPS else usage
        return int((share + prompt_chunks / index.capacity) * FILL_STEPS)

    def _weighed(self, anchor: int, holders: set[str], candidates: list[Replica]) -> list[Replica]:
        """Every candidate in a small fleet; in a large one, the anchor's probes and the holders."""
        if len(candidates) <= SCAN_ALL:
            return candidates
        key = tuple(candidates)
        ring = self._rings.get(key)
        if ring is None:
            if len(self._rings) >= MAX_VIEWS:
                self._rings.clear()
            ring = self._rings[key] = _Ring.of(candidates)
        picked = ring.probe(anchor)
        held = [r for r in map(ring.by_id.get, holders) if r is not None]
        if len(held) > PROBES:  # a hot prefix on many replicas: weigh its least loaded holders
            held = heapq.nsmallest(PROBES, held, key=self._queued)
        picked.update(dict.fromkeys(held))
        return list(picked)

    def choose(self, request: RouteRequest, candidates: list[Replica]) -> Decision:
        hashes = self._hashes(request)
        step = self.queue_weight if self.queue_weight > 0 else 1.0
        self._turn += 1
        if not hashes:
            # Shorter than one chunk: nothing to match, so the least loaded (in rotation) wins.
            least = candidates[0]
            least_load = -1
            for replica in rotated(candidates, self._turn):
                load = int(self._queued(replica) // step)
                if least_load < 0 or load < least_load:
                    least, least_load = replica, load
            return Decision(least, "prefix_miss")
        unit = self._chunk_size(request)
        per_token = request.units_per_token if isinstance(request.units, str) else 1.0
        tokens_per_chunk = unit / per_token
        prompt_tokens = request.prompt_tokens
        anchor = stable_anchor(request.units, unit)
        holders = self._holders.get(hashes[0], set())
        blocks, exact = request.blocks, self.exact
        now = time.monotonic() if blocks is not None else 0.0
        placed = None  # where another worker placed this prefix, when none here holds it
        if not holders and self.placements is not None:
            placed = self.placements.get(anchor)
            if placed is not None:
                holders = {r.id for r in candidates if r.salt == placed}
        rows = []
        most_cached = 0
        for replica in self._weighed(anchor, holders, candidates):
            index = self.index_for(replica, unit, per_token)
            if placed is not None:
                matched = len(hashes) if replica.id in holders else 0
            else:
                matched = index.match(hashes) if replica.id in holders else 0
            cached = min(int(matched * tokens_per_chunk), prompt_tokens)
            if blocks is not None and exact is not None:
                exact_cached = self._exact_cached(
                    request, blocks, exact(replica.id, request.recipe), cached
                )
                sent = self._sent.get((replica.id, hashes[0]), -RECENT_S)
                if exact_cached >= cached or now - sent >= RECENT_S:
                    cached = exact_cached
            cost = prompt_tokens - cached + self._queued(replica)
            fill = self._fill(replica, index, len(hashes))
            score = ((anchor ^ replica.salt) * _MIX) & _MASK
            rows.append((cost, fill, -score, matched, cached, replica, index))
            most_cached = max(most_cached, cached)
        if most_cached < KNOWN_SHARE * prompt_tokens:
            best = min(rows, key=lambda row: (row[1], int(row[0] // step), row[2]))
        else:
            # Copying a cached prefix to a replica with no room to spare evicts about as many
            # live tokens there, to be prefilled again later: that too is work the move costs.
            best = min(
                rows,
                key=lambda row: (
                    int((row[0] + (most_cached - row[4] if row[1] > FIT_STEPS else 0)) // step),
                    row[1],
                    row[2],
                ),
            )
        _, _, _, matched, cached, replica, index = best
        self._record(replica.id, index, hashes, matched)
        if blocks is not None:
            if len(self._sent) >= MAX_RECENT:
                self._sent = {k: t for k, t in self._sent.items() if now - t < RECENT_S}
            self._sent[(replica.id, hashes[0])] = now
        if most_cached == 0:
            outcome = "prefix_miss"
            if self.placements is not None:
                self.placements.put(anchor, replica.salt)
        elif cached == most_cached:
            outcome = "prefix_hit"
        else:
            outcome = "load_fallback"
        return Decision(replica, outcome, cached)

    @staticmethod
    def _exact_cached(
        request: RouteRequest, blocks: dict[int, list[int]], index: ExactIndex | None, estimate: int
    ) -> int:
        """Prompt tokens the replica holds, from its exact index (the estimate where it has none).
        The prompt's last token is always computed, so only blocks before it count."""
        if index is None:
            return estimate
        keys = blocks.get(index.block_size)
        if keys is None:
            return estimate
        usable = (request.block_tokens - 1) // index.block_size
        return index.match(keys, usable) * index.block_size

    def place(self, request: RouteRequest, replica: Replica, outcome: str) -> Decision:
        hashes = self._hashes(request)
        unit = self._chunk_size(request)
        per_token = request.units_per_token if isinstance(request.units, str) else 1.0
        index = self.index_for(replica, unit, per_token)
        matched = index.match(hashes)
        cached = min(int(matched * unit / per_token), request.prompt_tokens)
        if hashes:
            self._record(replica.id, index, hashes, matched)
        return Decision(replica, outcome, cached)

    def _record(self, replica_id: str, index: PrefixIndex, hashes: list[int], matched: int) -> None:
        self._holders.setdefault(hashes[0], set()).add(replica_id)
        self._drop_holder(replica_id, index.insert(hashes, matched))

    def _drop_holder(self, replica_id: str, anchors: list[int]) -> None:
        holders = self._holders
        for anchor in anchors:
            ids = holders.get(anchor)
            if ids is not None:
                ids.discard(replica_id)
                if not ids:
                    del holders[anchor]

    def forget(self, replica_id: str) -> None:
        entry = self._indexes.pop(replica_id, None)
        if entry is not None:
            self._drop_holder(replica_id, list(entry[1].anchors()))
        self._rings.clear()

    def indexed_chunks(self, replica_id: str) -> int:
        entry = self._indexes.get(replica_id)
        return len(entry[1]) if entry else 0
