"""What every exchange shares: the replicas, the policy that picks one, the upstream client, the
watchdog, the retry budget, and the one place exchanges report their end to.

A handler hands a plan (router.plan) to `Proxy.start`, which builds the request's exchange
(router.exchange) and sends it.
"""

from __future__ import annotations

from collections.abc import Callable

from router.backends.pool import ReplicaPool
from router.backends.retry_budget import RetryBudget
from router.backends.watchdog import Watchdog
from router.exchange import Exchange
from router.http.connection import ClientConnection
from router.http.upstream import HttpClient
from router.metrics import RouterMetrics
from router.plan import Plan
from router.routing.policies import Policy
from router.routing.policies.least_load import LeastLoadPolicy


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

    def start(self, plan: Plan, conn: ClientConnection, started: float) -> Exchange:
        """Carry `plan` out for the client on `conn`: the exchange answers it from callbacks."""
        ex = Exchange(self, plan, conn, started)
        ex.start()
        return ex

    async def close(self) -> None:
        await self.watchdog.stop()
        self.client.close()
