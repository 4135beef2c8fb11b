"""The router queue: a request that no replica can take now waits here for one, instead of a 503.

"Can take it now" is the router's own count of requests in flight on a replica against
`replica_max_in_flight` (plus being routable: healthy, not draining, breaker closed). The count is
exact and moves the moment an exchange ends, so a freed slot is handed on at once; the replicas'
own load reports arrive once per poll (1 s by default) and say nothing of the burst sent since,
so they would both overfill a replica and hold back requests it has room for. This is the
per-upstream cap of Envoy's circuit breakers and of SGLang's gateway (`--max-concurrent-requests`
with its queue); with several routers, give each the replicas' `--max-num-seqs` divided among them.

Waiting requests sit in per-key FIFO sub-queues served round-robin (router.queueing.fair_queue),
so one key's burst waits behind its own requests. A fleet key's limits (`max_concurrent`
included) are taken before a request queues, so they still apply. Nothing polls per request: the
queue is served when a slot frees (an exchange closes its attempt) and when the pool's view
changes (a probe or load report, membership, a drain or undrain). Each waiting request carries
its deadline in the exchange's `deadline`, which the watchdog already scans; past it, 503 with
Retry-After. A full queue (or a key's full share) is 429 with Retry-After: back off, like a rate
limit. Neither counts against any replica's health.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fleet.control.errors import APIError
from router.metrics import RouterMetrics
from router.queueing.fair_queue import FairQueue
from router.routing.pick import NoReplica
from router.routing.policies import Decision

if TYPE_CHECKING:
    from router.exchange import Exchange


def retry_after() -> dict[str, str]:
    """Fresh each time: an error's headers are its own."""
    return {"Retry-After": "1"}


@dataclass
class QueueSettings:
    size: int = 1024  # requests waiting in all; 0: a 503 at once, as before the queue
    timeout_s: float = 30.0
    per_key: int = 0  # waiting requests one key may have; 0: only `size` bounds it
    replica_max_in_flight: int = 0  # this router's requests on one replica at a time; 0: no cap


class RequestQueue:
    def __init__(self, settings: QueueSettings, metrics: RouterMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.waiting: FairQueue[Exchange] = FairQueue()
        self.depth = 0  # len(waiting), as a plain attribute the data path reads for free
        self._served_soon = False

    def hold(self, ex: Exchange) -> None:
        """`ex` found no replica with room: queue it, or answer it (no queue, or a full one)."""
        settings = self.settings
        if not settings.size:
            ex.refuse(
                APIError(
                    503,
                    f"No replica is available for model '{ex.plan.model}'; retry shortly.",
                    code="no_replica_available",
                    headers=retry_after(),
                )
            )
            return
        per_key = settings.per_key
        if self.depth >= settings.size or (per_key and self.waiting.count(ex.key) >= per_key):
            self.metrics.queue_rejected("full")
            ex.refuse(
                APIError(
                    429,
                    "Every replica is busy and the router's queue is full"
                    f"{' for this key' if self.depth < settings.size else ''}; retry shortly.",
                    code="queue_full",
                    headers=retry_after(),
                )
            )
            return
        now = time.monotonic()
        ex.queued_at = now
        ex.deadline = now + settings.timeout_s
        if ex.trace is not None:
            ex.trace.queue_entered(self.depth)
        self.waiting.push(ex.key, ex)
        self.depth += 1

    def wake(self) -> None:
        """A replica may have room now: serve the queue once the current callback is done (one
        pass however many slots freed in it)."""
        if self.depth and not self._served_soon:
            self._served_soon = True
            asyncio.get_running_loop().call_soon(self._serve)

    def _serve(self) -> None:
        """Send waiting requests, keys taking turns, until no key's oldest one can go. A model
        found full stays full for the rest of the pass (sending only takes room)."""
        self._served_soon = False
        waiting = self.waiting
        full: set[str] = set()
        misses = 0
        now = time.monotonic()
        while waiting and misses < waiting.keys:
            ex = waiting.peek()
            decision = self._place(ex, full)
            if decision is None:
                waiting.skip()
                misses += 1
                continue
            waiting.pop()
            self.depth -= 1
            misses = 0
            self.metrics.queue_waited(now - ex.queued_at)
            ex.queued_at = 0.0
            if ex.trace is not None:
                ex.trace.queue_left("dispatched")
            ex.dispatch(decision)

    @staticmethod
    def _place(ex: Exchange, full: set[str]) -> Decision | None:
        model = ex.plan.model
        if model in full:
            return None
        try:
            return ex.pick()
        except NoReplica:
            full.add(model)
            return None

    def abandon(self, ex: Exchange) -> None:
        """Its client left while it waited: it takes no slot, and its key's hold goes back when
        the exchange ends (router.app)."""
        self._leave(ex, "client_left")

    def expire(self, ex: Exchange) -> None:
        self._leave(ex, "timeout")
        ex.refuse(
            APIError(
                503,
                f"No replica could take this request within {self.settings.timeout_s:g} s; "
                "retry shortly.",
                code="queue_timeout",
                headers=retry_after(),
            )
        )

    def _leave(self, ex: Exchange, reason: str) -> None:
        if self.waiting.remove(ex.key, ex):
            self.depth -= 1
            self.metrics.queue_rejected(reason)
        ex.queued_at = 0.0
        if ex.trace is not None:
            ex.trace.queue_left(reason)
