"""What every exchange shares: the replicas, the policy that picks one, the upstream client, the
watchdog, the retry budget, the queue requests wait in when no replica has room, and the one
place exchanges report their end to.

A handler hands a plan (router.plan) to `Proxy.start`, which builds the request's exchange
(router.exchange) and sends it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fleet.control.keys import Ticket
from router.backends.pool import ReplicaPool
from router.backends.retry_budget import RetryBudget
from router.backends.watchdog import Watchdog
from router.exchange import Exchange
from router.http.connection import ClientConnection
from router.http.upstream import HttpClient
from router.metrics import RouterMetrics
from router.plan import Plan
from router.queueing.request_queue import QueueSettings, RequestQueue
from router.routing.policies import Policy
from router.routing.policies.least_load import LeastLoadPolicy

if TYPE_CHECKING:
    from router.tracing import RequestTrace


class Proxy:
    def __init__(
        self,
        pool: ReplicaPool,
        policy: Policy,
        metrics: RouterMetrics,
        on_end: Callable[[Exchange], None],
        *,
        connect_timeout_s: float,
        ttfb_timeout_s: float,
        idle_timeout_s: float,
        max_attempts: int,
        budget: RetryBudget,
        max_answer_bytes: int = 64 * 1024 * 1024,
        queue: QueueSettings | None = None,
    ) -> None:
        """`on_end` hears every exchange's end, once (router.accounting)."""
        self.pool = pool
        self.policy = policy
        # Embeddings keep no prefix cache worth coming back to: least load, whatever `policy` is.
        self.embeddings_policy = LeastLoadPolicy()
        self.metrics = metrics
        self.on_end = on_end
        headers = [("Content-Type", "application/json")]  # keys per replica: Replica.request_host
        self.client = HttpClient(
            connect_timeout_s, headers, max_answer_bytes=max_answer_bytes, tls=pool.tls
        )
        self.ttfb_timeout_s = ttfb_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.max_attempts = max_attempts
        self.budget = budget
        self.watchdog = Watchdog()
        self.queue = RequestQueue(queue or QueueSettings(), metrics)
        self.replica_max_in_flight = self.queue.settings.replica_max_in_flight

    def start(
        self,
        plan: Plan,
        conn: ClientConnection,
        started: float,
        request_id: bytes,
        traceparent: bytes | None = None,
        trace: RequestTrace | None = None,
        key: str = "",
        ticket: Ticket | None = None,
    ) -> Exchange:
        """Carry `plan` out for the client on `conn`: the exchange answers it from callbacks.
        The request id goes to the replica; so does the client's traceparent, unless the router
        traces (then each attempt sends its own, router.tracing). `key` names the caller for the
        queue's fairness (a fleet key's id, a static key); a fleet key's `ticket` is settled
        when the exchange ends (router.accounting)."""
        forward = b"x-request-id: %s\r\n" % request_id
        if traceparent is not None and trace is None:
            forward += b"traceparent: %s\r\n" % traceparent
        ex = Exchange(self, plan, conn, started, forward, trace)
        if key:
            ex.key = key
        if ticket is not None:
            ex.ticket = ticket
        ex.start()
        return ex

    async def close(self) -> None:
        await self.watchdog.stop()
        self.client.close()
