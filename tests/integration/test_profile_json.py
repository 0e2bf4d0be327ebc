"""One profile, one JSON shape at every door: ``GET /v1/profiles/{user_id}``
answers exactly what ``sendtime profile --json`` prints, which is protobuf's
JSON mapping of the gRPC message (proto field names; extra traits as an object
and the event count as a number)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc.aio
import pytest
from google.protobuf import json_format

from sendtime.server.app import Sendtime
from sendtime.v1 import profile_service_pb2
from tests.conftest import DEV_AUTH, profile_stub
from tests.integration.test_cli import RunCli, cli  # noqa: F401  (the fixture)

AUTH = {"Authorization": "Bearer dev-key"}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def event(kind: str, message_id: str, timestamp: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "messageId": message_id, "timestamp": timestamp, **fields}


async def http_profile(session: aiohttp.ClientSession, server: Sendtime, query: str) -> dict[str, Any]:
    async with session.get(f"http://127.0.0.1:{server.http_port}/v1/profiles{query}", headers=AUTH) as r:
        assert r.status == 200, await r.text()
        assert r.content_type == "application/json"
        body: dict[str, Any] = await r.json()
        return body


async def test_http_and_the_cli_show_a_profile_alike(
    server: Sendtime,
    session: aiohttp.ClientSession,
    cli: RunCli,  # noqa: F811
) -> None:
    # A profile with every part: traits and consent, extra traits, an open
    # cart, views, a refunded order, and an anonymous visitor of its own.
    batch = [
        event(
            "identify",
            "i1",
            "2026-11-01T09:00:00Z",
            userId="ada",
            traits={
                "email": "ada@example.com",
                "firstName": "Ada",
                "plan": "pro",
                "seats": 3,
                "consent": {"marketing": True, "sms": False},
            },
            context={"timezone": "Europe/London", "locale": "en-GB"},
        ),
        event(
            "track",
            "v1",
            "2026-11-01T09:01:00.250Z",
            userId="ada",
            event="Product Viewed",
            properties={"product_id": "kettle-steel", "name": "Kettle", "price": 64},
        ),
        event(
            "track",
            "a1",
            "2026-11-01T09:02:00Z",
            userId="ada",
            event="Product Added",
            properties={"cart_id": "c1", "product_id": "mug-ceramic", "price": 14, "quantity": 2},
        ),
        event(
            "track",
            "o1",
            "2026-11-01T09:03:00Z",
            userId="ada",
            event="Order Completed",
            properties={
                "order_id": "o-1",
                "total": 52.5,
                "currency": "EUR",
                "products": [{"product_id": "teapot-cast"}],
            },
        ),
        event(
            "track",
            "r1",
            "2026-11-01T09:04:00Z",
            userId="ada",
            event="Order Refunded",
            properties={"order_id": "o-1", "total": 52.5},
        ),
        event(
            "track",
            "a2",
            "2026-11-01T09:05:00Z",
            userId="ada",
            event="Product Added",
            properties={"cart_id": "c2", "product_id": "tea-sencha", "price": 11.5},
        ),
        event(
            "track",
            "x1",
            "2026-11-01T09:06:00Z",
            anonymousId="visitor-9",
            event="Product Viewed",
            properties={"product_id": "mug-espresso"},
        ),
    ]
    async with session.post(
        f"http://127.0.0.1:{server.http_port}/v1/batch", json={"batch": batch}, headers=AUTH
    ) as response:
        assert response.status == 200, await response.text()

    over_http = await http_profile(session, server, "/ada")
    printed = await cli("profile", "ada", "--json")
    assert printed.code == 0, printed.stderr
    assert over_http == printed.json()

    # The shape, as documented in the README
    assert over_http["user_id"] == "ada"
    assert over_http["traits"] == {
        "email": "ada@example.com",
        "first_name": "Ada",
        "locale": "en-GB",
        "timezone": "Europe/London",
        "consent": {"marketing": "CONSENT_STATE_OPTED_IN", "sms": "CONSENT_STATE_OPTED_OUT"},
    }
    assert over_http["extra_traits"] == {"plan": "pro", "seats": 3}
    assert over_http["event_count"] == 6
    assert over_http["first_seen_time"] == "2026-11-01T09:00:00Z"
    assert over_http["recently_viewed"][0]["view_time"] == "2026-11-01T09:01:00.250Z"
    assert over_http["carts"][0]["update_time"] == "2026-11-01T09:05:00Z"
    (order,) = over_http["orders"]
    assert (order["refund_time"], order["refunded_total"]) == ("2026-11-01T09:04:00Z", 52.5)
    assert set(over_http) == {
        "user_id", "traits", "extra_traits", "carts", "recently_viewed", "orders",
        "first_seen_time", "last_activity_time", "event_count",
    }  # fmt: skip

    # ... and it is the gRPC message through protobuf's own JSON printer
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        reply = await profile_stub(channel).GetProfile(
            profile_service_pb2.GetProfileRequest(user_id="ada"), metadata=DEV_AUTH
        )
    mapped = json_format.MessageToDict(reply.profile, preserving_proto_field_name=True)
    assert json.loads(reply.profile.extra_traits_json) == over_http["extra_traits"]
    assert mapped.pop("event_count") == "6"  # uint64: a string in the mapping, a number here
    del mapped["extra_traits_json"]
    assert {k: v for k, v in over_http.items() if k not in ("extra_traits", "event_count")} == mapped

    # An anonymous visitor, through the query form of the route
    anonymous = await http_profile(session, server, "?anonymous_id=visitor-9")
    printed = await cli("profile", "--anonymous-id", "visitor-9", "--json")
    assert printed.code == 0, printed.stderr
    assert anonymous == printed.json()
    assert anonymous["anonymous_id"] == "visitor-9"
    assert "user_id" not in anonymous  # at its default: left out, as the mapping does
