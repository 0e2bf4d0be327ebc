"""OpenTelemetry traces from a real sendtime: the span tree of a GetContent
with an upstream block (SDK's InMemorySpanExporter), the caller's W3C trace
context continued and passed on to a real upstream HTTP server, relay
attempts, and export over OTLP to real receivers (gRPC and HTTP) on loopback."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import grpc
import grpc.aio
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from sendtime.server.app import Sendtime
from sendtime.v1 import content_service_pb2, content_service_pb2_grpc
from sendtime.v1 import delivery_service_pb2 as D
from tests.conftest import DEV_AUTH, SettingsFactory
from tests.integration.conftest import eventually
from tests.integration.observing import recording_upstream, scrape, value
from tests.integration.test_delivery import (
    add_to_cart,
    channel_to,
    flows_config,
    identify,
    ingest,
    wait_for_status,
)

C = content_service_pb2


def caller_context() -> tuple[int, int, str]:
    """A trace id and span id as a caller would have them, and its traceparent."""
    trace_id, span_id = int(secrets.token_hex(16), 16), int(secrets.token_hex(8), 16)
    return trace_id, span_id, f"00-{trace_id:032x}-{span_id:016x}-01"


def one(spans: list[ReadableSpan], name: str, **attributes: object) -> ReadableSpan:
    found = [
        s
        for s in spans
        if s.name == name and all((s.attributes or {}).get(k) == v for k, v in attributes.items())
    ]
    assert len(found) == 1, (name, attributes, [s.name for s in spans])
    return found[0]


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_get_content_span_tree_and_traceparent_to_the_upstream(make_settings: SettingsFactory) -> None:
    exporter = InMemorySpanExporter()
    trace_id, caller_span_id, traceparent = caller_context()
    async with recording_upstream() as upstream:
        async with (
            Sendtime(make_settings(upstream.config()), span_exporter=exporter) as app,
            grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel,
        ):
            reply = await content_service_pb2_grpc.ContentServiceStub(channel).GetContent(
                C.GetContentRequest(user_id="ada", blocks=["loyalty", "cart"]),
                metadata=(*DEV_AUTH, ("traceparent", traceparent)),
                timeout=2.0,
            )
            assert {b.name: b.source for b in reply.blocks}["loyalty"] == C.BLOCK_SOURCE_FRESH
        spans = list(exporter.get_finished_spans())

    rpc = one(spans, "sendtime.v1.ContentService/GetContent")
    assert rpc.kind is SpanKind.SERVER
    assert rpc.context.trace_id == trace_id
    assert parent_id(rpc) == caller_span_id  # the caller's span is the parent
    assert rpc.attributes is not None
    assert rpc.attributes["rpc.system"] == "grpc"
    assert rpc.attributes["rpc.grpc.status_code"] == 0

    loyalty = one(spans, "sendtime.block", **{"sendtime.block": "loyalty"})
    cart = one(spans, "sendtime.block", **{"sendtime.block": "cart"})
    assert parent_id(loyalty) == parent_id(cart) == rpc.context.span_id
    assert loyalty.attributes is not None
    assert loyalty.attributes["sendtime.block.source"] == "fresh"
    assert cart.attributes is not None
    assert (cart.attributes["sendtime.block.source"], cart.attributes["sendtime.block.reason"]) == (
        "fallback",
        "missing_data",
    )

    call = one(spans, "GET loyalty")
    assert call.kind is SpanKind.CLIENT
    assert parent_id(call) == loyalty.context.span_id
    assert call.attributes is not None
    assert call.attributes["server.address"] == "127.0.0.1"
    assert "ada" not in str(call.attributes)  # the URL template, not the user's URL
    assert all(s.context.trace_id == trace_id for s in spans)

    # the upstream got the trace context, with sendtime's client span as parent
    (headers,) = upstream.headers
    assert headers["traceparent"] == f"00-{trace_id:032x}-{call.context.span_id:016x}-01"


async def test_render_and_http_spans(make_settings: SettingsFactory) -> None:
    exporter = InMemorySpanExporter()
    trace_id, caller_span_id, traceparent = caller_context()
    async with recording_upstream() as upstream:
        async with Sendtime(make_settings(upstream.config()), span_exporter=exporter) as app:
            url = f"http://127.0.0.1:{app.http_port}/v1/content/ada?blocks=loyalty"
            headers = {"Authorization": "Bearer dev-key", "traceparent": traceparent}
            async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as response:
                assert response.status == 200
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
                await content_service_pb2_grpc.ContentServiceStub(channel).RenderEmail(
                    C.RenderEmailRequest(template_id="abandoned_cart", user_id="ada"),
                    metadata=DEV_AUTH,
                    timeout=2.0,
                )
        spans = list(exporter.get_finished_spans())

    http_span = one(spans, "GET /v1/content/{user_id}")
    assert http_span.kind is SpanKind.SERVER
    assert (http_span.context.trace_id, parent_id(http_span)) == (trace_id, caller_span_id)
    assert http_span.attributes is not None
    assert http_span.attributes["http.response.status_code"] == 200
    assert upstream.headers[0]["traceparent"].startswith(f"00-{trace_id:032x}-")

    render_rpc = one(spans, "sendtime.v1.ContentService/RenderEmail")
    assert render_rpc.parent is None  # no caller context: a new trace
    assert render_rpc.context.trace_id != trace_id
    render = one(spans, "sendtime.render")
    assert parent_id(render) == render_rpc.context.span_id
    assert render.attributes is not None
    assert render.attributes["sendtime.template"] == "abandoned_cart"


async def test_errors_mark_the_span(make_settings: SettingsFactory) -> None:
    exporter = InMemorySpanExporter()
    async with (
        Sendtime(make_settings(), span_exporter=exporter) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await content_service_pb2_grpc.ContentServiceStub(channel).GetContent(
                C.GetContentRequest(user_id="ada")
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        families = await scrape(app.http_port)
    # with a span to make, the call takes the full path, and is still counted
    method = {"service": "sendtime.v1.ContentService", "method": "GetContent"}
    assert value(families, "sendtime_grpc_requests_total", code="UNAUTHENTICATED", **method) == 1
    span = one(list(exporter.get_finished_spans()), "sendtime.v1.ContentService/GetContent")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]


async def test_a_send_is_a_trace_with_its_render_and_relay_attempts(make_settings: SettingsFactory) -> None:
    exporter = InMemorySpanExporter()
    async with (
        Sendtime(make_settings(flows_config('kind = "outbox"', delay_s=0.0)), span_exporter=exporter) as app,
        channel_to(app) as channel,
    ):
        await ingest(channel, identify("i1"), add_to_cart("a1"))
        await wait_for_status(channel, {D.DELIVERY_STATUS_SENT})

        async def finished() -> list[Any]:
            return list(exporter.get_finished_spans())

        # the send's span ends right after the ledger says sent
        spans = await eventually(finished, until=lambda got: any(s.name == "sendtime.send" for s in got))
    send = one(spans, "sendtime.send")
    assert send.parent is None
    assert send.attributes is not None
    assert (send.attributes["sendtime.flow"], send.attributes["sendtime.send.outcome"]) == (
        "abandoned_cart",
        "sent",
    )
    attempt = one(spans, "sendtime.relay.attempt")
    assert parent_id(attempt) == send.context.span_id
    assert attempt.kind is SpanKind.CLIENT
    assert attempt.attributes is not None
    assert (attempt.attributes["sendtime.relay"], attempt.attributes["sendtime.relay.try"]) == ("outbox", 1)
    assert parent_id(one(spans, "sendtime.render")) == send.context.span_id
    assert parent_id(one(spans, "sendtime.block", **{"sendtime.block": "cart"})) == send.context.span_id


async def test_no_tracing_unless_configured(make_settings: SettingsFactory) -> None:
    async with recording_upstream() as upstream:
        async with (
            Sendtime(make_settings(upstream.config())) as app,
            grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel,
        ):
            assert app.telemetry.tracing is None
            _, _, traceparent = caller_context()
            await content_service_pb2_grpc.ContentServiceStub(channel).GetContent(
                C.GetContentRequest(user_id="ada", blocks=["loyalty"]),
                metadata=(*DEV_AUTH, ("traceparent", traceparent)),
                timeout=2.0,
            )
        assert "traceparent" not in upstream.headers[0]


class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.metadata: list[dict[str, str]] = []

    async def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        self.metadata.append({k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)})
        return trace_service_pb2.ExportTraceServiceResponse()


@asynccontextmanager
async def otlp_grpc_receiver() -> AsyncIterator[tuple[_Receiver, int]]:
    receiver = _Receiver()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield receiver, port
    finally:
        await server.stop(None)


def exported_span_names(
    requests: list[trace_service_pb2.ExportTraceServiceRequest],
) -> tuple[set[str], set[str]]:
    names: set[str] = set()
    services: set[str] = set()
    for request in requests:
        for resource_spans in request.resource_spans:
            for attribute in resource_spans.resource.attributes:
                if attribute.key == "service.name":
                    services.add(attribute.value.string_value)
            for scope in resource_spans.scope_spans:
                names.update(span.name for span in scope.spans)
    return names, services


async def test_spans_leave_over_otlp_grpc(make_settings: SettingsFactory) -> None:
    async with otlp_grpc_receiver() as (receiver, port):
        config = (
            f'[tracing]\notlp_endpoint = "http://127.0.0.1:{port}"\nservice_name = "sendtime-test"\n'
            '[tracing.otlp_headers]\nx-backend-key = "k-123"\n'
        )
        async with (
            Sendtime(make_settings(config)) as app,
            grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel,
        ):
            await content_service_pb2_grpc.ContentServiceStub(channel).GetContent(
                C.GetContentRequest(user_id="ada", blocks=["cart"]), metadata=DEV_AUTH, timeout=2.0
            )
        # stopping the server exported what was left
        names, services = exported_span_names(receiver.requests)
    assert "sendtime.v1.ContentService/GetContent" in names
    assert "sendtime.block" in names
    assert services == {"sendtime-test"}
    assert receiver.metadata[0]["x-backend-key"] == "k-123"


async def test_spans_leave_over_otlp_http(make_settings: SettingsFactory) -> None:
    bodies: list[bytes] = []

    async def traces(request: web.Request) -> web.Response:
        assert request.headers["Content-Type"] == "application/x-protobuf"
        bodies.append(await request.read())
        return web.Response(body=trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

    receiver = web.Application()
    receiver.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(receiver)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    endpoint = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/traces"
    try:
        config = f'[tracing]\notlp_endpoint = "{endpoint}"\notlp_protocol = "http/protobuf"\n'
        async with (
            Sendtime(make_settings(config)) as app,
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{app.http_port}/healthz") as r,
        ):
            assert r.status == 200
    finally:
        await runner.cleanup()
    requests = [trace_service_pb2.ExportTraceServiceRequest.FromString(body) for body in bodies]
    names, services = exported_span_names(requests)
    assert "GET /healthz" in names
    assert services == {"sendtime"}
