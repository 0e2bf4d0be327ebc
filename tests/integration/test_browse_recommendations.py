"""The browse-abandonment email, from a real server with the demo catalog:
its "Picked for you" products are not the ones it shows as viewed above them
(while the catalog has others), and the recommendations block asked for alone
is the same as ever."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest

from sendtime.server.app import Sendtime

AUTH = {"Authorization": "Bearer dev-key"}


def viewed(message_id: str, user: str, product_id: str, minutes_ago: int) -> dict[str, Any]:
    at = datetime.now(UTC) - timedelta(minutes=minutes_ago)
    return {
        "type": "track",
        "timestamp": at.isoformat(),
        "messageId": message_id,
        "userId": user,
        "event": "Product Viewed",
        "properties": {"product_id": product_id},
    }


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def content(session: aiohttp.ClientSession, server: Sendtime, query: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{server.http_port}/v1/content/ada?{query}"
    async with session.get(url, headers={**AUTH, "Sendtime-Deadline-Ms": "5000"}) as response:
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
        return body


def product_ids(block: dict[str, Any]) -> list[str]:
    return [p["id"] for p in block["data"]["products"]]


async def test_browse_abandonment_does_not_recommend_what_it_shows_as_viewed(
    server: Sendtime, session: aiohttp.ClientSession
) -> None:
    # Other shoppers viewed the steel kettle and the teapot together: each is
    # the other's best neighbour, so plain recommendations for ada repeat them.
    sessions = [
        ["kettle-steel", "teapot-cast"],
        ["kettle-steel", "teapot-cast"],
        ["kettle-steel", "mug-ceramic"],
        ["teapot-cast", "tea-sencha"],
    ]
    batch = [
        viewed(f"s{n}-{i}", f"shopper-{n}", product_id, minutes_ago=60 - i)
        for n, products in enumerate(sessions)
        for i, product_id in enumerate(products)
    ]
    batch += [viewed("ada-1", "ada", "teapot-cast", 10), viewed("ada-2", "ada", "kettle-steel", 5)]
    async with session.post(
        f"http://127.0.0.1:{server.http_port}/v1/batch", json={"batch": batch}, headers=AUTH
    ) as response:
        assert response.status == 200, await response.text()

    alone = await content(session, server, "blocks=recommendations")
    assert {"kettle-steel", "teapot-cast"} <= set(product_ids(alone["blocks"]["recommendations"]))

    email = await content(session, server, "template=browse_abandonment")
    shown_viewed = product_ids(email["blocks"]["recently_viewed"])
    picked = product_ids(email["blocks"]["recommendations"])
    assert shown_viewed == ["kettle-steel", "teapot-cast"]
    assert len(picked) == 4
    assert not set(picked) & set(shown_viewed)
    # the co-viewed products first, as learned
    assert picked[:2] == ["mug-ceramic", "tea-sencha"]

    # The same for any call that asks for both blocks; the block alone is
    # unchanged, from its own cache entry.
    both = await content(session, server, "blocks=recently_viewed,recommendations")
    assert product_ids(both["blocks"]["recommendations"]) == picked
    again = await content(session, server, "blocks=recommendations")
    assert again["blocks"]["recommendations"]["source"] == "cached"
    assert product_ids(again["blocks"]["recommendations"]) == product_ids(alone["blocks"]["recommendations"])
