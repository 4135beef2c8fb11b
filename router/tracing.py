"""OpenTelemetry spans of the router's requests, made only with `--otlp-endpoint` (or a tracer
provider a test hands in): without one, `RouterApp.tracer` is None and the data path does no
tracing work at all, not even an import (the router's CPU per request is measured).

One request is one `RequestTrace`, whose root span (`router.request`) continues the client's
`traceparent` when it sent one. Under it: `router.auth` (the key check), `router.queue` (the wait
in the router queue, when no replica had room), `router.route` (the policy's choice) and one
`router.upstream` per attempt at a replica, whose context goes to that replica as its
`traceparent`, so the replica's spans hang under the attempt that reached it. The data path runs
on callbacks, not in one task, so spans are started and ended explicitly, never made "current".

Attributes: the request id, the fleet key's id (never the key), the model, the replica, the
status and the tokens the replica reports.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

_PROPAGATOR = TraceContextTextMapPropagator()


class RouterTracer:
    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("fleetserve.router")

    def begin(self, route: str, request_id: bytes, traceparent: bytes | None) -> RequestTrace:
        """The trace of a request just read, continuing the client's trace if it sent one."""
        parent = None
        if traceparent is not None:
            parent = _PROPAGATOR.extract({"traceparent": traceparent.decode("latin-1")})
        return RequestTrace(self.tracer, route, request_id.decode("latin-1"), parent)

    def shutdown(self) -> None:
        """Send the spans still batched (the router is stopping)."""
        self.provider.shutdown()


class RequestTrace:
    def __init__(self, tracer: Tracer, route: str, request_id: str, parent: Context | None) -> None:
        self.tracer = tracer
        self.started_ns = time.time_ns()
        self.root = tracer.start_span(
            "router.request",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"fleet.route": route, "fleet.request_id": request_id},
            start_time=self.started_ns,
        )
        self.context = trace.set_span_in_context(self.root)
        self.authenticated_at = 0  # time_ns once the key was checked
        self.attempt: Span | None = None
        self.attempts = 0
        self.queue: Span | None = None  # while it waits in the router queue

    def _child(self, name: str, start_ns: int, attributes: dict[str, str | int]) -> Span:
        return self.tracer.start_span(
            name, context=self.context, start_time=start_ns, attributes=attributes
        )

    def authenticated(self, key_id: str | None) -> None:
        """The key check passed (a fleet key's id; None for a static key or an open router)."""
        now = time.time_ns()
        self.authenticated_at = now
        attributes: dict[str, str | int] = {"fleet.key_id": key_id} if key_id else {}
        self._child("router.auth", self.started_ns, attributes).end(now)
        if key_id is not None:
            self.root.set_attribute("fleet.key_id", key_id)

    def queue_entered(self, depth: int) -> None:
        """No replica had room: the request waits in the router queue (`depth` ahead of it)."""
        self.queue = self._child("router.queue", time.time_ns(), {"fleet.queue_depth": depth})

    def queue_left(self, outcome: str) -> None:
        """It left the queue: `dispatched` to a replica, or `timeout` / `client_left`."""
        span, self.queue = self.queue, None
        if span is None:
            return
        span.set_attribute("fleet.queue_outcome", outcome)
        if outcome != "dispatched":
            span.set_status(Status(StatusCode.ERROR, outcome))
        span.end()

    def routed(
        self, start_ns: int, policy: str, outcome: str, replica_id: str, cached: int
    ) -> None:
        self._child(
            "router.route",
            start_ns,
            {
                "fleet.policy": policy,
                "fleet.route_outcome": outcome,
                "fleet.replica_id": replica_id,
                "fleet.cached_tokens": cached,
            },
        ).end()

    def attempt_started(self, replica_id: str) -> bytes:
        """Start the span of one attempt at a replica; returns the head line that carries its
        context to the replica (`traceparent: ...\\r\\n`)."""
        self.attempts += 1
        self.attempt = self.tracer.start_span(
            "router.upstream",
            context=self.context,
            kind=SpanKind.CLIENT,
            attributes={"fleet.replica_id": replica_id, "fleet.attempt": self.attempts},
        )
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, trace.set_span_in_context(self.attempt))
        return b"traceparent: %s\r\n" % carrier["traceparent"].encode("latin-1")

    def attempt_ended(self, status: int) -> None:
        """The attempt is over: the replica's HTTP status, 0 when it gave none (connection)."""
        span, self.attempt = self.attempt, None
        if span is None:
            return
        if status:
            span.set_attribute("http.response.status_code", status)
        if not status or status >= 500 or status == 429:
            span.set_status(Status(StatusCode.ERROR, f"status {status}" if status else "no answer"))
        span.end()

    def ended(
        self, status: int, model: str, replica_id: str, usage: Mapping[str, object] | None
    ) -> None:
        """The request's answer is out (or it was refused, or its client left)."""
        root = self.root
        if not self.authenticated_at:  # refused at the key check
            self._child("router.auth", self.started_ns, {}).end()
        root.set_attribute("http.response.status_code", status)
        if model:
            root.set_attribute("gen_ai.request.model", model)
        if replica_id:
            root.set_attribute("fleet.replica_id", replica_id)
        root.set_attribute("fleet.attempts", self.attempts)
        if usage is not None:
            for name, field in (("input", "prompt_tokens"), ("output", "completion_tokens")):
                tokens = usage.get(field)
                if isinstance(tokens, int):
                    root.set_attribute(f"gen_ai.usage.{name}_tokens", tokens)
        if status >= 500:
            root.set_status(Status(StatusCode.ERROR, f"status {status}"))
        root.end()
