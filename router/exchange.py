"""The data path: one client request sent to a replica and its answer back to the client.

An `Exchange` is that request's state machine, built from the request's plan (router.plan) by
`Proxy.start`; it asks the policy for a replica per attempt and reports its end, once, to
accounting (router.accounting). Nothing awaits on the way: the client's connection
(router.http.connection), the replica's connection (router.http.upstream) and the watchdog call
the exchange's methods as things happen, and each method moves it on. This keeps the CPU per
proxied request near that of a bare proxy (see router.http.upstream for the measurement).

    start ─ _attempt ─ (replica) ─┬─ upstream_done ────────── _send_whole ─ _end
                                  └─ upstream_body (first) ── _start_stream
                                       ... upstream_body ... upstream_done ─ _end_stream ─ _end

A request may be retried on a different replica, within the retry budget, only while nothing has
reached the client: connection failures, 429/500/502/503/504 answers, or a stream that ends before
its first byte. A 500 counts against the replica like a 502 (Envoy's `retry_on: 5xx` and outlier
detection): answered at once, it would otherwise draw most requests under least-load. No first
byte within the TTFB timeout is a 504 and no retry: the replica accepted the request and is still
at it, so the request (not the replica) is the likely cause, and sending it
on would let one request stall every replica of its model; a replica that is really stuck fails
its health probes. The first attempt runs on callbacks alone;
after a failure, a task runs tenacity's retry loop, each attempt awaiting the outcome of the same
callback machinery. Once the first byte is out, an upstream failure becomes one SSE error event
and `[DONE]`. The client leaving aborts the upstream request at once and releases every counter;
so does a client that stops reading for the idle timeout (its connection is cut).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_none

from fleet.control.errors import APIError
from router.backends.backend import Replica
from router.http.connection import ClientConnection
from router.http.upstream import AnswerTooLarge, UpstreamConnection
from router.plan import EMBEDDINGS, TASK_OF_ROUTE, Plan
from router.routing.policies import Decision
from router.routing.sessions import sticky_replica

if TYPE_CHECKING:
    from router.proxy import Proxy

log = logging.getLogger("router.proxy")

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
NOT_REPLICA_FAULTS = frozenset({429})
CLIENT_CLOSED = 499  # nginx's "client closed request": the client left before its answer ended


class NoReplica(Exception):
    """No routable replica is left for this request (none at all, or all already tried)."""


class Retryable(Exception):
    """This attempt failed before anything reached the client; another replica may serve it."""

    def __init__(self, reason: str, status: int = 502, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.detail = detail


class Exchange:
    """One client request on its way through the router: its plan carried out, and what it
    leaves behind for accounting (`status`, `replica_id`, what was delivered, the answer).

    Most fields start at their class-level defaults and are set on the instance only when a
    request needs them: this object is built for every request."""

    tried: tuple[str, ...] = ()  # replica ids: membership may re-create a replica's object
    replica: Replica | None = None  # of the attempt in progress
    replica_id = ""
    prefill = 0
    judged = False
    upstream: UpstreamConnection | None = None
    status = 0
    head_sent = False
    delivered = False  # the replica's answer (whole or the start of a stream) reached the client
    streamed = False
    client_stalled = False  # the client stopped reading; `deadline` is its grace
    body_out = b""
    deadline = 0.0
    idle_phase = False
    ended = False
    waiter: asyncio.Future | None = None
    end_waiter: asyncio.Future | None = None
    retrying: asyncio.Task | None = None

    def __init__(self, proxy: Proxy, plan: Plan, conn: ClientConnection, started: float) -> None:
        self.proxy = proxy
        self.plan = plan
        self.conn = conn
        self.started = started  # time.perf_counter() when the request was read
        conn.on_disconnect = self.client_left

    # -- starting and ending

    def start(self) -> None:
        """Send the request to a replica; the rest happens in the callbacks below."""
        self.proxy.budget.deposit()
        self.proxy.watchdog.watched.add(self)
        try:
            self._attempt()
        except NoReplica:
            self.refuse(
                APIError(
                    503,
                    f"No replica is available for model '{self.plan.model}'; retry shortly.",
                    code="no_replica_available",
                    headers={"Retry-After": "1"},
                )
            )

    def refuse(self, err: APIError) -> None:
        """Answer with an error (if nothing was sent yet) and end."""
        if self.ended:
            return
        self.status = err.status
        if not self.head_sent:
            self.head_sent = True
            self.conn.respond_error(err)
        self._end()

    async def wait_end(self) -> None:
        """For handlers that have more to do once the answer is out (settling a fleet key)."""
        if not self.ended:
            self.end_waiter = asyncio.get_running_loop().create_future()
            await self.end_waiter

    def _end(self) -> None:
        """Report the end, once, to the one place that accounts for it (router.accounting)."""
        if self.ended:
            return
        self.ended = True
        self.deadline = 0.0
        self.proxy.watchdog.watched.discard(self)
        self.proxy.on_end(self)
        if self.end_waiter is not None and not self.end_waiter.done():
            self.end_waiter.set_result(None)

    # -- one attempt at one replica

    def _attempt(self) -> None:
        plan = self.plan
        decision = self._pick(plan) if plan.pinned is None else Decision(plan.pinned, "pinned")
        replica = self.replica = decision.replica
        self.tried += (replica.id,)
        self.replica_id = replica.id
        self.prefill = max(plan.routing.prompt_tokens - decision.cached_tokens, 0)
        self.judged = False
        replica.in_flight += 1
        replica.pending_prefill += self.prefill
        replica.requests += 1
        replica.breaker.dispatched()
        self.idle_phase = False
        self.deadline = time.monotonic() + self.proxy.ttfb_timeout_s
        self.upstream = self.proxy.client.send(
            replica.host, replica.port, replica.tls, replica.request_host, plan.method,
            replica.base_path + plan.path, plan.body, self, plan.stream,
        )  # fmt: skip

    def _pick(self, plan: Plan) -> Decision:
        """The policy's choice among the model's routable replicas of the request's task not yet
        tried (a session sticks to its replica; an embedding goes by load alone), or NoReplica."""
        proxy = self.proxy
        candidates = proxy.pool.routable(plan.model, self.tried, TASK_OF_ROUTE.get(plan.route))
        if not candidates:
            raise NoReplica
        request = plan.routing
        if plan.route == EMBEDDINGS:
            decision = proxy.embeddings_policy.choose(request, candidates)
            proxy.metrics.decided(proxy.embeddings_policy.name, decision.outcome)
            return decision
        if request.session_id:
            replica = sticky_replica(request.session_id, candidates)
            decision = proxy.policy.place(request, replica, "session")
        else:
            decision = proxy.policy.choose(request, candidates)
        proxy.metrics.decided(proxy.policy.name, decision.outcome)
        return decision

    def _answered(self) -> None:
        """The replica answered this attempt: its prefill is done, and it counts as healthy."""
        replica = self.replica
        assert replica is not None
        replica.pending_prefill -= self.prefill
        self.prefill = 0
        self.judged = True
        self.proxy.pool.succeeded(replica)

    def _failed_replica(self) -> None:
        self.judged = True
        self.proxy.pool.failed(self.replica)  # type: ignore[arg-type]

    def _close_attempt(self) -> None:
        """Give back what the attempt holds on its replica (once per attempt)."""
        replica, self.replica = self.replica, None
        if replica is None:
            return
        replica.in_flight -= 1
        replica.pending_prefill -= self.prefill
        self.prefill = 0
        if not self.judged:
            replica.breaker.released()
        self.upstream = None
        self.deadline = 0.0

    # -- callbacks from the replica's connection (router.http.upstream.Listener)

    def upstream_body(self, data: bytes) -> None:
        if self.head_sent:
            self._forward(data)
        else:
            self._start_stream(data)

    def upstream_done(self, conn: UpstreamConnection) -> None:
        status = conn.status
        if status in RETRY_STATUSES:
            detail = conn.body()[:200].decode(errors="replace")
            if status not in NOT_REPLICA_FAULTS:
                self._failed_replica()
            self._attempt_failed(
                Retryable(f"status {status}", 503 if status == 429 else status, detail)
            )
        elif not conn.streaming:
            self._send_whole(conn)
        elif not self.head_sent:
            self._attempt_failed(Retryable("stream ended before its first byte"))
        else:
            self._end_stream(None)

    def upstream_failed(self, exc: OSError) -> None:
        if isinstance(exc, AnswerTooLarge):  # the request's shape, not the replica's health
            self._close_attempt()
            self.refuse(APIError(502, str(exc), code="answer_too_large"))
            return
        self._failed_replica()
        if self.head_sent:
            log.warning("replica %s: stream broke: %r", self.replica_id, exc)
            self._end_stream(APIError(502, "The replica's stream broke.", code="upstream_error"))
        else:
            self._attempt_failed(Retryable("connection failed", 502, repr(exc)[:200]))

    # -- callbacks from the client's connection and the watchdog

    def client_left(self) -> None:
        if self.ended:
            return
        if self.upstream is not None:
            self.upstream.abort()
        self._close_attempt()
        self.status = CLIENT_CLOSED
        self._end()
        self._committed()  # a retry waiting on this attempt has nothing more to do

    def timed_out(self) -> None:
        if self.replica is None:
            return
        if self.client_stalled:
            self._cut_stalled_client()
            return
        if self.upstream is not None:
            self.upstream.abort()
        if self.idle_phase:
            self._failed_replica()
            idle = self.proxy.idle_timeout_s
            self._end_stream(
                APIError(504, f"The replica sent nothing for {idle:g} s.", code="upstream_idle")
            )
        else:
            self._close_attempt()
            self._give_up(
                Retryable("no first byte in time", 504),
                f"not retried: the replica accepted the request and ran past "
                f"{self.proxy.ttfb_timeout_s:g} s",
            )

    def client_caught_up(self) -> None:
        """The client's buffer drained: read the replica's stream again."""
        self.conn.on_writable = None
        self.client_stalled = False
        if self.upstream is not None and not self.ended:
            self.deadline = time.monotonic() + self.proxy.idle_timeout_s
            self.upstream.resume_reading()

    def _cut_stalled_client(self) -> None:
        """The client read nothing for the idle timeout: it holds a replica's slot and its key's
        concurrency for nothing. Cut it as if it had left (what it was sent is still charged)."""
        self.conn.close()
        self.client_left()

    # -- answering the client

    def _send_whole(self, upstream: UpstreamConnection) -> None:
        self.delivered = True
        self.judged = True
        self.proxy.pool.succeeded(self.replica)  # type: ignore[arg-type]
        payload = upstream.body()
        self.status = upstream.status
        headers = [
            (b"content-type", upstream.header(b"content-type") or b"application/json"),
            (b"x-fleet-replica", self.replica.id_header),  # type: ignore[union-attr]
        ]
        self.head_sent = True
        self.conn.respond(self.status, headers, payload)
        self.proxy.metrics.first_byte(
            self.plan.route, self.plan.model, time.perf_counter() - self.started
        )
        self.body_out = payload
        self._close_attempt()
        self._committed()
        self._end()

    def _start_stream(self, first: bytes) -> None:
        self._answered()
        self.delivered = self.streamed = True
        self.status = 200
        headers = [
            (b"content-type", b"text/event-stream"),
            (b"cache-control", b"no-cache"),
            (b"x-fleet-replica", self.replica.id_header),  # type: ignore[union-attr]
        ]
        self.conn.start_stream(200, headers)
        self.head_sent = True
        self.proxy.metrics.first_byte(
            self.plan.route, self.plan.model, time.perf_counter() - self.started
        )
        self.idle_phase = True
        self._forward(first)
        self._committed()

    def _forward(self, data: bytes) -> None:
        conn, tap = self.conn, self.plan.tap
        conn.send_chunk(tap.feed(data) if tap is not None else data)
        if conn.writing_paused and self.upstream is not None:
            # A slow client is not the replica's fault; a client that reads nothing for the
            # idle timeout is cut (see timed_out).
            self.client_stalled = True
            self.deadline = time.monotonic() + self.proxy.idle_timeout_s
            self.upstream.pause_reading()
            conn.on_writable = self.client_caught_up
        else:
            self.deadline = time.monotonic() + self.proxy.idle_timeout_s

    def _end_stream(self, failure: APIError | None) -> None:
        self._close_attempt()
        if failure is not None:
            self.status = failure.status
            self.conn.end_stream(failure.sse_frames())
        else:
            tap = self.plan.tap
            self.conn.end_stream(tap.flush() if tap is not None else b"")
        self._end()

    # -- failures before the first byte, and retries

    def _attempt_failed(self, exc: Retryable) -> None:
        self._close_attempt()
        if self.waiter is not None:
            if not self.waiter.done():
                self.waiter.set_exception(exc)
        elif self.plan.pinned is not None or self.proxy.max_attempts <= 1:
            self._give_up(exc)
        else:
            self.retrying = asyncio.get_running_loop().create_task(self._retry(exc))

    def _committed(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def _retry(self, first: Retryable) -> None:
        """Further attempts, on other replicas, as tenacity allows: one at a time, each waiting
        for its outcome (answered, or failed before the first byte)."""
        last = first
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.proxy.max_attempts - 1),
            retry=retry_if_exception_type(Retryable),
            wait=wait_none(),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if not self.proxy.budget.withdraw():
                        self._give_up(last, "the retry budget is spent")
                        return
                    self.proxy.metrics.retried(self.plan.model, last.reason)
                    try:
                        await self._attempt_once()
                    except Retryable as exc:
                        last = exc
                        raise
        except Retryable as exc:
            self._give_up(exc)
        except NoReplica:
            self._give_up(last, "no other replica to try")
        except Exception:  # a bug must not leave the client waiting for ever
            log.exception("retrying %s failed", self.plan.path)
            self.refuse(APIError(500, "The router failed to serve this request."))

    async def _attempt_once(self) -> None:
        """One more attempt; returns once it is answered or the client has left."""
        if self.ended:
            return
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            self._attempt()
            await self.waiter
        finally:
            self.waiter = None

    def _give_up(self, exc: Retryable, why: str = "") -> None:
        """The client learns what happened and how many replicas were tried; which ones, and
        their own words, go to the log (replica ids and exception names are not the client's)."""
        tried = len(self.tried)
        log.warning(
            "gave up on %s after %s (%s)%s; tried %s",
            self.plan.path, exc.reason, exc.detail, f"; {why}" if why else "",
            ", ".join(self.tried),
        )  # fmt: skip
        note = f"; {why}" if why else ""
        plural = "s" if tried != 1 else ""
        message = (
            f"The upstream replica failed to answer ({exc.reason}); "
            f"tried {tried} replica{plural}{note}."
        )
        self.refuse(APIError(exc.status, message, code="upstream_error"))
