"""A fleet of modelled replicas that drives the router's real policy code, with no processes.

Each `SimReplica` pairs the router's own `Replica` with a model of what the replica does with a
request: a prefix cache of 16-token blocks keyed by chained hashes and evicted least recently used
(vLLM's and fleetserve's automatic prefix caching: a finished request's blocks stay cached until
something else needs the room, tail blocks first), and a single FIFO server whose service time is
the prefill it could not take from the cache plus a fixed decode. Its `LoadReport` is written
from the model the way `tests/support/fake_replica.py` reports `/load`: running, waiting, cached
blocks over capacity as `kv_usage`, and the prefix-cache token counters.

`SimFleet.route` does what router/proxy.py does around `Policy.choose` (in-flight count and
pending prefill up while a request is out, down when it ends). Shared by
tests/router/test_placement.py and loadtests/sim_routing.py.
"""

from __future__ import annotations

import heapq
import random
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from router.backends.backend import LoadReport, Replica
from router.routing.policies import Decision, Policy, RouteRequest
from router.routing.prompt_key import chat_units

CHARS_PER_TOKEN = 4
BLOCK_TOKENS = 16
MODEL = "m"


class BlockCache:
    """Chained-hash blocks of a prompt, LRU-evicted at capacity; counts tokens looked up and hit."""

    def __init__(self, capacity_blocks: int, block_tokens: int = BLOCK_TOKENS) -> None:
        self.capacity = capacity_blocks
        self.width = block_tokens * CHARS_PER_TOKEN
        self.block_tokens = block_tokens
        self.blocks: OrderedDict[int, None] = OrderedDict()
        self.queries = 0
        self.hits = 0

    def serve(self, units: str) -> int:
        """Tokens of `units` found cached; then its blocks become the most recent, head last."""
        width, blocks = self.width, self.blocks
        chain, hashes = 0, []
        for start in range(0, len(units) - width + 1, width):
            chain = hash((chain, units[start : start + width]))
            hashes.append(chain)
        cached = 0
        for h in hashes:
            if h not in blocks:
                break
            cached += 1
        for h in reversed(hashes):
            blocks[h] = None
            blocks.move_to_end(h)
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)
        hit_tokens = cached * self.block_tokens
        self.queries += len(units) // CHARS_PER_TOKEN
        self.hits += hit_tokens
        return hit_tokens


@dataclass(eq=False)
class SimReplica:
    replica: Replica
    cache: BlockCache
    running: int = 0
    waiting: int = 0
    queue: deque[Routed] = field(default_factory=deque)

    def report(self, now: float) -> None:
        """What the replica's `/load` would say now (the router polls it; here, when told)."""
        self.replica.load = LoadReport(
            running=self.running,
            waiting=self.waiting,
            kv_usage=len(self.cache.blocks) / self.cache.capacity,
            kv_capacity_tokens=self.cache.capacity * self.cache.block_tokens,
            prefix_cache_queries=self.cache.queries,
            prefix_cache_hits=self.cache.hits,
            updated_at=now,
        )


@dataclass
class Routed:
    """One request out at a replica: what the proxy holds on it until the answer ends."""

    sim: SimReplica
    request: RouteRequest
    decision: Decision
    prefill: int


@dataclass
class FleetResult:
    queries: int = 0
    hits: int = 0
    decisions: dict[str, int] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class SimFleet:
    def __init__(
        self,
        ids: Iterable[str],
        capacity_tokens: int | list[int],
        policy: Policy,
        block_tokens: int = BLOCK_TOKENS,
    ) -> None:
        """Replicas named `ids`, with KV caches of `capacity_tokens` each (or one per replica)."""
        ids = list(ids)
        if isinstance(capacity_tokens, int):
            capacity_tokens = [capacity_tokens] * len(ids)
        self.policy = policy
        self.replicas = [
            SimReplica(
                Replica(rid, f"http://{rid}:1", model=MODEL),
                BlockCache(capacity // block_tokens, block_tokens),
            )
            for rid, capacity in zip(ids, capacity_tokens, strict=True)
        ]
        self.now = 0.0
        self._seq = 0
        self.report_all()

    def seq(self) -> int:
        """A strictly increasing number: orders simultaneous events by when they were made."""
        self._seq += 1
        return self._seq

    def report_all(self) -> None:
        for sim in self.replicas:
            sim.report(self.now)

    def candidates(self) -> list[Replica]:
        return [sim.replica for sim in self.replicas]

    def route(self, units: str, policy: Policy | None = None) -> Routed:
        """Choose (with `policy`, default the fleet's) and take the request out as the proxy does."""
        request = RouteRequest(MODEL, units, len(units) // CHARS_PER_TOKEN, float(CHARS_PER_TOKEN))
        decision = (policy or self.policy).choose(request, self.candidates())
        sim = next(s for s in self.replicas if s.replica is decision.replica)
        prefill = max(request.prompt_tokens - decision.cached_tokens, 0)
        sim.replica.in_flight += 1
        sim.replica.pending_prefill += prefill
        return Routed(sim, request, decision, prefill)

    def answered(self, routed: Routed) -> None:
        """The first token is out: its prefill no longer waits there (the proxy's `_answered`)."""
        routed.sim.replica.pending_prefill -= routed.prefill
        routed.prefill = 0

    def release(self, routed: Routed) -> None:
        replica = routed.sim.replica
        replica.in_flight -= 1
        replica.pending_prefill -= routed.prefill
        routed.prefill = 0

    def result(self, decisions: dict[str, int]) -> FleetResult:
        return FleetResult(
            sum(s.cache.queries for s in self.replicas),
            sum(s.cache.hits for s in self.replicas),
            decisions,
        )


def run_sequential(
    fleet: SimFleet, prompts: list[str], policies: list[Policy] | None = None
) -> FleetResult:
    """One request at a time, each answered (and every replica's report fresh) before the next;
    with several `policies` (routers), request i goes to router i mod n."""
    decisions: dict[str, int] = {}
    for i, units in enumerate(prompts):
        policy = policies[i % len(policies)] if policies else None
        routed = fleet.route(units, policy)
        routed.sim.cache.serve(units)
        fleet.release(routed)
        fleet.report_all()
        decisions[routed.decision.outcome] = decisions.get(routed.decision.outcome, 0) + 1
    return fleet.result(decisions)


def run_concurrent(
    fleet: SimFleet,
    prompts: list[str],
    concurrency: int,
    report_every_s: float = 0.25,
    us_per_prefill_token: float = 100.0,
    decode_s: float = 0.05,
    slots: int = 4,
) -> FleetResult:
    """`concurrency` clients in a closed loop: each sends its next prompt when its last answer
    ends. A replica serves up to `slots` requests at once (continuous batching), the rest wait in
    FIFO order; reports refresh every `report_every_s` of simulated time (the router's poll), so
    a burst is routed on stale reports."""
    decisions: dict[str, int] = {}
    events: list[tuple[float, int, bool, Routed]] = []  # (when, order, answer ends?, request)
    pending = iter(prompts)
    next_report = report_every_s

    def start(routed: Routed) -> None:
        sim = routed.sim
        sim.running += 1
        uncached = routed.request.prompt_tokens - sim.cache.serve(routed.request.units)  # type: ignore[arg-type]
        answered = fleet.now + uncached * us_per_prefill_token * 1e-6
        heapq.heappush(events, (answered, fleet.seq(), False, routed))
        heapq.heappush(events, (answered + decode_s, fleet.seq(), True, routed))

    def send() -> None:
        units = next(pending, None)
        if units is None:
            return
        routed = fleet.route(units)
        decisions[routed.decision.outcome] = decisions.get(routed.decision.outcome, 0) + 1
        if routed.sim.running >= slots:
            routed.sim.queue.append(routed)
            routed.sim.waiting += 1
        else:
            start(routed)

    for _ in range(concurrency):
        send()
    while events:
        fleet.now, _, ends, routed = heapq.heappop(events)
        while fleet.now >= next_report:
            fleet.report_all()
            next_report += report_every_s
        if not ends:
            fleet.answered(routed)
            continue
        sim = routed.sim
        sim.running -= 1
        fleet.release(routed)
        if sim.queue:
            sim.waiting -= 1
            start(sim.queue.popleft())
        send()
    return fleet.result(decisions)


@dataclass(frozen=True)
class Tenant:
    system: str  # the shared system prompt, a whole number of router chunks and cache blocks


def make_tenants(rng: random.Random, count: int, tokens: list[int]) -> list[Tenant]:
    """`count` tenants whose system prompts have sizes drawn from `tokens` (multiples of 32)."""
    out = []
    for t in range(count):
        size = rng.choice(tokens)
        body = rng.randbytes(size * CHARS_PER_TOKEN // 2).hex()
        out.append(Tenant(f"tenant {t:06d} " + body[14:]))
    return out


def tenant_prompts(
    rng: random.Random, tenants: list[Tenant], per_tenant: int, question_tokens: int
) -> tuple[list[str], list[int]]:
    """Each tenant's `per_tenant` chats (its system prompt + a unique question), interleaved in a
    random order; with each prompt, how many of its tokens any router could at best find cached:
    its system prompt's, except on the tenant's first request."""
    order = [t for t in range(len(tenants)) for _ in range(per_tenant)]
    rng.shuffle(order)
    seen: set[int] = set()
    prompts, best = [], []
    for t in order:
        question = rng.randbytes(question_tokens * CHARS_PER_TOKEN // 2).hex()
        units = chat_units(
            [
                {"role": "system", "content": tenants[t].system},
                {"role": "user", "content": question},
            ]
        )
        prompts.append(units)
        best.append(cacheable_tokens(units, tenants[t]) if t in seen else 0)
        seen.add(t)
    return prompts, best


def cacheable_tokens(units: str, tenant: Tenant) -> int:
    """Whole cache blocks of `units` that lie inside the tenant's shared rendering."""
    shared = len(chat_units([{"role": "system", "content": tenant.system}]))
    width = BLOCK_TOKENS * CHARS_PER_TOKEN
    return (shared // width) * BLOCK_TOKENS


def hit_limit(prompts: list[str], best: list[int]) -> float:
    """The workload's limit: the best hit rate any placement could reach on these prompts."""
    return sum(best) / sum(len(p) // CHARS_PER_TOKEN for p in prompts)
