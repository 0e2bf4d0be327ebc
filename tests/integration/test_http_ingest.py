"""Segment-compatible HTTP intake and signed webhooks against a real server."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import aiohttp
import pytest

from sendtime.server.app import Sendtime
from sendtime.server.edge.http_server import SIGNATURE_HEADER, sign
from sendtime.server.settings import hash_key
from tests.conftest import SettingsFactory

WRITE_KEY = "Basic " + base64.b64encode(b"dev-key:").decode()
SECRET = "whsec-0123456789abcdef"


@pytest.fixture
async def session() -> Any:
    async with aiohttp.ClientSession() as client:
        yield client


async def post(
    session: aiohttp.ClientSession, url: str, body: object, auth: str | None = WRITE_KEY
) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": auth} if auth else {}
    async with session.post(url, json=body, headers=headers) as response:
        return response.status, await response.json()


async def profile(session: aiohttp.ClientSession, http_url: str, user: str) -> dict[str, Any]:
    async with session.get(
        f"{http_url}/v1/profiles/{user}", headers={"Authorization": "Bearer dev-key"}
    ) as r:
        assert r.status == 200, await r.text()
        body: dict[str, Any] = await r.json()
        return body


async def test_track_identify_and_profile(session: aiohttp.ClientSession, http_url: str) -> None:
    status, body = await post(
        session,
        f"{http_url}/v1/track",
        {
            "messageId": "t-1",
            "userId": "ada",
            "event": "Product Added",
            "properties": {"cart_id": "c", "product_id": "p1", "name": "Mug", "price": 12, "quantity": 1},
            "timestamp": "2026-11-01T10:00:00Z",
        },
    )
    assert (status, body) == (200, {"success": True, "messageId": "t-1", "outcome": "accepted"})
    status, body = await post(
        session,
        f"{http_url}/v1/identify",
        {
            "messageId": "i-1",
            "userId": "ada",
            "traits": {
                "email": "ada@example.com",
                "firstName": "Ada",
                "plan": "pro",
                "consent": {"marketing": True},
            },
            "context": {"timezone": "Europe/London", "locale": "en-GB"},
        },
    )
    assert status == 200, body
    seen = await profile(session, http_url, "ada")
    assert seen["traits"] == {
        "email": "ada@example.com",
        "first_name": "Ada",
        "timezone": "Europe/London",
        "locale": "en-GB",
        "consent": {"marketing": "CONSENT_STATE_OPTED_IN"},
    }
    assert seen["extra_traits"] == {"plan": "pro"}
    assert seen["carts"][0]["lines"][0]["name"] == "Mug"


async def test_page_alias_group_are_accepted(session: aiohttp.ClientSession, http_url: str) -> None:
    bodies = {
        "page": {"messageId": "pg", "anonymousId": "anon-1", "name": "Home", "properties": {"path": "/"}},
        "alias": {"messageId": "al", "userId": "ada", "previousId": "anon-1"},
        "group": {"messageId": "gr", "userId": "ada", "groupId": "acme", "traits": {"plan": "team"}},
    }
    for route, body in bodies.items():
        status, reply = await post(session, f"{http_url}/v1/{route}", body)
        assert (status, reply["outcome"]) == (200, "accepted"), (route, reply)


async def test_batch_partial_rejection_stores_the_good(session: aiohttp.ClientSession, http_url: str) -> None:
    status, body = await post(
        session,
        f"{http_url}/v1/batch",
        {
            "batch": [
                {
                    "type": "track",
                    "messageId": "a",
                    "userId": "u",
                    "event": "Product Viewed",
                    "properties": {},
                },
                {
                    "type": "track",
                    "messageId": "b",
                    "userId": "u",
                    "event": "Order Completed",
                    "properties": {},
                },
                {"type": "identify", "messageId": "c", "userId": "u", "traits": {"email": 42}},
                {"type": "teleport", "messageId": "d", "userId": "u"},
                {"type": "track", "messageId": "e", "event": "Custom"},
            ]
        },
    )
    assert status == 400
    assert body["success"] is False
    assert body["error"]["reason"] == "INVALID_EVENTS"
    results = {r["messageId"]: r for r in body["results"]}
    assert results["a"]["outcome"] == "accepted"
    assert results["b"]["fieldViolations"] == [{"field": "properties.order_id", "description": "is required"}]
    assert results["c"]["fieldViolations"][0]["field"] == "traits.email"
    assert results["d"]["fieldViolations"][0]["field"] == "type"
    assert results["e"]["fieldViolations"][0]["field"] == "userId"
    assert (await profile(session, http_url, "u"))["event_count"] == 1


async def test_retried_body_without_message_id_is_a_duplicate(
    session: aiohttp.ClientSession, http_url: str
) -> None:
    event = {"userId": "u", "event": "Custom", "properties": {"n": 1}, "timestamp": "2026-11-01T10:00:00Z"}
    _, first = await post(session, f"{http_url}/v1/track", event)
    _, again = await post(session, f"{http_url}/v1/track", event)
    assert first["messageId"] == again["messageId"]
    assert (first["outcome"], again["outcome"]) == ("accepted", "duplicate")


async def test_auth_errors(session: aiohttp.ClientSession, make_settings: SettingsFactory) -> None:
    config = (
        f'[[auth.keys]]\nname = "reader"\nhash = "{hash_key("reader-key")}"\nscopes = ["content"]\n'
        f'[[auth.keys]]\nname = "shop"\nhash = "{hash_key("shop-key")}"\nscopes = ["ingest"]\n'
    )
    async with Sendtime(make_settings(config)) as app:
        url = f"http://127.0.0.1:{app.http_port}/v1/track"
        event = {"messageId": "m", "userId": "u", "event": "Custom"}
        status, body = await post(session, url, event, auth=None)
        assert (status, body["error"]["code"]) == (401, "UNAUTHENTICATED")
        status, _ = await post(session, url, event, auth="Bearer nope")
        assert status == 401
        status, body = await post(session, url, event, auth="Bearer reader-key")
        assert (status, body["error"]["code"]) == (403, "PERMISSION_DENIED")
        # analytics clients also send the write key in the body
        status, _ = await post(session, url, {**event, "writeKey": "shop-key"}, auth=None)
        assert status == 200
        # with keys configured the dev key no longer works (issue 16)
        status, _ = await post(session, url, {**event, "writeKey": "dev-key"}, auth=None)
        assert status == 401


async def test_segment_limits(session: aiohttp.ClientSession, http_url: str) -> None:
    big_event = {"messageId": "big", "userId": "u", "event": "Custom", "properties": {"x": "a" * 33_000}}
    status, body = await post(session, f"{http_url}/v1/track", big_event)
    assert (status, body["error"]["code"]) == (413, "PAYLOAD_TOO_LARGE")
    status, body = await post(session, f"{http_url}/v1/batch", {"batch": [big_event] * 16})
    assert status == 413
    too_many = {"batch": [{"type": "track", "userId": "u", "event": "E"}] * 2501}
    status, body = await post(session, f"{http_url}/v1/batch", too_many)
    assert status == 400
    assert body["error"]["fieldViolations"][0]["field"] == "batch"
    async with session.post(
        f"{http_url}/v1/track", data=b"{not json", headers={"Authorization": WRITE_KEY}
    ) as r:
        assert r.status == 400
        assert (await r.json())["error"]["fieldViolations"][0]["field"] == "event"


async def test_signed_webhook(session: aiohttp.ClientSession, make_settings: SettingsFactory) -> None:
    config = f'[[webhooks]]\nname = "shop"\nsecret = "{SECRET}"\ntolerance_s = 300\n'
    async with Sendtime(make_settings(config)) as app:
        url = f"http://127.0.0.1:{app.http_port}/v1/webhooks/shop"
        body = json.dumps(
            {
                "type": "track",
                "messageId": "w-1",
                "userId": "u",
                "event": "Order Completed",
                "properties": {"order_id": "o-1", "total": 30},
            }
        ).encode()

        async def send(payload: bytes, signature: str | None) -> tuple[int, dict[str, Any]]:
            headers = {"Content-Type": "application/json"}
            if signature is not None:
                headers[SIGNATURE_HEADER] = signature
            async with session.post(url, data=payload, headers=headers) as response:
                return response.status, await response.json()

        now = int(time.time())
        assert (await send(body, sign(SECRET, body, now)))[0] == 200
        status, reply = await send(body, sign(SECRET, body, now))
        assert reply["results"][0]["outcome"] == "duplicate"
        tampered = body.replace(b"30", b"3")
        assert (await send(tampered, sign(SECRET, body, now)))[0] == 401
        assert (await send(body, sign("another-secret-xxxxxxxx", body, now)))[0] == 401
        status, reply = await send(body, sign(SECRET, body, now - 3600))
        assert status == 401
        assert "tolerance" in reply["error"]["message"]
        assert (await send(body, None))[0] == 401
        async with session.post(f"http://127.0.0.1:{app.http_port}/v1/webhooks/other", data=body) as r:
            assert r.status == 401
