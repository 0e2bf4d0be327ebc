"""The real segment-analytics-python client, pointed at sendtime, just works."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import grpc.aio
import pytest
from segment.analytics import Client

from sendtime.server.app import Sendtime
from sendtime.v1 import profile_service_pb2
from tests.conftest import DEV_AUTH, profile_stub


@pytest.mark.parametrize("gzip", [False, True], ids=["plain", "gzip"])
async def test_segment_client_events_land_in_the_profile(
    server: Sendtime, channel: grpc.aio.Channel, gzip: bool
) -> None:
    errors: list[Exception] = []

    def send_like_a_shop() -> None:
        client = Client(
            "dev-key",
            host=f"http://127.0.0.1:{server.http_port}",
            gzip=gzip,
            # the default mode: a consumer thread batches calls to /v1/batch
            on_error=lambda error, _batch: errors.append(error),
            max_retries=1,
        )
        client.identify(
            "shopper-1",
            {"email": "grace@example.com", "firstName": "Grace", "consent": {"marketing": True}},
            context={"timezone": "America/New_York"},
        )
        client.track("shopper-1", "Product Viewed", {"product_id": "p-9", "name": "Kettle", "price": 39.0})
        client.track(
            "shopper-1",
            "Product Added",
            {"cart_id": "cart-7", "product_id": "p-9", "name": "Kettle", "price": 39.0, "quantity": 1},
        )
        client.track(
            "shopper-1",
            "Order Completed",
            {
                "order_id": "o-77",
                "cart_id": "cart-7",
                "total": 39.0,
                "currency": "usd",
                "products": [{"product_id": "p-9"}],
            },
            timestamp=datetime.now(UTC),
        )
        client.flush()  # blocks until the consumer has posted everything
        client.shutdown()

    await asyncio.to_thread(send_like_a_shop)
    assert errors == []
    stub = profile_stub(channel)
    reply = await stub.GetProfile(
        profile_service_pb2.GetProfileRequest(user_id="shopper-1"), metadata=DEV_AUTH
    )
    profile = reply.profile
    assert profile.traits.email == "grace@example.com"
    assert profile.traits.first_name == "Grace"
    assert profile.traits.timezone == "America/New_York"
    assert [v.product_id for v in profile.recently_viewed] == ["p-9"]
    assert list(profile.carts) == [], "the order closed the cart"
    (order,) = profile.orders
    assert (order.order_id, order.total, order.currency) == ("o-77", 39.0, "USD")
    assert profile.event_count == 4
