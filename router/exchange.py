"""The data path: one client request sent to a replica and its answer back to the client.

An `Exchange` is that request's state machine, built from the request's plan (router.plan) by
`Proxy.start`; it asks the policy for a replica per attempt and reports its end, once, to
accounting (router.accounting). Nothing awaits on the way: the client's connection
(router.http.connection), the replica's connection (router.http.upstream) and the watchdog call
the exchange's methods as things happen, and each method moves it on. This keeps the CPU per
proxied request near that of a bare proxy (see router.http.upstream for the measurement).

    start ─ dispatch ─ (replica) ─┬─ upstream_done ────────── _send_whole ─ _end
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
callback machinery. Once the first byte is out, a stream from one of our own replicas that dies
(connection lost, or silent past the idle timeout) is carried on by another replica of the model
(router.stream_resume), at most MAX_RESUMES times and within the retry budget; any other upstream
failure after the first byte becomes one SSE error event and `[DONE]`. The client leaving aborts
the upstream request at once and releases every counter; so does a client that stops reading for
the idle timeout (its connection is cut).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_none

from fleet.control.errors import CLIENT_GONE_STATUS, APIError
from fleet.control.keys import Ticket
from router.backends.backend import Replica
from router.http.connection import ClientConnection
from router.http.upstream import AnswerTooLarge, UpstreamConnection
from router.plan import Plan
from router.routing.pick import NoReplica, pick
from router.routing.policies import Decision
from router.stream_resume import MAX_RESUMES, TOKEN_IDS_HEADER, StreamTrail

if TYPE_CHECKING:
    from router.proxy import Proxy
    from router.tracing import RequestTrace

log = logging.getLogger("router.proxy")

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
NOT_REPLICA_FAULTS = frozenset({429})


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

    key = ""  # whose request: its sub-queue in the router queue (router.queueing)
    queued_at = 0.0  # while it waits in the router queue for a replica with room
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
    waiter: asyncio.Future[None] | None = None
    end_waiter: asyncio.Future[None] | None = None
    retrying: asyncio.Task[None] | None = None
    trail: StreamTrail | None = None  # a stream another replica could carry on
    resumes = 0
    trace: RequestTrace | None = None  # with tracing on (router.tracing)
    ticket: Ticket | None = None  # a fleet key's hold on its limits, settled by accounting

    def __init__(
        self,
        proxy: Proxy,
        plan: Plan,
        conn: ClientConnection,
        started: float,
        forward: bytes,
        trace: RequestTrace | None,
    ) -> None:
        """`forward`: head lines every attempt sends the replica (X-Request-Id, traceparent)."""
        self.proxy = proxy
        self.plan = plan
        self.conn = conn
        self.started = started  # time.perf_counter() when the request was read
        self.forward = forward
        if trace is not None:
            self.trace = trace
        conn.on_disconnect = self.client_left

    # -- starting and ending

    def start(self) -> None:
        """Send the request to a replica, or wait in the router queue for one with room; the
        rest happens in the callbacks below."""
        self.proxy.budget.deposit()
        self.proxy.watchdog.watched.add(self)
        try:
            self.dispatch()
        except NoReplica:
            self.proxy.queue.hold(self)

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

    @property
    def request_id(self) -> str:
        """For log lines: the X-Request-Id the client was answered with."""
        return self.conn.request_id.decode("latin-1")

    # -- one attempt at one replica

    def dispatch(self, decision: Decision | None = None, continuation: bytes | None = None) -> None:
        """Send this attempt to `decision`'s replica (the router queue's choice), or to the
        replica the policy picks now (NoReplica when none has room); `continuation` (a resumed
        stream) goes to one of our own replicas."""
        plan, trace = self.plan, self.trace
        picking = time.time_ns() if trace is not None else 0
        if decision is None:
            decision = (
                self.pick(ours_only=continuation is not None)
                if plan.pinned is None
                else Decision(plan.pinned, "pinned")
            )
        replica = self.replica = decision.replica
        self.tried += (replica.id,)
        self.replica_id = replica.id
        self.prefill = max(plan.routing.prompt_tokens - decision.cached_tokens, 0)
        self.judged = False
        replica.in_flight += 1
        replica.pending_prefill += self.prefill
        replica.requests += 1
        replica.breaker.dispatched()
        self.idle_phase = continuation is not None  # a resumed stream's client waits already
        self.deadline = time.monotonic() + self.proxy.ttfb_timeout_s
        if not self.head_sent:
            ours = plan.resumable and replica.engine == "fleetserve"
            self.trail = StreamTrail() if ours else None
        forward = self.forward
        if self.trail is not None:
            forward += TOKEN_IDS_HEADER
        if trace is not None:
            policy = self.proxy.policy.name if plan.pinned is None else "pinned"
            trace.routed(picking, policy, decision.outcome, replica.id, decision.cached_tokens)
            forward += trace.attempt_started(replica.id)
        self.upstream = self.proxy.client.send(
            replica.host, replica.port, replica.tls, replica.request_host, plan.method,
            replica.base_path + plan.path, continuation or plan.body, self, plan.stream, forward,
        )  # fmt: skip

    def pick(self, ours_only: bool = False) -> Decision:
        """The next attempt's replica (router.routing.pick), or NoReplica."""
        return pick(self.proxy, self.plan, self.tried, ours_only)

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
        if self.trace is not None:
            self.trace.attempt_ended(self.upstream.status if self.upstream is not None else 0)
        replica.in_flight -= 1
        if self.proxy.queue.depth:
            self.proxy.queue.wake()
        replica.pending_prefill -= self.prefill
        self.prefill = 0
        if not self.judged:
            replica.breaker.released()
        self.upstream = None
        self.deadline = 0.0

    # -- callbacks from the replica's connection (router.http.upstream.Listener)

    def upstream_body(self, data: bytes) -> None:
        if self.head_sent:
            if not self.judged:  # a resumed stream's first bytes
                self._answered()
            self._forward(data)
        else:
            self._start_stream(data)

    def upstream_done(self, conn: UpstreamConnection) -> None:
        status = conn.status
        if self.head_sent and not conn.streaming:  # a resumed stream's replica refused it
            log.warning("replica %s refused a resumed stream: %d %r", self.replica_id, status,
                        conn.body()[:200])  # fmt: skip
            if status not in NOT_REPLICA_FAULTS:
                self._failed_replica()
            self._stream_broke(APIError(502, "The replica's stream broke.", code="upstream_error"))
        elif status in RETRY_STATUSES:
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
            log.warning(
                "replica %s: stream broke: %r (request %s)", self.replica_id, exc, self.request_id
            )
            self._stream_broke(APIError(502, "The replica's stream broke.", code="upstream_error"))
        else:
            self._attempt_failed(Retryable("connection failed", 502, repr(exc)[:200]))

    # -- callbacks from the client's connection and the watchdog

    def client_left(self) -> None:
        if self.ended:
            return
        if self.queued_at:
            self.proxy.queue.abandon(self)
        if self.upstream is not None:
            self.upstream.abort()
        self._close_attempt()
        self.status = CLIENT_GONE_STATUS
        self._end()
        self._committed()  # a retry waiting on this attempt has nothing more to do

    def timed_out(self) -> None:
        if self.queued_at:
            self.proxy.queue.expire(self)
            return
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
            self._stream_broke(
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
        if self.trail is not None:
            data = self.trail.feed(data)
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
            tail = self.trail.flush() if self.trail is not None else b""
            tap = self.plan.tap
            self.conn.end_stream(tap.feed(tail) + tap.flush() if tap is not None else tail)
        self._end()

    def _stream_broke(self, failure: APIError) -> None:
        """The replica's stream broke after the client had its first byte: another of our
        replicas carries it on where it can, else the client gets `failure` as its last event."""
        self._close_attempt()
        if not self._resume():
            self._end_stream(failure)

    def _resume(self) -> bool:
        """Send the stream's continuation to another replica; False if it cannot be resumed."""
        trail = self.trail
        if trail is None or not trail.resumable or self.resumes >= MAX_RESUMES:
            return False
        if not self.proxy.budget.withdraw():
            log.warning("not resuming a stream of %s: the retry budget is spent", self.plan.model)
            return False
        dead = self.replica_id
        try:
            self.dispatch(continuation=trail.continuation(self.plan.body))
        except NoReplica:
            return False
        self.resumes += 1
        self.proxy.metrics.retried(self.plan.model, "stream resumed")
        log.warning("replica %s died mid-stream: resumed on %s after %d tokens",
                    dead, self.replica_id, len(trail.ids))  # fmt: skip
        return True

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
            log.exception("retrying %s failed (request %s)", self.plan.path, self.request_id)
            self.refuse(APIError(500, "The router failed to serve this request."))

    async def _attempt_once(self) -> None:
        """One more attempt; returns once it is answered or the client has left."""
        if self.ended:
            return
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            self.dispatch()
            await self.waiter
        finally:
            self.waiter = None

    def _give_up(self, exc: Retryable, why: str = "") -> None:
        """The client learns what happened and how many replicas were tried; which ones, and
        their own words, go to the log (replica ids and exception names are not the client's)."""
        tried = len(self.tried)
        log.warning(
            "gave up on %s after %s (%s)%s; tried %s (request %s)",
            self.plan.path, exc.reason, exc.detail, f"; {why}" if why else "",
            ", ".join(self.tried), self.request_id,
        )  # fmt: skip
        note = f"; {why}" if why else ""
        plural = "s" if tried != 1 else ""
        message = (
            f"The upstream replica failed to answer ({exc.reason}); "
            f"tried {tried} replica{plural}{note}."
        )
        self.refuse(APIError(exc.status, message, code="upstream_error"))
