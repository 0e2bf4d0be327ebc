"""One user's content is never served to another: cached blocks are keyed so
that no user id, campaign or cart id can be made to spell another call's key
(issue 16 item 4). Through the real server, over its HTTP twin."""

from __future__ import annotations

from urllib.parse import quote

import aiohttp

from sendtime.server.app import Sendtime
from tests.conftest import SettingsFactory

AUTH = {"Authorization": "Bearer dev-key"}


async def test_a_user_id_with_the_key_separator_never_gets_another_users_cart(
    make_settings: SettingsFactory,
) -> None:
    async with Sendtime(make_settings()) as app, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{app.http_port}"
        batch = {
            "batch": [
                {
                    "type": "track",
                    "messageId": "alice-cart-1",
                    "userId": "alice",
                    "event": "Product Added",
                    "properties": {"cart_id": "c", "product_id": "mug-ceramic", "price": 14},
                }
            ]
        }
        async with http.post(f"{base}/v1/batch", json=batch, headers=AUTH) as response:
            assert response.status == 200, await response.text()

        # alice's cart, cached under her campaign "x|"...
        async with http.get(
            f"{base}/v1/content/alice?blocks=cart&campaign={quote('x|')}", headers=AUTH
        ) as response:
            alice = await response.json()
        assert alice["blocks"]["cart"]["source"] == "fresh"
        assert alice["blocks"]["cart"]["data"]["lines"][0]["product"]["id"] == "mug-ceramic"

        # ...is not what user "alice|x", who has no events at all, is served
        # (an unescaped "|" between the key's parts made both keys one string).
        async with http.get(f"{base}/v1/content/{quote('alice|x')}?blocks=cart", headers=AUTH) as response:
            stranger = await response.json()
        assert response.status == 200
        assert stranger["blocks"]["cart"]["data"] is None
        assert (stranger["blocks"]["cart"]["source"], stranger["blocks"]["cart"]["reason"]) == (
            "fallback",
            "missing_data",
        )

        # and the same from the other side: "alice" with cart id "|x" is not "alice|" with "x"
        async with http.get(f"{base}/v1/content/{quote('alice|')}?blocks=cart&cart_id=x", headers=AUTH) as r:
            assert (await r.json())["blocks"]["cart"]["data"] is None
