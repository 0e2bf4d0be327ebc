"""The Segment HTTP intake under broken and hostile input (issue 16 items 2-3,
issue 15 items 5-6): one bad event among good ones, bodies that are not what
their Content-Encoding says, deep nesting, unbounded values, event times
outside the window. Against a real server; every error in the JSON shape."""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest

from tests.integration.test_http_ingest import WRITE_KEY, profile

HEADERS = {"Authorization": WRITE_KEY, "Content-Type": "application/json"}


@pytest.fixture
async def session() -> Any:
    # a fresh connection per request: a body that cannot be read closes its connection
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as client:
        yield client


async def post_raw(
    session: aiohttp.ClientSession, url: str, body: bytes, **headers: str
) -> tuple[int, dict[str, Any]]:
    async with session.post(url, data=body, headers={**HEADERS, **headers}) as response:
        assert response.content_type == "application/json", await response.text()
        return response.status, await response.json()


def event(message_id: str, user: str, **fields: Any) -> dict[str, Any]:
    return {"type": "track", "event": "Custom", "userId": user, "messageId": message_id, **fields}


def violations(body: dict[str, Any]) -> list[str]:
    return [v["field"] for v in body["error"].get("fieldViolations", [])]


async def test_a_batch_rejects_each_bad_event_alone_and_stores_the_good(
    session: aiohttp.ClientSession, http_url: str
) -> None:
    """Deep nesting, invalid UTF-8 and a timestamp overflow each used to answer
    500 and store none of the batch."""
    deep = "[" * 5000 + "]" * 5000
    cart = {"cart_id": "c1", "product_id": "p1"}
    batch = [
        event("good-1", "ada", event="Product Added", properties=cart),
        event("deep", "u", properties={"x": "DEEP"}),
        event("BADUTF8", "u"),
        event("utf8-in-properties", "u", event="Product Added", properties={**cart, "note": "PLACEHOLDER"}),
        event("skew-overflow", "u", originalTimestamp="9999-12-31T23:00:00Z", sentAt="0001-01-01T00:00:00Z"),
        event("y9999", "u", event="Product Added", properties=cart, timestamp="9999-12-31T23:59:00Z"),
        event("good-2", "bob"),
    ]
    body = json.dumps({"batch": batch}).encode()
    body = body.replace(b'"DEEP"', deep.encode())
    body = body.replace(b"BADUTF8", b"BAD\xff\xfe88").replace(b"PLACEHOLDER", b"PLACE\xffOLDER")
    status, answer = await post_raw(session, f"{http_url}/v1/batch", body)
    assert status == 400, answer
    assert answer["error"]["reason"] == "INVALID_EVENTS"
    results = {
        r["index"]: (r["outcome"], [v["field"] for v in r.get("fieldViolations", [])])
        for r in answer["results"]
    }
    assert results == {
        0: ("accepted", []),
        1: ("rejected", ["event"]),
        2: ("rejected", ["event"]),
        3: ("rejected", ["properties"]),
        4: ("rejected", ["originalTimestamp"]),
        5: ("rejected", ["timestamp"]),
        6: ("accepted", []),
    }
    messages = {r["index"]: r.get("message", "") for r in answer["results"]}
    assert "deeper than 32 levels" in messages[1]
    assert "UTF-8" in messages[3]
    assert "ahead of the server's clock" in messages[5]
    ada = await profile(session, http_url, "ada")
    assert [line["product_id"] for cart in ada["carts"] for line in cart["lines"]] == ["p1"]
    assert (await profile(session, http_url, "bob"))["event_count"] == 1


async def test_a_far_future_event_does_not_fail_other_users_events(
    session: aiohttp.ClientSession, http_url: str
) -> None:
    """A Product Added dated year 9999 overflowed the flow's due time inside the
    writer's transaction, failing the group commit of everyone beside it."""
    far = event("far", "mallory", event="Product Added", timestamp="9999-12-31T23:59:00Z")
    far["properties"] = {"cart_id": "c", "product_id": "p"}

    async def one(index: int) -> int:
        body = (
            far
            if index == 0
            else event(
                f"good-{index}", f"user-{index}", event="Product Viewed", properties={"product_id": "p"}
            )
        )
        status, _ = await post_raw(session, f"{http_url}/v1/track", json.dumps(body).encode())
        return status

    statuses = await asyncio.gather(*(one(i) for i in range(120)))
    assert statuses[0] == 400
    assert statuses[1:] == [200] * 119


async def test_an_event_dated_ahead_cannot_outrank_a_later_opt_out(
    session: aiohttp.ClientSession, http_url: str
) -> None:
    """A far-future identify pinned consent, so a later opt-out was ignored.
    Beyond the window it is refused; within it, it counts as its arrival."""
    now = datetime.now(UTC)

    def identify(message_id: str, consent: bool, at: datetime) -> bytes:
        return json.dumps(
            {
                "userId": "eve",
                "messageId": message_id,
                "timestamp": at.isoformat(),
                "traits": {"consent": {"marketing": consent}},
            }
        ).encode()

    status, answer = await post_raw(
        session, f"{http_url}/v1/identify", identify("y9999", True, datetime(9999, 1, 1, tzinfo=UTC))
    )
    assert (status, violations(answer)) == (400, ["timestamp"])
    status, _ = await post_raw(
        session, f"{http_url}/v1/identify", identify("ahead", True, now + timedelta(hours=23))
    )
    assert status == 200
    status, _ = await post_raw(
        session, f"{http_url}/v1/identify", identify("opt-out", False, now + timedelta(seconds=1))
    )
    assert status == 200
    assert (await profile(session, http_url, "eve"))["traits"]["consent"] == {
        "marketing": "CONSENT_STATE_OPTED_OUT"
    }


#: (fields over a valid track call, the field the violation must name)
OUT_OF_BOUNDS: list[tuple[dict[str, Any], str]] = [
    (
        {"event": "Product Added", "properties": {"cart_id": "c", "product_id": "p", "price": 2**200}},
        "properties.price",
    ),
    ({"event": "Order Completed", "properties": {"order_id": "o", "total": 1e13}}, "properties.total"),
    (
        {"event": "Product Added", "properties": {"cart_id": "c", "product_id": "p", "quantity": 10**7}},
        "properties.quantity",
    ),
    (
        {"event": "Product Added", "properties": {"cart_id": "c", "product_id": 2**70}},
        "properties.product_id",
    ),
    (
        {"event": "Product Added", "properties": {"cart_id": "c\u0000", "product_id": "p"}},
        "properties.cart_id",
    ),
    ({"timestamp": "0001-01-01T00:00:00Z"}, "timestamp"),
    ({"timestamp": "9999-12-31T00:00:00Z"}, "timestamp"),
    ({"userId": "a\u0000b"}, "userId"),
    ({"userId": "a\nb"}, "userId"),
    ({"messageId": "m\u0085"}, "messageId"),
]


async def test_values_out_of_bounds_name_their_field(session: aiohttp.ClientSession, http_url: str) -> None:
    """A price of 2**200 was stored and served as 1.6e60; years 0001 and 9999
    and a NUL in userId were accepted."""
    for fields, field in OUT_OF_BOUNDS:
        body = json.dumps({**event("bounds", "u"), **fields}).encode()
        status, answer = await post_raw(session, f"{http_url}/v1/track", body)
        assert status == 400, (fields, answer)
        assert violations(answer) == [field], fields


async def test_deep_nesting_is_refused_naming_the_limit(
    session: aiohttp.ClientSession, http_url: str
) -> None:
    for depth in (40, 15_000):  # within Python's recursion limit, and far beyond it (in 32 KB)
        nested = ("[" * depth + "]" * depth).encode()
        single = json.dumps(event("deep", "u", properties={"x": "DEEP"})).encode().replace(b'"DEEP"', nested)
        status, answer = await post_raw(session, f"{http_url}/v1/track", single)
        assert status == 400, answer
        assert "deeper than 32 levels" in answer["error"]["message"]
        traits = json.dumps({"userId": "u", "traits": {"x": "DEEP"}}).encode().replace(b'"DEEP"', nested)
        status, answer = await post_raw(session, f"{http_url}/v1/identify", traits)
        assert status == 400, answer
        assert "deeper than 32 levels" in answer["error"]["message"]
    # deep outside the events: the batch's own envelope
    envelope = b'{"batch": [], "context": {"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"
    status, answer = await post_raw(session, f"{http_url}/v1/batch", envelope)
    assert status == 400, answer
    assert "deeper than 32 levels" in answer["error"]["message"]


async def test_a_body_not_in_its_content_encoding_is_a_400(
    session: aiohttp.ClientSession, http_url: str
) -> None:
    """A plain body labelled gzip answered 500 in plain text."""
    plain = json.dumps(event("enc", "u")).encode()
    broken = [("gzip", plain), ("deflate", plain), ("deflate", b"x"), ("gzip", gzip.compress(plain)[:-4])]
    for coding, body in broken:
        status, answer = await post_raw(session, f"{http_url}/v1/track", body, **{"Content-Encoding": coding})
        assert status == 400, answer
        assert violations(answer) == ["Content-Encoding"]
        assert f"is {coding}, but the body" in answer["error"]["message"]
    # aiohttp passed the first ones through as if plain, and answered br and zstd in plain text
    for coding in ("foo", "gzip, foo", "x-gzip", "compress", "br", "zstd"):
        status, answer = await post_raw(
            session, f"{http_url}/v1/batch", plain, **{"Content-Encoding": coding}
        )
        assert status == 400, answer
        assert violations(answer) == ["Content-Encoding"]
    # and the codings it takes still work: gzip, deflate (zlib-wrapped or raw)
    status, _ = await post_raw(
        session, f"{http_url}/v1/track", gzip.compress(plain), **{"Content-Encoding": "gzip"}
    )
    assert status == 200
    deflated = zlib.compress(json.dumps(event("enc-2", "u")).encode())
    status, _ = await post_raw(session, f"{http_url}/v1/track", deflated, **{"Content-Encoding": "deflate"})
    assert status == 200
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    body = raw_deflate.compress(json.dumps(event("enc-3", "u")).encode()) + raw_deflate.flush()
    status, _ = await post_raw(session, f"{http_url}/v1/track", body, **{"Content-Encoding": "deflate"})
    assert status == 200
    # a small body that inflates past the route's limit is refused without inflating it all
    bomb = gzip.compress(b"[" + b" " * 50_000_000 + b"]")
    status, answer = await post_raw(session, f"{http_url}/v1/batch", bomb, **{"Content-Encoding": "gzip"})
    assert status == 413, answer
