"""Each request's X-Request-Id and, with `--otlp-endpoint`, its OpenTelemetry spans.

`RequestTracing` (pure ASGI, outermost) gives every request its id (the router's or the client's
when sane, else a new one; fleet.request_id), returns it on the answer, and keeps it in a context
variable for the request's log lines (`RequestIdFilter`). With a tracer it also opens the
request's span (`replica.request`), continuing the caller's `traceparent`: behind a tracing
router that is the router's attempt at this replica, so both sides make one trace.

The engine's part (`replica.queue`, `replica.prefill`, `replica.decode`) is recorded after the
fact from each finished request's RequestMetrics timestamps, with explicit start and end times:
the engine's step loop makes no tracing call. Probe and scrape routes are not traced (routers
poll them every second). Without a tracer no OpenTelemetry module is imported.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleet.request_id import request_id_for

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

    from replica.engine.outputs import RequestOutput

UNTRACED = frozenset({"/health", "/load", "/metrics", "/version"})
REQUEST_ID_SCOPE_KEY = "fleet.request_id"


@dataclass
class RequestContext:
    """What a request's log lines and spans need, for the code that serves it."""

    request_id: str
    span: Span | None = None
    tracer: Tracer | None = None
    input_tokens: int = 0
    output_tokens: int = 0


current: ContextVar[RequestContext | None] = ContextVar("replica_request", default=None)


class RequestTracing:
    def __init__(
        self, app: ASGIApp, replica_id: str | None, provider: TracerProvider | None
    ) -> None:
        self.app = app
        self.replica_id = replica_id
        self.tracer = provider.get_tracer("fleetserve.replica") if provider is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = traceparent = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                given = value
            elif name == b"traceparent":
                traceparent = value
        request_id = request_id_for(given)
        scope[REQUEST_ID_SCOPE_KEY] = request_id  # for the 500 answered outside (errors.py)
        context = RequestContext(request_id.decode("latin-1"))
        if self.tracer is not None and scope["path"] not in UNTRACED:
            context.tracer = self.tracer
            context.span = self._start(scope, context.request_id, traceparent)
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", ()), (b"x-request-id", request_id)]
                message = {**message, "headers": headers}
            await send(message)

        token = current.set(context)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            current.reset(token)
            if context.span is not None:
                _end(context, status)

    def _start(self, scope: Scope, request_id: str, traceparent: bytes | None) -> Span:
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        parent = None
        if traceparent is not None:
            carrier = {"traceparent": traceparent.decode("latin-1")}
            parent = TraceContextTextMapPropagator().extract(carrier)
        attributes = {"fleet.request_id": request_id, "url.path": scope["path"]}
        if self.replica_id:
            attributes["fleet.replica_id"] = self.replica_id
        assert self.tracer is not None
        return self.tracer.start_span(
            "replica.request", context=parent, kind=SpanKind.SERVER, attributes=attributes
        )


def _end(context: RequestContext, status: int) -> None:
    from opentelemetry.trace import Status, StatusCode

    span = context.span
    assert span is not None
    span.set_attribute("http.response.status_code", status)
    if context.input_tokens or context.output_tokens:
        span.set_attribute("gen_ai.usage.input_tokens", context.input_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", context.output_tokens)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR, f"status {status}"))
    span.end()


def tag_request(model: str, key_id: str | None) -> None:
    """The model a generation request runs on and its fleet key's id (never the key)."""
    context = current.get()
    if context is None or context.span is None:
        return
    context.span.set_attribute("gen_ai.request.model", model)
    if key_id is not None:
        context.span.set_attribute("fleet.key_id", key_id)


def engine_finished(out: RequestOutput) -> None:
    """Record one engine request's queue, prefill and decode spans from its timestamps."""
    context = current.get()
    if context is None or context.span is None or context.tracer is None:
        return
    prompt = len(out.prompt_token_ids)
    generated = sum(len(o.token_ids) for o in out.outputs)
    context.input_tokens += prompt
    context.output_tokens += generated
    m = out.metrics
    if m is None or m.first_scheduled_time is None or m.first_token_time is None:
        return
    from opentelemetry import trace

    parent = trace.set_span_in_context(context.span)
    finished = m.finished_time or m.last_token_time or m.first_token_time
    phases: list[tuple[str, float, float, dict[str, Any]]] = [
        ("replica.queue", m.arrival_time, m.first_scheduled_time, {}),
        (
            "replica.prefill",
            m.first_scheduled_time,
            m.first_token_time,
            {"gen_ai.usage.input_tokens": prompt, "fleet.cached_tokens": out.num_cached_tokens},
        ),
        ("replica.decode", m.first_token_time, finished, {"gen_ai.usage.output_tokens": generated}),
    ]
    for name, start, end, attributes in phases:
        attributes["fleet.engine_request_id"] = out.request_id
        span = context.tracer.start_span(
            name, context=parent, start_time=_ns(start), attributes=attributes
        )
        span.end(end_time=_ns(end))


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every log record ("-" outside a request), for formats that show it
    (uvicorn's access lines, see uvicorn_runner); the replica's own lines about a request get it
    appended to their message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if hasattr(record, "request_id"):
            return True
        context = current.get()
        record.request_id = context.request_id if context is not None else "-"
        if context is not None and not record.name.startswith("uvicorn"):
            record.msg = f"{record.getMessage()} (request {context.request_id})"
            record.args = None
        return True
