"""GET /metrics on a real sendtime: every catalogued family is there, and the
counters move with real gRPC and HTTP calls, real upstreams and a real ESP."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import grpc
import grpc.aio
import pytest
from aiohttp import web

from sendtime.server.app import Sendtime
from sendtime.server.observe import CATALOGUE, Kind
from sendtime.v1 import (
    content_service_pb2,
    content_service_pb2_grpc,
    event_pb2,
    event_service_pb2,
)
from sendtime.v1 import delivery_service_pb2 as D
from tests.conftest import DEV_AUTH, SettingsFactory, event_stub
from tests.integration.observing import Families, recording_upstream, scrape, value
from tests.integration.test_delivery import (
    add_to_cart,
    channel_to,
    flows_config,
    identify,
    ingest,
    track,
    wait_for_status,
)

C = content_service_pb2


def _family_name(name: str, kind: Kind) -> str:
    # the parser names a counter's family without its _total
    return name.removesuffix("_total") if kind is Kind.COUNTER else name


async def test_every_catalogued_family_is_exported(server: Sendtime) -> None:
    families = await scrape(server.http_port)
    for info in CATALOGUE:
        family = families.get(_family_name(info.name, info.kind))
        assert family is not None, f"{info.name} is catalogued but not exported"
        assert family.type == info.kind.value, info.name
        assert family.documentation == info.help
    exported = {name for name in families if name.startswith("sendtime_")}
    catalogued = {_family_name(info.name, info.kind) for info in CATALOGUE}
    assert exported == catalogued
    assert value(families, "sendtime_build_info") == 1
    assert "process_cpu_seconds" in families  # prometheus_client's own, beside ours


async def test_names_carry_their_units() -> None:
    for info in CATALOGUE:
        assert info.name.startswith("sendtime_")
        if info.kind is Kind.COUNTER:
            assert info.name.endswith("_total"), info.name
        if info.kind is Kind.HISTOGRAM:
            assert info.name.endswith(("_seconds", "_ratio")), info.name
        assert "user" not in info.labels
        assert "email" not in info.labels


async def test_grpc_and_http_calls_move_the_counters(server: Sendtime) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        events = event_stub(channel)
        reply = await events.IngestEvents(
            event_service_pb2.IngestEventsRequest(
                events=[
                    track("m1", "Product Viewed", {"product_id": "kettle-steel"}),
                    track("m1", "Product Viewed", {"product_id": "kettle-steel"}),  # a duplicate
                    event_pb2.Event(message_id="m2", user_id="ada"),  # no payload: rejected
                ]
            ),
            metadata=DEV_AUTH,
        )
        assert [a.outcome for a in reply.acks] == [
            event_pb2.EVENT_OUTCOME_ACCEPTED,
            event_pb2.EVENT_OUTCOME_DUPLICATE,
            event_pb2.EVENT_OUTCOME_REJECTED,
        ]
        content = content_service_pb2_grpc.ContentServiceStub(channel)
        for _ in range(2):  # the second is answered from the cache
            await content.GetContent(
                C.GetContentRequest(user_id="ada", blocks=["recently_viewed", "cart", "no_such_block"]),
                metadata=DEV_AUTH,
                timeout=1.0,
            )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await content.GetContent(C.GetContentRequest(user_id="ada"))  # no key
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as unimplemented:
            await channel.unary_unary("/other.Service/Method", None, None)(b"")
        assert unimplemented.value.code() == grpc.StatusCode.UNIMPLEMENTED
    async with aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{server.http_port}"
        auth = {"Authorization": "Bearer dev-key"}
        async with http.get(f"{base}/v1/content/ada?blocks=cart", headers=auth) as response:
            assert response.status == 200
        async with http.get(f"{base}/v1/content/bob?blocks=cart") as response:
            assert response.status == 401
        async with http.get(f"{base}/no/such/path") as response:
            assert response.status == 404

    families = await scrape(server.http_port)
    content_service = {"service": "sendtime.v1.ContentService", "method": "GetContent"}
    assert value(families, "sendtime_grpc_requests_total", code="OK", **content_service) == 2
    assert value(families, "sendtime_grpc_requests_total", code="UNAUTHENTICATED", **content_service) == 1
    assert value(families, "sendtime_grpc_requests_total", service="unknown", code="UNIMPLEMENTED") == 1
    assert value(families, "sendtime_grpc_request_duration_seconds_count", **content_service) == 3
    assert value(families, "sendtime_grpc_request_duration_seconds_sum", **content_service) > 0
    assert (
        value(
            families,
            "sendtime_grpc_requests_total",
            service="sendtime.v1.EventService",
            method="IngestEvents",
            code="OK",
        )
        == 1
    )
    content_route = {"route": "/v1/content/{user_id}", "method": "GET"}
    assert value(families, "sendtime_http_requests_total", status="200", **content_route) == 1
    assert value(families, "sendtime_http_requests_total", status="401", **content_route) == 1
    assert value(families, "sendtime_http_requests_total", route="unmatched", status="404") == 1
    # the path's user ids never become labels
    assert not any("ada" in str(s.labels) for f in families.values() for s in f.samples)

    assert value(families, "sendtime_ingest_events_total", outcome="accepted") == 1
    assert value(families, "sendtime_ingest_events_total", outcome="duplicate") == 1
    assert value(families, "sendtime_ingest_events_total", outcome="rejected", reason="INVALID_EVENT") == 1
    assert value(families, "sendtime_ingest_ack_lag_seconds_count") == 1
    assert value(families, "sendtime_store_commits_total") >= 1

    blocks = "sendtime_content_blocks_total"
    assert value(families, blocks, block="recently_viewed", source="fresh") == 1
    assert value(families, blocks, block="recently_viewed", source="cached") == 1
    assert value(families, blocks, block="cart", source="fallback", reason="missing_data") == 3
    assert value(families, blocks, block="unknown", source="fallback", reason="missing_data") == 2
    assert value(families, "sendtime_content_budget_used_ratio_count", call="content") == 3
    ratio_sum = value(families, "sendtime_content_budget_used_ratio_sum", call="content")
    assert 0 < ratio_sum < 3
    assert value(families, "sendtime_cache_lookups_total", result="hit") >= 2
    assert value(families, "sendtime_cache_entries") >= 1
    assert value(families, "sendtime_cache_size_bytes") > 0
    assert value(families, "sendtime_cache_capacity_bytes") == 64 * 1024 * 1024
    assert value(families, "sendtime_cache_fetches_total") >= 2


async def test_upstream_latency_and_circuit_state_per_host(make_settings: SettingsFactory) -> None:
    async with recording_upstream(status=503) as upstream:
        config = upstream.config(extra="breaker_failures = 2\nbreaker_reset_s = 60.0")
        async with (
            Sendtime(make_settings(config)) as app,
            grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel,
        ):
            content = content_service_pb2_grpc.ContentServiceStub(channel)
            for user in ("u1", "u2", "u3"):
                reply = await content.GetContent(
                    C.GetContentRequest(user_id=user, blocks=["loyalty"]), metadata=DEV_AUTH, timeout=1.0
                )
                assert reply.blocks[0].source == C.BLOCK_SOURCE_FALLBACK
            families = await scrape(app.http_port)
    host = {"upstream": "loyalty", "host": "127.0.0.1"}
    assert value(families, "sendtime_upstream_requests_total", outcome="http_error", **host) == 2
    assert value(families, "sendtime_upstream_request_duration_seconds_count", **host) == 2
    assert value(families, "sendtime_upstream_circuit_state", host="127.0.0.1", state="open") == 1
    assert value(families, "sendtime_upstream_circuit_state", host="127.0.0.1", state="closed") == 0
    assert value(families, "sendtime_upstream_circuit_opened_total", host="127.0.0.1") == 1
    assert value(families, "sendtime_upstream_circuit_rejections_total", host="127.0.0.1") == 1
    assert value(families, "sendtime_cache_fetch_failures_total") == 2
    blocks = "sendtime_content_blocks_total"
    assert value(families, blocks, block="loyalty", source="fallback", reason="upstream_error") == 2
    assert value(families, blocks, block="loyalty", source="fallback", reason="circuit_open") == 1
    assert len(upstream.paths) == 2


async def test_flows_and_relay_counters(make_settings: SettingsFactory) -> None:
    """A real ESP (SendGrid's API shape) that answers 429, then 202: one send
    with a retry; a user with no email skipped; an order that cancels."""
    answers = [web.Response(status=429, headers={"Retry-After": "0"}), web.Response(status=202)]
    received: list[object] = []

    async def mail_send(request: web.Request) -> web.Response:
        received.append(await request.json())
        return answers.pop(0) if answers else web.Response(status=202)

    esp = web.Application()
    esp.router.add_post("/v3/mail/send", mail_send)
    runner = web.AppRunner(esp)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    relay = (
        f'kind = "sendgrid"\napi_key = "SG.test"\nbase_url = "http://127.0.0.1:{runner.addresses[0][1]}"\n'
    )
    try:
        async with (
            Sendtime(make_settings(flows_config(relay, delay_s=0.0))) as app,
            channel_to(app) as channel,
        ):
            await ingest(channel, identify("i1"), add_to_cart("a1"))
            await wait_for_status(channel, {D.DELIVERY_STATUS_SENT})
            await ingest(channel, add_to_cart("a2", cart="c2", user="noemail"))
            await wait_for_status(channel, {D.DELIVERY_STATUS_SKIPPED}, user="noemail")
            families = await scrape(app.http_port)
    finally:
        await runner.cleanup()
    flow = {"flow": "abandoned_cart"}
    assert value(families, "sendtime_sends_scheduled_total", **flow) == 2
    assert value(families, "sendtime_sends_sent_total", relay="sendgrid", **flow) == 1
    assert value(families, "sendtime_sends_skipped_total", reason="no_email", **flow) == 1
    assert value(families, "sendtime_send_latency_seconds_count", **flow) == 1
    assert value(families, "sendtime_relay_attempts_total", relay="sendgrid", outcome="transient") == 1
    assert value(families, "sendtime_relay_attempts_total", relay="sendgrid", outcome="accepted") == 1
    assert value(families, "sendtime_relay_retries_total", relay="sendgrid") == 1
    assert value(families, "sendtime_relay_attempt_duration_seconds_count", relay="sendgrid") == 2
    assert len(received) == 2


async def test_exits_count_as_cancelled(make_settings: SettingsFactory) -> None:
    async with (
        Sendtime(make_settings(flows_config('kind = "outbox"', delay_s=30.0))) as app,
        channel_to(app) as channel,
    ):
        await ingest(channel, identify("i1"), add_to_cart("a1"))
        await ingest(channel, track("o1", "Order Completed", {"order_id": "o1", "cart_id": "c1"}))
        await wait_for_status(channel, {D.DELIVERY_STATUS_CANCELLED})
        families = await scrape(app.http_port)
    assert value(families, "sendtime_sends_scheduled_total", flow="abandoned_cart") == 1
    assert value(families, "sendtime_sends_cancelled_total", flow="abandoned_cart") == 1


async def test_metrics_can_be_turned_off(make_settings: SettingsFactory) -> None:
    async with (
        Sendtime(make_settings(metrics__enabled="false")) as app,
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{app.http_port}/metrics") as response,
    ):
        assert response.status == 404
        assert app.telemetry.metrics is None


async def test_metrics_can_require_the_admin_key(make_settings: SettingsFactory) -> None:
    async with Sendtime(make_settings(metrics__require_admin_key="true")) as app:
        url = f"http://127.0.0.1:{app.http_port}/metrics"
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            assert response.status == 401
            assert json.loads(await response.text())["error"]["code"] == "UNAUTHENTICATED"
        families = await scrape(app.http_port, headers={"Authorization": "Bearer dev-key"})
        assert "sendtime_build_info" in families


async def test_openmetrics_when_asked(server: Sendtime) -> None:
    accept = {"Accept": "application/openmetrics-text; version=1.0.0"}
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{server.http_port}/metrics", headers=accept) as response,
    ):
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        assert (await response.text()).rstrip().endswith("# EOF")


async def test_a_scrape_during_load_sees_consistent_counts(server: Sendtime) -> None:
    """Scrapes run on the event loop between requests: counts are never torn."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        content = content_service_pb2_grpc.ContentServiceStub(channel)

        async def call() -> None:
            await content.GetContent(
                C.GetContentRequest(user_id="ada", blocks=["cart"]), metadata=DEV_AUTH, timeout=2.0
            )

        results = await asyncio.gather(*(call() for _ in range(50)), scrape(server.http_port))
        assert isinstance(results[-1], dict)
        families: Families = await scrape(server.http_port)
    method = {"service": "sendtime.v1.ContentService", "method": "GetContent"}
    assert value(families, "sendtime_grpc_requests_total", code="OK", **method) == 50
    assert value(families, "sendtime_content_blocks_total", block="cart") == 50
