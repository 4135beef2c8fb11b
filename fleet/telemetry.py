"""The OpenTelemetry tracer provider `fleet router` and `fleet replica` export spans through when
given `--otlp-endpoint` (OTLP over HTTP, to a collector, Jaeger, Tempo...).

OpenTelemetry is the `otel` extra: it is imported here, and only when an endpoint is set, so a
plain install runs without it and a process without an endpoint does no tracing work at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

OTLP_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"  # the SDK's own name, so `fleet up` passes it on
TRACES_PATH = "/v1/traces"


def traces_url(endpoint: str) -> str:
    """A collector's base URL (`http://collector:4318`, as OTEL_EXPORTER_OTLP_ENDPOINT) gets the
    traces path appended; a URL with a path is used as given."""
    if urlsplit(endpoint).path.strip("/"):
        return endpoint
    return endpoint.rstrip("/") + TRACES_PATH


def otlp_provider(endpoint: str, service: str) -> TracerProvider:
    """Spans batched in a background thread and posted to `endpoint`; `shutdown()` flushes."""
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise SystemExit(
            f"--otlp-endpoint needs OpenTelemetry: pip install 'fleetserve[otel]' ({exc})"
        ) from None
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url(endpoint))))
    return provider
