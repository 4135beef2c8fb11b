"""Tracing across the router and a real replica (issue #17 item 3): both run in this process, each
with its own TracerProvider and the SDK's in-memory exporter, so the test reads every span each
side made. One request (whole or streamed) makes one trace: the router's request span, its auth,
route decision and upstream attempt, and under that attempt the replica's request span with its
engine queue, prefill and decode. X-Request-Id is the client's (when sane) or a new one, the same
in the answer and on both sides; a client's traceparent is continued, also with tracing off."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from router_harness import FAST_POOL, RunningRouter, run_router

from fleet.control.keys import KeyStore
from fleet.request_id import request_id_for
from router.config import RouterConfig
from router.queueing.request_queue import QueueSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from live_replica import LiveReplica, serve

MODEL = "tiny-traced"
REPLICA_ID = "traced-0"
PREFIX = f"trace-{uuid.uuid4().hex[:8]}"
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
ROUTER_SPANS = {"router.request", "router.auth", "router.route", "router.upstream"}
REPLICA_SPANS = {"replica.request", "replica.queue", "replica.prefill", "replica.decode"}


@dataclass
class Recorder:
    provider: TracerProvider
    exporter: InMemorySpanExporter


def recorder(service: str) -> Recorder:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Recorder(provider, exporter)


@pytest.fixture(scope="module")
def replica_spans() -> Recorder:
    return recorder("fleet-replica")


@pytest.fixture(scope="module")
def replica(tiny_model: Path, redis_url: str, replica_spans: Recorder) -> Iterator[LiveReplica]:
    settings = {
        "served_model_name": MODEL, "redis_prefix": PREFIX, "fleet_keys": False,
        "replica_id": REPLICA_ID,
    }  # fmt: skip
    with serve(
        tiny_model, redis_url=redis_url, server=settings, tracer_provider=replica_spans.provider
    ) as live:
        yield live


@pytest.fixture
async def secret(redis_url: str) -> AsyncIterator[tuple[str, str]]:
    """(key id, secret) of a fleet key."""
    store = KeyStore(redis_url, prefix=PREFIX)
    record, secret = await store.admin.create("tracing")
    yield record.id, secret
    await store.close()


@contextlib.asynccontextmanager
async def router_over(
    replica: LiveReplica, redis_url: str, provider: TracerProvider | None
) -> AsyncIterator[RunningRouter]:
    """A router in front of the replica (found through the fleet's membership in Redis)."""
    config = RouterConfig(redis_url=redis_url, redis_prefix=PREFIX, pool=FAST_POOL, port=0)
    async with run_router(config, tracer_provider=provider) as running:
        deadline = time.monotonic() + 10
        while not running.app.pool.by_model.get(MODEL) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        yield running


@pytest.fixture
async def traced(
    replica: LiveReplica, redis_url: str
) -> AsyncIterator[tuple[RunningRouter, Recorder]]:
    spans = recorder("fleet-router")
    async with router_over(replica, redis_url, spans.provider) as running:
        yield running, spans


def chat(stream: bool = False) -> dict:
    return {
        "model": MODEL, "messages": [{"role": "user", "content": "Tell me about fleets."}],
        "max_tokens": 6, "temperature": 0, "stream": stream,
    }  # fmt: skip


async def spans_of(
    exporters: list[InMemorySpanExporter], names: set[str], timeout: float = 10.0
) -> list[ReadableSpan]:
    """Every finished span, once all of `names` are among them (the replica ends its request span
    just after its answer left, so it may come a moment after the router's)."""
    deadline = time.monotonic() + timeout
    while True:
        spans = [s for e in exporters for s in e.get_finished_spans()]
        if names <= {s.name for s in spans} or time.monotonic() > deadline:
            return spans
        await asyncio.sleep(0.02)


def tree(spans: list[ReadableSpan]) -> str:
    """The trace as an indented tree: name, service, duration, parent link and attributes."""
    ids = {s.context.span_id for s in spans}
    children: dict[int | None, list[ReadableSpan]] = {}
    for s in spans:
        parent = s.parent.span_id if s.parent is not None and s.parent.span_id in ids else None
        children.setdefault(parent, []).append(s)
    lines = [f"trace {spans[0].context.trace_id:032x}"]

    def walk(parent: int | None, depth: int) -> None:
        for s in sorted(children.get(parent, []), key=lambda s: (s.start_time or 0, s.name)):
            took = ((s.end_time or 0) - (s.start_time or 0)) / 1e6
            service = s.resource.attributes.get("service.name")
            up = f"{s.parent.span_id:016x}" if s.parent is not None else "-"
            attrs = ", ".join(f"{k}={v}" for k, v in sorted((s.attributes or {}).items()))
            lines.append(
                f"{'  ' * depth}{s.name} [{service}] {took:.2f} ms "
                f"span={s.context.span_id:016x} parent={up} {{{attrs}}}"
            )
            walk(s.context.span_id, depth + 1)

    walk(None, 1)
    return "\n".join(lines)


def check_one_trace(
    spans: list[ReadableSpan], key_id: str, request_id: str
) -> tuple[dict[str, ReadableSpan], str]:
    """The connected-trace checks both requests share; returns the spans by name."""
    print(tree(spans))
    assert len({s.context.trace_id for s in spans}) == 1, "one trace across router and replica"
    by_name = {s.name: s for s in spans}
    assert len(by_name) == len(spans), "one span of each name for one request"
    assert set(by_name) == ROUTER_SPANS | REPLICA_SPANS
    root = by_name["router.request"]
    for name in ("router.auth", "router.route", "router.upstream"):
        assert by_name[name].parent.span_id == root.context.span_id, name
    attempt = by_name["router.upstream"]
    served = by_name["replica.request"]
    assert served.parent.span_id == attempt.context.span_id, "the replica continues the attempt"
    for name in ("replica.queue", "replica.prefill", "replica.decode"):
        assert by_name[name].parent.span_id == served.context.span_id, name
    assert by_name["replica.queue"].end_time <= by_name["replica.prefill"].start_time + 1
    assert by_name["replica.prefill"].end_time <= by_name["replica.decode"].start_time + 1
    assert root.attributes["fleet.key_id"] == key_id
    assert by_name["router.auth"].attributes["fleet.key_id"] == key_id
    for span in (root, attempt, by_name["router.route"], served):
        assert span.attributes["fleet.replica_id"] == REPLICA_ID, span.name
    for span in (root, served):
        assert span.attributes["gen_ai.request.model"] == MODEL, span.name
        assert span.attributes["fleet.request_id"] == request_id, span.name
        assert span.attributes["http.response.status_code"] == 200, span.name
    assert attempt.attributes["http.response.status_code"] == 200
    assert by_name["router.route"].attributes["fleet.policy"] == "prefix"
    assert served.attributes["gen_ai.usage.input_tokens"] > 0
    assert served.attributes["gen_ai.usage.output_tokens"] == 6
    assert by_name["replica.decode"].attributes["gen_ai.usage.output_tokens"] == 6
    assert root.attributes["gen_ai.usage.output_tokens"] == 6
    flat = repr([dict(s.attributes or {}) for s in spans])
    return by_name, flat


async def test_one_chat_request_is_one_trace_across_router_and_replica(
    traced, replica_spans: Recorder, secret
) -> None:
    router, spans = traced
    key_id, key = secret
    replica_spans.exporter.clear()
    answer = await router.client.post(
        "/v1/chat/completions", json=chat(),
        headers={"Authorization": f"Bearer {key}", "X-Request-Id": "client-req-42"},
    )  # fmt: skip
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-request-id"] == "client-req-42"
    found = await spans_of([spans.exporter, replica_spans.exporter], ROUTER_SPANS | REPLICA_SPANS)
    _, flat = check_one_trace(found, key_id, "client-req-42")
    assert key not in flat, "the key's secret is never an attribute"


async def test_a_request_that_waited_in_the_router_queue_has_its_queue_span(
    replica: LiveReplica, redis_url: str, secret
) -> None:
    """One request at a time per replica: the second of two waits in the router queue."""
    spans = recorder("fleet-router")
    auth = {"Authorization": f"Bearer {secret[1]}"}
    config = RouterConfig(
        redis_url=redis_url, redis_prefix=PREFIX, pool=FAST_POOL, port=0,
        queue=QueueSettings(replica_max_in_flight=1),
    )  # fmt: skip
    async with run_router(config, tracer_provider=spans.provider) as router:
        deadline = time.monotonic() + 10
        while not router.app.pool.by_model.get(MODEL) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        answers = await asyncio.gather(
            *(
                router.client.post("/v1/chat/completions", json=chat(), headers=auth)
                for _ in range(2)
            )
        )
    assert [a.status_code for a in answers] == [200, 200]
    found = spans.exporter.get_finished_spans()
    [queue] = [s for s in found if s.name == "router.queue"]
    trace = {s.name: s for s in found if s.context.trace_id == queue.context.trace_id}
    assert queue.parent.span_id == trace["router.request"].context.span_id
    assert queue.attributes["fleet.queue_outcome"] == "dispatched"
    assert queue.attributes["fleet.queue_depth"] == 0
    assert queue.end_time <= trace["router.upstream"].start_time
    print(tree(list(trace.values())))


async def test_a_streamed_request_is_one_trace_and_gets_a_new_request_id(
    traced, replica_spans: Recorder, secret
) -> None:
    router, spans = traced
    key_id, key = secret
    replica_spans.exporter.clear()
    headers = {"Authorization": f"Bearer {key}"}
    async with router.client.stream(
        "POST", "/v1/chat/completions", json=chat(stream=True), headers=headers
    ) as answer:
        body = (await answer.aread()).decode()
    assert answer.status_code == 200 and body.rstrip().endswith("data: [DONE]")
    request_id = answer.headers["x-request-id"]
    assert uuid.UUID(hex=request_id).version == 4 and len(request_id) == 32
    found = await spans_of([spans.exporter, replica_spans.exporter], ROUTER_SPANS | REPLICA_SPANS)
    check_one_trace(found, key_id, request_id)


async def test_a_clients_traceparent_is_continued(traced, replica_spans: Recorder, secret) -> None:
    router, spans = traced
    _, key = secret
    replica_spans.exporter.clear()
    headers = {
        "Authorization": f"Bearer {key}", "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
    }  # fmt: skip
    answer = await router.client.post("/v1/chat/completions", json=chat(), headers=headers)
    assert answer.status_code == 200, answer.text
    found = await spans_of([spans.exporter, replica_spans.exporter], ROUTER_SPANS | REPLICA_SPANS)
    root = next(s for s in found if s.name == "router.request")
    assert f"{root.context.trace_id:032x}" == CLIENT_TRACE
    assert f"{root.parent.span_id:016x}" == CLIENT_SPAN
    assert {f"{s.context.trace_id:032x}" for s in found} == {CLIENT_TRACE}


async def test_without_tracing_the_router_forwards_the_ids_as_they_came(
    replica: LiveReplica, redis_url: str, replica_spans: Recorder, secret
) -> None:
    """A router without --otlp-endpoint makes no span, but the replica still continues the
    client's trace and sees the client's request id."""
    _, key = secret
    replica_spans.exporter.clear()
    async with router_over(replica, redis_url, None) as router:
        headers = {
            "Authorization": f"Bearer {key}", "X-Request-Id": "plain-7",
            "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
        }  # fmt: skip
        answer = await router.client.post("/v1/chat/completions", json=chat(), headers=headers)
        assert router.app.tracer is None
    assert answer.status_code == 200 and answer.headers["x-request-id"] == "plain-7"
    found = await spans_of([replica_spans.exporter], {"replica.request"})
    served = next(s for s in found if s.name == "replica.request")
    assert f"{served.context.trace_id:032x}" == CLIENT_TRACE
    assert f"{served.parent.span_id:016x}" == CLIENT_SPAN
    assert served.attributes["fleet.request_id"] == "plain-7"


async def test_every_answer_carries_a_request_id(traced, secret) -> None:
    """Refusals too (bad key, unknown model, wrong method), each its own new id; an insane
    client id (too long, or not visible ASCII) is replaced."""
    router, _ = traced
    _, key = secret
    auth = {"Authorization": f"Bearer {key}"}
    refusals = [
        await router.client.post("/v1/chat/completions", json=chat(), headers={"Authorization": "Bearer no"}),
        await router.client.post("/v1/chat/completions", json={**chat(), "model": "nope"}, headers=auth),
        await router.client.get("/v1/chat/completions", headers=auth),
    ]  # fmt: skip
    assert [r.status_code for r in refusals] == [401, 404, 405]
    ids = [r.headers["x-request-id"] for r in refusals]
    assert len(set(ids)) == 3 and all(len(i) == 32 for i in ids)
    long = await router.client.post(
        "/v1/chat/completions", json=chat(), headers={**auth, "X-Request-Id": "x" * 129}
    )
    assert long.status_code == 200 and len(long.headers["x-request-id"]) == 32


def test_request_ids_are_kept_only_when_sane() -> None:
    assert request_id_for(b"abc-123_XYZ.~") == b"abc-123_XYZ.~"
    assert request_id_for(b"x" * 128) == b"x" * 128
    for insane in (b"", b"x" * 129, b"with space", b"tab\there", b"caf\xc3\xa9", b"\x7f"):
        fresh = request_id_for(insane)
        assert fresh != insane and uuid.UUID(hex=fresh.decode()).version == 4
    assert request_id_for(None) != request_id_for(None)


def test_the_replica_returns_and_echoes_request_ids(replica: LiveReplica) -> None:
    with replica.http() as client:
        echoed = client.get("/v1/models", headers={"X-Request-Id": "direct-1"})
        fresh = client.get("/v1/models", headers={"X-Request-Id": "bad id"})
    assert echoed.headers["x-request-id"] == "direct-1"
    assert uuid.UUID(hex=fresh.headers["x-request-id"]).version == 4


def test_without_an_endpoint_the_servers_run_without_opentelemetry() -> None:
    """A plain install (no `otel` extra): with OpenTelemetry unimportable, a router and a replica
    app are built and a request id made."""
    code = """
import sys
class NoOtel:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "opentelemetry":
            raise ImportError("no opentelemetry here")
sys.meta_path.insert(0, NoOtel())
from router.app import RouterApp
from router.config import RouterConfig
from replica.http_api.app import build_app
from replica.http_api.runtime import ReplicaSettings
assert RouterApp(RouterConfig(replicas=["http://127.0.0.1:9"])).tracer is None
build_app(ReplicaSettings(model="m", served_model_name="m"), lambda: None)
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_otlp_endpoint_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--otlp-endpoint` on both servers, or the SDK's own variable (how `fleet up`'s children
    inherit it); a collector's base URL gets the traces path."""
    from fleet.telemetry import OTLP_ENDPOINT_ENV, traces_url
    from replica.__main__ import parse_args as replica_args
    from router.__main__ import config_from_args
    from router.__main__ import parse_args as router_args

    monkeypatch.delenv(OTLP_ENDPOINT_ENV, raising=False)
    assert config_from_args(router_args(["--replica", "http://h:1"])).otlp_endpoint is None
    given = router_args(["--replica", "http://h:1", "--otlp-endpoint", "http://c:4318"])
    assert config_from_args(given).otlp_endpoint == "http://c:4318"
    assert replica_args(["--model", "m", "--otlp-endpoint", "http://c:4318"]).otlp_endpoint
    monkeypatch.setenv(OTLP_ENDPOINT_ENV, "http://env:4318")
    assert config_from_args(router_args(["--replica", "http://h:1"])).otlp_endpoint == (
        "http://env:4318"
    )
    assert replica_args(["--model", "m"]).otlp_endpoint == "http://env:4318"
    assert traces_url("http://c:4318") == "http://c:4318/v1/traces"
    assert traces_url("http://c:4318/") == "http://c:4318/v1/traces"
    assert traces_url("https://c/otlp/v1/traces") == "https://c/otlp/v1/traces"


def test_the_replicas_log_lines_carry_the_request_id() -> None:
    """Its own lines about a request, and uvicorn's access lines (their format shows it)."""
    import logging

    from uvicorn.logging import AccessFormatter

    from replica.http_api.tracing import RequestContext, RequestIdFilter, current
    from replica.http_api.uvicorn_runner import logging_config

    def record(name: str, msg: str, args: tuple) -> logging.LogRecord:
        return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args, None)

    token = current.set(RequestContext("req-9"))
    try:
        own = record("replica.http_api.sse_response", "stream failed at %d%%", (50,))
        access = record(
            "uvicorn.access", '%s - "%s %s HTTP/%s" %d', ("1.2.3.4:5", "POST", "/v1/x", "1.1", 200)
        )
        assert RequestIdFilter().filter(own) and RequestIdFilter().filter(access)
    finally:
        current.reset(token)
    assert own.getMessage() == "stream failed at 50% (request req-9)"
    outside = record("replica.x", "idle", ())
    RequestIdFilter().filter(outside)
    assert outside.getMessage() == "idle"
    fmt = logging_config()["formatters"]["access"]["fmt"]
    assert AccessFormatter(fmt, use_colors=False).format(access).endswith("200 OK request=req-9")


async def test_the_routers_access_lines_carry_the_request_id(
    traced, secret, caplog: pytest.LogCaptureFixture
) -> None:
    router, _ = traced
    _, key = secret
    caplog.set_level("DEBUG", logger="router.access")
    headers = {"Authorization": f"Bearer {key}", "X-Request-Id": "logged-1"}
    ok = await router.client.post("/v1/chat/completions", json=chat(), headers=headers)
    refused = await router.client.post(
        "/v1/chat/completions", json={**chat(), "model": "nope"}, headers=headers
    )
    assert (ok.status_code, refused.status_code) == (200, 404)
    lines = [r.getMessage() for r in caplog.records if r.name == "router.access"]
    assert any("status=200" in line and line.endswith("request=logged-1") for line in lines)
    assert any("status=404" in line and line.endswith("request=logged-1") for line in lines)
    assert any(f"replica={REPLICA_ID}" in line for line in lines)
