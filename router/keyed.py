"""A request under a fleet key, from its key check to its exchange, on callbacks.

Its key is checked from the cache (router.auth), its plan made and its model checked; then its
admission against the key's limits is queued with the tick's others (fleet.control.keys.batch),
and Redis's answer comes back on a callback, which refuses the request (429) or hands the plan to
the proxy with the key's ticket (settled by accounting when the exchange ends). So a keyed request
spends no task or future, like a static-key one; only a key this router has not cached yet is
looked up in Redis first, in a task.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from fleet.control.errors import CLIENT_GONE_STATUS, APIError
from fleet.control.keys import KeyRecord, Ticket
from router.backends.backend import Replica
from router.http.connection import ClientConnection
from router.http.messages import Request
from router.plan import Plan

if TYPE_CHECKING:
    from router.app import RouterApp
    from router.routing.exact import Recipe
    from router.tracing import RequestTrace

log = logging.getLogger("router")
_HASHING: set[asyncio.Task[None]] = set()  # requests whose prompts are being hashed (exact.py)


class KeyedRequest:
    """One proxied request under a fleet key, until its exchange starts or it is refused."""

    __slots__ = (
        "app",
        "conn",
        "incoming",
        "method",
        "path",
        "pinned",
        "plan",
        "refusal",
        "route",
        "session_id",
        "started",
        "trace",
        "traceparent",
    )  # fmt: skip

    def __init__(
        self,
        app: RouterApp,
        incoming: Request,
        conn: ClientConnection,
        route: str,
        path: str,
        pinned: Replica | None,
        refusal: APIError | None,
        method: str,
        session_id: str | None,
        started: float,
        traceparent: bytes | None,
        trace: RequestTrace | None,
    ) -> None:
        self.app = app
        self.incoming = incoming
        self.conn = conn
        self.route = route
        self.path = path
        self.pinned = pinned
        self.refusal = refusal
        self.method = method
        self.session_id = session_id
        self.started = started
        self.traceparent = traceparent
        self.trace = trace
        self.plan: Plan | None = None

    def start(self, record: KeyRecord) -> None:
        """Plan the request, check the key may use its model, queue its admission."""
        if self.trace is not None:
            self.trace.authenticated(record.id)
        try:
            if self.refusal is not None:
                raise self.refusal
            self.plan = plan = self.app.planner.plan(
                self.route, self.path, self.method, self.incoming.body, self.pinned, record.id,
                self.session_id,
            )  # fmt: skip
            record.check_model(plan.model)
        except APIError as err:
            self.refuse(err)
            return
        self.app.gate.admit_soon(record, plan.reserve, self.admitted)

    async def look_up(self, authorization: str | None) -> bool:
        """A key not cached here: authenticate it through Redis, then `start`. True: the answer
        goes on in callbacks (router.http.connection)."""
        try:
            record = await self.app.gate.authenticate(authorization, None)
        except APIError as err:
            self.refuse(err)
            return True
        assert record is not None  # a static key never comes this way
        self.start(record)
        return True

    def admitted(self, result: Ticket | APIError) -> None:
        """Redis's answer (or the outage counters'): proxy the request, or refuse it."""
        if isinstance(result, APIError):
            self.refuse(result)
            return
        plan = self.plan
        assert plan is not None
        exact = self.app.exact
        if exact is not None and exact.active:
            how = self.app.exact_recipe(plan)
            if how is not None:  # tokenize the prompt first, on a worker thread
                task = asyncio.get_running_loop().create_task(self._hashed(plan, result, how))
                _HASHING.add(task)  # a strong reference until it is done
                task.add_done_callback(_HASHING.discard)
                return
        self._start(plan, result)

    async def _hashed(self, plan: Plan, ticket: Ticket, how: tuple[Recipe, list[Replica]]) -> None:
        exact = self.app.exact
        assert exact is not None
        await exact.prepare(plan, how[1], how[0])
        self._start(plan, ticket)

    def _start(self, plan: Plan, result: Ticket) -> None:
        accounting = self.app.accounting
        if self.conn.closed:  # the client left while its key was checked
            accounting.refused(
                self.route, plan.model, CLIENT_GONE_STATUS, self.started,
                self.incoming.request_id, self.trace,
            )  # fmt: skip
            accounting.release(result)
            return
        try:
            self.app.proxy.start(
                plan, self.conn, self.started, self.incoming.request_id, self.traceparent,
                self.trace, result.key_id, result,
            )  # fmt: skip
        except Exception:  # a callback's failure reaches no one else: answer 500 here
            log.exception("failed to start request %s", self.incoming.request_id.decode("latin-1"))
            accounting.release(result)
            self.refuse(APIError(500, "The router failed to serve this request."))

    def refuse(self, err: APIError) -> None:
        """Answer `err` (unless the client is gone) and count the request's end."""
        gone = self.conn.closed  # the client left while its key was checked: no one to answer
        if not gone:
            self.conn.respond_error(err)
        model = self.plan.model if self.plan is not None else ""
        self.app.accounting.refused(
            self.route, model, CLIENT_GONE_STATUS if gone else err.status, self.started,
            self.incoming.request_id, self.trace,
        )  # fmt: skip
