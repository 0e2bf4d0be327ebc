"""OpenTelemetry traces: a tracer provider of the server's own (never the
process-wide global one, so several servers in one process, as in the tests,
each keep theirs), W3C trace context in and out, export over OTLP.

Off unless tracing.otlp_endpoint is set (or a test hands in an exporter):
then nothing is built, and the code that would make spans is given no tracer
and skips them, at the cost of one ``is None`` each.

Both OTLP transports are there: "grpc" (the collector's port 4317; it runs on
the grpcio sendtime already pins) and "http/protobuf" (4318, for backends and
proxies that take HTTP only). Spans leave in batches from a thread of the
SDK's, never from the event loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import metadata

from opentelemetry.context import Context
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from sendtime.server.settings import TracingSettings

INSTRUMENTATION_NAME = "sendtime.server"


class Tracing:
    """The server's tracer provider, its tracer, and the W3C propagator."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer: Tracer = provider.get_tracer(INSTRUMENTATION_NAME, _version())
        self.propagator: TextMapPropagator = TraceContextTextMapPropagator()

    def extract(self, carrier: Mapping[str, str]) -> Context:
        """The caller's trace context (traceparent, tracestate), if it sent one."""
        return self.propagator.extract(carrier)

    def shutdown(self) -> None:
        """Export what is left and stop (blocks: run it in a thread)."""
        self.provider.shutdown()


def build_tracing(settings: TracingSettings, exporter: SpanExporter | None = None) -> Tracing | None:
    """None when tracing is off. ``exporter`` (tests: the SDK's
    InMemorySpanExporter) replaces OTLP and gets each span as it ends."""
    if exporter is None and not settings.otlp_endpoint:
        return None
    provider = TracerProvider(
        resource=Resource.create({"service.name": settings.service_name, "service.version": _version()}),
        sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
        # shut down with the server, not at interpreter exit (several servers may share a process)
        shutdown_on_exit=False,
    )
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(settings)))
    return Tracing(provider)


def _otlp_exporter(settings: TracingSettings) -> SpanExporter:
    headers = dict(settings.otlp_headers)
    if settings.otlp_protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(
            endpoint=settings.otlp_endpoint,
            insecure=settings.otlp_endpoint.startswith("http://"),
            headers=headers,
            timeout=settings.otlp_timeout_s,
        )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter(endpoint=settings.otlp_endpoint, headers=headers, timeout=settings.otlp_timeout_s)


def _version() -> str:
    try:
        return metadata.version("sendtime")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree
        return "0"
