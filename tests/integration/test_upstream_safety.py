"""Upstream URLs made from a user's fields cannot be turned against other users
(issue 16, item 5): sendtime over real sockets on loopback, with a real
upstream HTTP server that records every path it is asked for."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from yarl import URL

from sendtime.server.app import Sendtime
from tests.conftest import SettingsFactory
from tests.integration.conftest import Upstream

AUTH = {"Authorization": "Bearer dev-key"}


@pytest.fixture
async def app(make_settings: SettingsFactory, upstream: Upstream) -> AsyncIterator[Sendtime]:
    config = f"""
[content]
allowed_upstream_hosts = ["127.0.0.1"]
negative_ttl_s = 0.0

[[content.upstreams]]
name = "loyalty"
url = "http://127.0.0.1:{upstream.port}/v1/users/{{user.id}}/loyalty"
retries = 0

[[content.upstreams]]
name = "regional"
url = "http://{{user.api_host}}:{upstream.port}/v1/regional/{{user.id}}"
retries = 0
"""
    async with Sendtime(make_settings(config)) as server:
        yield server


async def _identify(session: aiohttp.ClientSession, base: str, user_id: str, traits: dict[str, Any]) -> None:
    async with session.post(
        f"{base}/v1/identify", json={"userId": user_id, "traits": traits}, headers=AUTH
    ) as response:
        assert response.status == 200, await response.text()


async def _content(session: aiohttp.ClientSession, base: str, user_id: str, blocks: str) -> Any:
    async with session.get(
        f"{base}/v1/content/{user_id}", params={"blocks": blocks}, headers=AUTH
    ) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def test_a_trait_named_id_does_not_redirect_the_upstream_call(
    app: Sendtime, upstream: Upstream
) -> None:
    base = f"http://127.0.0.1:{app.http_port}"
    async with aiohttp.ClientSession() as session:
        await _identify(session, base, "mallory", {"id": "alice"})
        answer = await _content(session, base, "mallory", "loyalty")
    assert answer["blocks"]["loyalty"]["source"] == "fresh"
    assert upstream.paths == ["/v1/users/mallory/loyalty"]


@pytest.mark.parametrize("user_id", [".", ".."])
async def test_a_dot_segment_user_id_is_refused_not_sent(
    app: Sendtime, upstream: Upstream, user_id: str
) -> None:
    base = f"http://127.0.0.1:{app.http_port}"
    async with aiohttp.ClientSession() as session:
        # %2E, sent as it is (yarl would resolve plain dots before sending):
        # the content route decodes it into the user id "." or ".."
        quoted = user_id.replace(".", "%2E")
        url = URL(f"{base}/v1/content/{quoted}?blocks=loyalty", encoded=True)
        async with session.get(url, headers=AUTH) as response:
            assert response.status == 200, await response.text()
            answer = await response.json()
    assert answer["user_id"] == user_id
    block = answer["blocks"]["loyalty"]
    assert (block["source"], block["reason"]) == ("fallback", "upstream_error")
    assert "'.' or '..'" in block["detail"]
    assert upstream.paths == []


async def test_a_host_not_allowed_from_a_trait_falls_back_for_that_block_only(
    app: Sendtime, upstream: Upstream
) -> None:
    base = f"http://127.0.0.1:{app.http_port}"
    async with aiohttp.ClientSession() as session:
        await _identify(session, base, "mallory", {"api_host": "evil.example"})
        answer = await _content(session, base, "mallory", "loyalty,regional,cart")
    blocks = answer["blocks"]
    assert (blocks["regional"]["source"], blocks["regional"]["reason"]) == ("fallback", "upstream_error")
    assert "'evil.example' is not in content.allowed_upstream_hosts" in blocks["regional"]["detail"]
    assert blocks["loyalty"]["source"] == "fresh"  # the other blocks are served as usual
    assert upstream.paths == ["/v1/users/mallory/loyalty"]
