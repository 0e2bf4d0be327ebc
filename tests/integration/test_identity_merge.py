"""One shopper, several ids, end to end: the real segment-analytics-python
client sends what a shop sends (a visitor browsing and filling a cart
anonymously, then giving an email), sendtime links the ids, and the
abandoned-cart email reaches the address given later, once, on SQLite and on
PostgreSQL (aiosmtpd as the relay)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any

import aiohttp
import grpc.aio
import pytest
from segment.analytics import Client

from sendtime.server.app import Sendtime
from sendtime.server.settings import Settings
from sendtime.v1 import content_service_pb2 as C
from sendtime.v1 import content_service_pb2_grpc, profile_service_pb2
from sendtime.v1 import delivery_service_pb2 as D
from tests.conftest import DEV_AUTH, SettingsFactory, profile_stub
from tests.contract.conftest import postgres_schema
from tests.integration.smtp_server import SmtpServer
from tests.integration.test_delivery import channel_to, deliveries, flows_config, smtp_relay

SENT = D.DELIVERY_STATUS_SENT
SKIPPED = D.DELIVERY_STATUS_SKIPPED
KETTLE = {"product_id": "kettle-steel", "name": "Kettle", "price": 70.0, "quantity": 1, "cart_id": "cart-1"}
SENCHA = {"product_id": "tea-sencha", "name": "Sencha", "price": 9.0, "quantity": 2, "cart_id": "cart-1"}


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    server = SmtpServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
async def settings_for(request: pytest.FixtureRequest, make_settings: SettingsFactory) -> AsyncIterator[Any]:
    """Settings for a server with the given config, on each backend."""
    if request.param == "sqlite":
        yield make_settings
        return
    async with postgres_schema() as dsn:

        def on_postgres(config: str) -> Settings:
            return make_settings(
                config,
                storage__backend="postgres",
                storage__postgres_dsn=dsn,
                delivery__unsubscribe_secret="s" * 32,
            )

        yield on_postgres


def shop(server: Sendtime, calls: list[tuple[str, dict[str, Any]]]) -> None:
    """Send ``calls`` (method, keyword arguments) with the real Segment client,
    in its default mode (a consumer thread batching to /v1/batch)."""
    errors: list[Exception] = []
    client = Client(
        "dev-key",
        host=f"http://127.0.0.1:{server.http_port}",
        on_error=lambda error, _batch: errors.append(error),
        max_retries=1,
    )
    for method, arguments in calls:
        getattr(client, method)(**arguments)
    client.flush()
    client.shutdown()
    assert errors == []


async def flow_deliveries(channel: grpc.aio.Channel) -> list[D.Delivery]:
    reply = await deliveries(channel).ListDeliveries(
        D.ListDeliveriesRequest(flow_id="abandoned_cart"), metadata=DEV_AUTH
    )
    return list(reply.deliveries)


async def until_settled(channel: grpc.aio.Channel, count: int, timeout: float = 15.0) -> list[D.Delivery]:
    """The flow's deliveries once ``count`` of them are past scheduled and sending."""
    deadline = time.monotonic() + timeout
    while True:
        found = await flow_deliveries(channel)
        settled = [
            d
            for d in found
            if d.status in (SENT, D.DELIVERY_STATUS_CANCELLED, SKIPPED, D.DELIVERY_STATUS_FAILED)
        ]
        if len(settled) >= count:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{count} deliveries never settled: {found}")
        await asyncio.sleep(0.05)


def body(message: EmailMessage) -> str:
    part = message.get_body(("plain",))
    assert part is not None
    return str(part.get_content())


async def test_a_cart_filled_anonymously_gets_its_email_at_the_address_given_later_once(
    settings_for: Any, smtp: SmtpServer
) -> None:
    now = datetime.now(UTC)
    calls = [
        (
            "track",
            {"anonymous_id": "anon-1", "event": "Product Viewed", "properties": KETTLE, "timestamp": now},
        ),
        (
            "track",
            {"anonymous_id": "anon-1", "event": "Product Added", "properties": KETTLE, "timestamp": now},
        ),
        # checkout: the visitor gives an email; identify carries both ids
        (
            "identify",
            {
                "user_id": "ada",
                "anonymous_id": "anon-1",
                "traits": {"email": "ada@example.com", "firstName": "Ada", "consent": {"marketing": True}},
                "timestamp": now + timedelta(milliseconds=1),
            },
        ),
        # then adds to the same cart logged in: a second entry, the same cart
        (
            "track",
            {
                "user_id": "ada",
                "event": "Product Added",
                "properties": SENCHA,
                "timestamp": now + timedelta(milliseconds=2),
            },
        ),
    ]
    config = flows_config(smtp_relay(smtp.port), delay_s=1.0)
    async with Sendtime(settings_for(config)) as app, channel_to(app) as channel:
        await asyncio.to_thread(shop, app, calls)
        # either id reads the person: the anonymous browsing and cart, and the email
        for request in (
            profile_service_pb2.GetProfileRequest(anonymous_id="anon-1"),
            profile_service_pb2.GetProfileRequest(user_id="ada"),
        ):
            profile = (await profile_stub(channel).GetProfile(request, metadata=DEV_AUTH)).profile
            assert profile.traits.email == "ada@example.com"
            assert [v.product_id for v in profile.recently_viewed] == ["kettle-steel"]
            (cart,) = profile.carts
            assert {line.product_id: line.quantity for line in cart.lines} == {
                "kettle-steel": 1,
                "tea-sencha": 2,
            }
        assert (list(profile.linked_user_ids), list(profile.linked_anonymous_ids)) == ([], ["anon-1"])
        settled = await until_settled(channel, 2)
        (message,) = await asyncio.to_thread(smtp.inbox.wait_for, 1)
        await asyncio.sleep(0.5)  # nothing else comes
    assert smtp.inbox.envelopes == [("shop@example.com", ["ada@example.com"])]
    assert message["To"] == "Ada <ada@example.com>"
    text = body(message)
    assert "Gooseneck Kettle, Brushed Steel" in text  # the cart's lines, named by the catalog
    assert "Sencha" in text
    # the two entries of one cart under two ids of one person: one email
    assert sorted((d.status, d.reason) for d in settled) == sorted([(SENT, ""), (SKIPPED, "duplicate")])


async def test_an_order_under_the_user_id_before_the_delay_stops_the_anonymous_carts_email(
    settings_for: Any, smtp: SmtpServer
) -> None:
    now = datetime.now(UTC)
    calls = [
        (
            "track",
            {"anonymous_id": "anon-2", "event": "Product Added", "properties": KETTLE, "timestamp": now},
        ),
        (
            "identify",
            {
                "user_id": "bea",
                "anonymous_id": "anon-2",
                "traits": {"email": "bea@example.com", "consent": {"marketing": True}},
                "timestamp": now,
            },
        ),
        (
            "track",
            {
                "user_id": "bea",
                "event": "Order Completed",
                "properties": {"order_id": "o-1", "cart_id": "cart-1", "total": 64.0},
                "timestamp": now + timedelta(milliseconds=5),
            },
        ),
    ]
    config = flows_config(smtp_relay(smtp.port), delay_s=1.0)
    async with Sendtime(settings_for(config)) as app, channel_to(app) as channel:
        await asyncio.to_thread(shop, app, calls)
        (delivery,) = await until_settled(channel, 1)
        profile = (
            await profile_stub(channel).GetProfile(
                profile_service_pb2.GetProfileRequest(anonymous_id="anon-2"), metadata=DEV_AUTH
            )
        ).profile
        await asyncio.sleep(0.5)
    # the person's cart is closed by the order: at send time there is nothing to remind of
    # (the last check before relay would also find the exit, under the person's user id)
    assert (delivery.status, delivery.reason) == (SKIPPED, "nothing to show: no cart")
    assert smtp.inbox.messages == []
    assert list(profile.carts) == [], "the order under the user id closed the anonymous cart"
    assert [order.order_id for order in profile.orders] == ["o-1"]


async def test_a_shared_device_keeps_two_shoppers_apart(settings_for: Any, smtp: SmtpServer) -> None:
    """One browser: Ada logs in, then Bob; the cart filled after Bob logged in
    is Bob's, the email goes to Bob, and Ada's profile never shows his cart."""
    now = datetime.now(UTC)

    def login(user: str, at: datetime) -> tuple[str, dict[str, Any]]:
        traits = {"email": f"{user}@example.com", "consent": {"marketing": True}}
        return ("identify", {"user_id": user, "anonymous_id": "kiosk", "traits": traits, "timestamp": at})

    calls = [
        login("ada", now - timedelta(minutes=30)),
        login("bob", now - timedelta(minutes=10)),
        (
            "track",
            {"anonymous_id": "kiosk", "event": "Product Added", "properties": KETTLE, "timestamp": now},
        ),
    ]
    config = flows_config(smtp_relay(smtp.port), delay_s=0.5)
    async with Sendtime(settings_for(config)) as app, channel_to(app) as channel:
        await asyncio.to_thread(shop, app, calls)
        (delivery,) = await until_settled(channel, 1)
        (message,) = await asyncio.to_thread(smtp.inbox.wait_for, 1)
        profiles = {
            user: (
                await profile_stub(channel).GetProfile(
                    profile_service_pb2.GetProfileRequest(user_id=user), metadata=DEV_AUTH
                )
            ).profile
            for user in ("ada", "bob")
        }
    assert delivery.status == SENT
    assert smtp.inbox.envelopes == [("shop@example.com", ["bob@example.com"])]
    assert "Gooseneck Kettle, Brushed Steel" in body(message)
    assert list(profiles["ada"].carts) == []
    assert [line.product_id for line in profiles["bob"].carts[0].lines] == ["kettle-steel"]
    # two people, each with the device's id among theirs: a user id never joins another by it
    assert profiles["ada"].traits.email == "ada@example.com"
    assert (list(profiles["ada"].linked_user_ids), list(profiles["bob"].linked_user_ids)) == ([], [])


async def test_an_exit_under_the_user_id_cancels_the_anonymous_send_at_the_last_check(
    settings_for: Any, smtp: SmtpServer
) -> None:
    """A flow that needs no cart block: the email would render, and the last
    check before relay finds the order under the person's user id."""
    now = datetime.now(UTC)
    calls = [
        (
            "track",
            {"anonymous_id": "anon-3", "event": "Product Added", "properties": KETTLE, "timestamp": now},
        ),
        (
            "identify",
            {
                "user_id": "cy",
                "anonymous_id": "anon-3",
                "traits": {"email": "cy@example.com"},
                "timestamp": now,
            },
        ),
        (
            "track",
            {
                "user_id": "cy",
                "event": "Order Completed",
                "properties": {"order_id": "o-3", "cart_id": "cart-1", "total": 64.0},
                "timestamp": now + timedelta(milliseconds=5),
            },
        ),
    ]
    config = flows_config(smtp_relay(smtp.port), delay_s=0.5).replace('require_blocks = ["cart"]\n', "")
    async with Sendtime(settings_for(config)) as app, channel_to(app) as channel:
        await asyncio.to_thread(shop, app, calls)
        (delivery,) = await until_settled(channel, 1)
        await asyncio.sleep(0.3)
    assert (delivery.status, delivery.reason) == (D.DELIVERY_STATUS_CANCELLED, "exit: Order Completed")
    assert smtp.inbox.messages == []


async def test_content_under_either_id_answers_for_the_person(make_settings: SettingsFactory) -> None:
    now = datetime.now(UTC)
    calls = [
        (
            "track",
            {"anonymous_id": "anon-4", "event": "Product Added", "properties": KETTLE, "timestamp": now},
        ),
        (
            "identify",
            {
                "user_id": "dee",
                "anonymous_id": "anon-4",
                "traits": {"email": "dee@example.com", "firstName": "Dee"},
                "timestamp": now,
            },
        ),
    ]
    async with Sendtime(make_settings()) as app, channel_to(app) as channel:
        await asyncio.to_thread(shop, app, calls)
        stub = content_service_pb2_grpc.ContentServiceStub(channel)
        for request in (
            C.GetContentRequest(user_id="dee", blocks=["cart"]),
            C.GetContentRequest(anonymous_id="anon-4", blocks=["cart"]),
        ):
            reply = await stub.GetContent(request, metadata=DEV_AUTH)
            (cart,) = reply.blocks
            assert C.BlockSource.Name(cart.source) == "BLOCK_SOURCE_FRESH"
            assert json.loads(cart.data_json)["lines"][0]["product"]["id"] == "kettle-steel"
        base = f"http://127.0.0.1:{app.http_port}/v1/content"
        headers = {"Authorization": "Bearer dev-key"}
        url = f"{base}/anon-4?anonymous=1&template=abandoned_cart"
        async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as r:
            assert r.status == 200
            email = (await r.json())["email"]
    assert email["subject"].startswith("Dee")  # the name given after the cart was filled
    assert "Gooseneck Kettle, Brushed Steel" in email["html"]
