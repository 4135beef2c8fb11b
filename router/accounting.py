"""The end of every proxied request, in one place: count it, learn from its usage, settle its key.

Every exchange reports its end here (`ended`), and so does a request refused before it had one
(`refused`). Usage comes from the replica's own answer: a whole answer's `usage`
(router.usage) or the usage frame a stream's tap picked out (router.usage_tap). A fleet key's
request is then settled against its key's limits (`settle`), after the answer is out: queued
with the tick's other settlements, not waited for (fleet.control.keys.batch).

Each end is also the request's access log line (logger `router.access`, at debug level: a line
per request costs more than the rest of the router's work on it) and, with tracing on, the end
of its trace (router.tracing).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from fleet.control.keys import Ticket
from router.auth import Gate
from router.backends.pool import ReplicaPool
from router.exchange import Exchange
from router.metrics import RouterMetrics
from router.plan import INFERENCE_KINDS, Plan
from router.routing.tokens import TokenEstimator
from router.usage import Usage, usage_of_answer

if TYPE_CHECKING:
    from router.tracing import RequestTrace

access = logging.getLogger("router.access")

_STATUS_TEXT: dict[int, str] = {}


def status_text(status: int) -> str:
    text = _STATUS_TEXT.get(status)
    if text is None:
        text = _STATUS_TEXT[status] = str(status)
    return text


class Accounting:
    def __init__(
        self, pool: ReplicaPool, metrics: RouterMetrics, tokens: TokenEstimator, gate: Gate
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.tokens = tokens
        self.gate = gate

    def ended(self, ex: Exchange) -> None:
        """Every exchange's last word: learn the token ratio from sampled answers, count it."""
        plan = ex.plan
        if plan.learn and ex.status == 200:
            self._learn(plan, usage_of(ex))
        model = plan.model if plan.model in self.pool.by_model else "unknown"
        took = time.perf_counter() - ex.started
        self.metrics.request_done(
            plan.route, model, ex.replica_id or "none", status_text(ex.status), took
        )
        if access.isEnabledFor(logging.DEBUG):
            log_access(plan.route, model, ex.replica_id, ex.status, took, ex.conn.request_id)
        if ex.trace is not None:
            ex.trace.ended(ex.status, plan.model, ex.replica_id, usage_of(ex))
        if ex.ticket is not None:
            self.settle(ex, ex.ticket)

    def refused(
        self,
        route: str,
        model: str,
        status: int,
        started: float,
        request_id: bytes,
        trace: RequestTrace | None = None,
    ) -> None:
        """A request that ended before it had an exchange: refused, or its client left while
        its key was checked."""
        model = model if model in self.pool.by_model else "unknown"
        took = time.perf_counter() - started
        self.metrics.request_done(route, model, "none", status_text(status), took)
        if access.isEnabledFor(logging.DEBUG):
            log_access(route, model, "", status, took, request_id)
        if trace is not None:
            trace.ended(status, model if model != "unknown" else "", "", None)

    def settle(self, ex: Exchange, ticket: Ticket) -> None:
        """Charge what the replica reports it used. A stream cut short (by the client, a stalled
        reader or the replica) has no report: charge the prompt's estimate and the chunks that
        reached the client. Nothing is charged when no answer reached the client."""
        plan = ex.plan
        if (
            not ex.delivered
            or plan.route not in INFERENCE_KINDS
            or (ex.status != 200 and not ex.streamed)
        ):
            self.gate.settle_soon(ticket, 0, 0)
            return
        usage = usage_of(ex)
        if usage is not None:
            self._learn(plan, usage, ticket.key_id)
            prompt = int(usage.get("prompt_tokens") or 0)
            completion = int(usage.get("completion_tokens") or 0)
        else:
            prompt = self.tokens.estimate(plan.model, plan.routing.units, ticket.key_id)
            completion = plan.tap.frames if plan.tap is not None else 0
        self.gate.settle_soon(ticket, prompt, completion)

    def release(self, ticket: Ticket) -> None:
        """Give back a key's hold when its request never reached a replica."""
        self.gate.settle_soon(ticket, 0, 0)

    def _learn(self, plan: Plan, usage: Usage | None, key: str | None = None) -> None:
        if usage is not None and isinstance(usage.get("prompt_tokens"), int):
            self.tokens.observe(plan.model, plan.routing.units, usage["prompt_tokens"], key)


def log_access(
    route: str, model: str, replica_id: str, status: int, took_s: float, request_id: bytes
) -> None:
    access.debug(
        "%s model=%s replica=%s status=%d %.1f ms request=%s",
        route, model, replica_id or "-", status, took_s * 1000, request_id.decode("latin-1"),
    )  # fmt: skip


def usage_of(ex: Exchange) -> Usage | None:
    """The replica's report of what the answer used, if it sent one."""
    if ex.plan.stream:
        tap = ex.plan.tap
        return tap.usage if tap is not None else None
    if ex.status != 200 or not ex.body_out:
        return None
    return usage_of_answer(ex.body_out)
