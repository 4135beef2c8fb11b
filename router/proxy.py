"""The data path: send one request to a replica and its answer back to the client.

Upstream traffic goes through router.upstream_http (measured here at less than half of aiohttp's
CPU per proxied request; aiohttp is itself several times cheaper than httpx). A request may be
retried on a different replica, within the retry budget, only while nothing has reached the
client: connection failures, 429/502/503/504 answers, a stream that ends before its first byte,
or no first byte within the TTFB timeout.
Once the first byte is out, an upstream failure becomes one SSE error event and `[DONE]`.
Streams pass through frame by frame as they arrive; nothing waits for the whole answer.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_none

from fleet.control.errors import APIError
from router.flight import IDLE_TIMEOUT, TTFB_TIMEOUT, Flight
from router.http_server import Connection as ClientConnection
from router.metrics import RouterMetrics
from router.policies import Decision, Policy, RouteRequest
from router.pool import ReplicaPool
from router.replica import Replica
from router.retry_budget import RetryBudget
from router.sessions import sticky_replica
from router.sse import UsageTap
from router.upstream_http import Connection, HttpClient

RETRY_STATUSES = frozenset({429, 502, 503, 504})
NOT_REPLICA_FAULTS = frozenset({429})
_CONNECTION_ERRORS = (OSError,)
_STATUS_TEXT = {}


def status_text(status: int) -> str:
    text = _STATUS_TEXT.get(status)
    if text is None:
        text = _STATUS_TEXT[status] = str(status)
    return text


class NoReplica(Exception):
    """No routable replica is left for this request (none at all, or all already tried)."""


class Retryable(Exception):
    """This attempt failed before anything reached the client; another replica may serve it."""

    def __init__(self, reason: str, status: int = 502, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.detail = detail


@dataclass(slots=True, eq=False)
class Exchange:
    """One client request on its way through the router."""

    route: str
    path: str
    conn: ClientConnection
    flight: Flight
    started: float
    model: str = ""
    stream: bool = False
    tap: UsageTap | None = None
    replica_id: str = ""
    status: int = 0
    head_sent: bool = False
    body_out: bytes = b""
    tried: list[Replica] = field(default_factory=list)


class Upstream:
    """The keep-alive connections every replica request goes through."""

    def __init__(self, connect_timeout_s: float, api_key: str | None = None) -> None:
        headers = [("Content-Type", "application/json")]
        if api_key:
            headers.append(("Authorization", f"Bearer {api_key}"))
        self.client = HttpClient(connect_timeout_s, headers)

    async def request(self, replica: Replica, method: str, path: str, body: bytes) -> Connection:
        return await self.client.request(
            replica.host, replica.port, replica.tls, replica.host_header, method,
            replica.base_path + path, body,
        )  # fmt: skip

    async def close(self) -> None:
        self.client.close()


class Proxy:
    def __init__(
        self,
        pool: ReplicaPool,
        policy: Policy,
        upstream: Upstream,
        metrics: RouterMetrics,
        *,
        ttfb_timeout_s: float,
        idle_timeout_s: float,
        max_attempts: int,
        budget: RetryBudget,
    ) -> None:
        self.pool = pool
        self.policy = policy
        self.upstream = upstream
        self.metrics = metrics
        self.ttfb_timeout_s = ttfb_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.max_attempts = max_attempts
        self.budget = budget

    # -- choosing

    def pick(self, request: RouteRequest, exclude: list[Replica]) -> Decision | None:
        candidates = self.pool.routable(request.model, exclude)
        if not candidates:
            return None
        if request.session_id:
            replica = sticky_replica(request.session_id, candidates)
            decision = self.policy.place(request, replica, "session")
        else:
            decision = self.policy.choose(request, candidates)
        self.metrics.decided(self.policy.name, decision.outcome)
        return decision

    # -- forwarding with retries

    async def forward(
        self,
        ex: Exchange,
        request: RouteRequest,
        body: bytes,
        method: str = "POST",
        pinned: Replica | None = None,
    ) -> None:
        """Serve `ex` from one replica, retrying elsewhere only before the first byte."""
        self.budget.deposit()
        try:
            await self._attempt(ex, request, body, method, pinned)
            return
        except NoReplica:
            raise self._no_replica(ex) from None
        except Retryable as exc:
            if pinned is not None or self.max_attempts <= 1:
                raise self._give_up(ex, exc) from None
            first_failure = exc
        last = first_failure
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_attempts - 1),
            retry=retry_if_exception_type(Retryable),
            wait=wait_none(),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if not self.budget.withdraw():
                        raise self._give_up(ex, last, "the retry budget is spent")
                    self.metrics.retried(ex.model, last.reason)
                    try:
                        await self._attempt(ex, request, body, method, None)
                    except Retryable as exc:
                        last = exc
                        raise
        except Retryable as exc:
            raise self._give_up(ex, exc) from None
        except NoReplica:
            raise self._give_up(ex, last, "no other replica to try") from None

    @staticmethod
    def _no_replica(ex: Exchange) -> APIError:
        return APIError(
            503,
            f"No replica is available for model '{ex.model}'; retry shortly.",
            code="no_replica_available",
            headers={"Retry-After": "1"},
        )

    def _give_up(self, ex: Exchange, exc: Retryable, why: str = "") -> APIError:
        tried = ", ".join(r.id for r in ex.tried) or "none"
        detail = f" ({exc.detail})" if exc.detail else ""
        note = f"; {why}" if why else ""
        message = f"Upstream replica failed: {exc.reason}{detail}; tried {tried}{note}."
        return APIError(exc.status, message, code="upstream_error")

    async def _attempt(
        self,
        ex: Exchange,
        request: RouteRequest,
        body: bytes,
        method: str,
        pinned: Replica | None,
    ) -> None:
        if pinned is None:
            decision = self.pick(request, ex.tried)
            if decision is None:
                raise NoReplica
        else:
            decision = Decision(pinned, "pinned")
        replica = decision.replica
        ex.tried.append(replica)
        ex.replica_id = replica.id
        prefill = max(request.prompt_tokens - decision.cached_tokens, 0)
        replica.in_flight += 1
        replica.pending_prefill += prefill
        replica.requests += 1
        replica.breaker.dispatched()
        flight = ex.flight
        flight.phase = TTFB_TIMEOUT
        flight.deadline = time.monotonic() + self.ttfb_timeout_s
        response: Connection | None = None
        verdict = False
        try:
            try:
                response = await self.upstream.request(replica, method, ex.path, body)
                status = response.status
                if status in RETRY_STATUSES:
                    detail = (await response.read())[:200].decode(errors="replace")
                    if status not in NOT_REPLICA_FAULTS:
                        verdict = True
                        self.pool.failed(replica)
                    raise Retryable(f"status {status}", 503 if status == 429 else status, detail)
                if not ex.stream or status != 200:
                    payload = await response.read()
                    first = b""
                else:
                    first = await response.readany()
                    if not first:
                        raise Retryable("stream ended before its first byte")
            except asyncio.CancelledError:
                if flight.reason != TTFB_TIMEOUT:
                    raise
                flight.absorb()
                verdict = True
                self.pool.failed(replica)
                raise Retryable("no first byte in time", 504) from None
            except _CONNECTION_ERRORS as exc:
                verdict = True
                self.pool.failed(replica)
                raise Retryable(type(exc).__name__, 502, str(exc)[:200]) from None
            flight.deadline = 0.0
            replica.pending_prefill -= prefill
            prefill = 0
            verdict = True
            self.pool.succeeded(replica)
            if first:
                await self._stream(ex, replica, response, first)
            else:
                await self._send_whole(ex, replica, response, payload)
        finally:
            replica.in_flight -= 1
            replica.pending_prefill -= prefill
            if not verdict:
                replica.breaker.released()
            if response is not None:
                response.release()

    async def _send_whole(
        self, ex: Exchange, replica: Replica, response: Connection, payload: bytes
    ) -> None:
        ex.status = response.status
        headers = [
            (b"content-type", response.header(b"content-type") or b"application/json"),
            (b"x-fleet-replica", replica.id_header),
        ]
        ex.head_sent = True
        ex.flight.done = True
        ex.conn.respond(ex.status, headers, payload)
        self.metrics.first_byte(ex.route, ex.model, time.perf_counter() - ex.started)
        ex.body_out = payload

    async def _stream(
        self, ex: Exchange, replica: Replica, response: Connection, first: bytes
    ) -> None:
        conn = ex.conn
        send = conn.send_chunk
        flight = ex.flight
        tap = ex.tap
        ex.status = 200
        headers = [
            (b"content-type", b"text/event-stream"),
            (b"cache-control", b"no-cache"),
            (b"x-fleet-replica", replica.id_header),
        ]
        conn.start_stream(200, headers)
        ex.head_sent = True
        self.metrics.first_byte(ex.route, ex.model, time.perf_counter() - ex.started)
        send(tap.feed(first) if tap is not None else first)
        readany = response.readany
        clock = time.monotonic
        idle = self.idle_timeout_s
        flight.phase = IDLE_TIMEOUT
        failure: APIError | None = None
        try:
            while True:
                flight.deadline = clock() + idle
                chunk = await readany()
                flight.deadline = 0.0
                if not chunk:
                    break
                send(tap.feed(chunk) if tap is not None else chunk)
                if conn.writing_paused:
                    await conn.drain()
        except asyncio.CancelledError:
            if flight.reason != IDLE_TIMEOUT:
                raise
            flight.absorb()
            failure = APIError(
                504, f"The replica sent nothing for {idle:g} s.", code="upstream_idle"
            )
        except _CONNECTION_ERRORS as exc:
            failure = APIError(
                502, f"The replica's stream broke: {type(exc).__name__}.", code="upstream_error"
            )
        flight.done = True
        if failure is not None:
            self.pool.failed(replica)
            ex.status = failure.status
            conn.end_stream(failure.sse_frames())
        else:
            conn.end_stream(tap.flush() if tap is not None else b"")
