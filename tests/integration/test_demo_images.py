"""The demo catalog's pictures: served by the HTTP edge from demo/images (by
exact name, with caching headers, nothing else reachable), and named by every
rendered email with an absolute URL on the server's public address, so that a
preview, the status page and a mail client show them."""

from __future__ import annotations

import asyncio
import html
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from sendtime.server.app import Sendtime
from sendtime.server.shipped import DEMO_CATALOG, DEMO_IMAGES, shipped
from sendtime.v1 import delivery_service_pb2 as D
from tests.conftest import SettingsFactory
from tests.integration.observing import scrape, value
from tests.integration.test_cli import RunCli, cli  # noqa: F401  (the fixture)
from tests.integration.test_delivery import (
    add_to_cart,
    channel_to,
    flows_config,
    identify,
    ingest,
    wait_for_status,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
AUTH = {"Authorization": "Bearer dev-key"}
IMG_SRC = re.compile(r'<img[^>]*\ssrc="([^"]*)"')


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def base(server: Sendtime) -> str:
    return f"http://127.0.0.1:{server.http_port}"


def test_every_demo_product_has_a_picture_named_by_a_path_on_the_server() -> None:
    products = json.loads(shipped(DEMO_CATALOG).read_bytes())
    for product in products:
        assert product["image_url"] == f"/demo/images/{product['id']}.png"
        picture = shipped(DEMO_IMAGES) / f"{product['id']}.png"
        assert picture.read_bytes().startswith(PNG_SIGNATURE)
        assert picture.stat().st_size < 16 * 1024  # small: an email loads several


async def test_a_picture_is_served_with_caching_headers_and_no_key(
    server: Sendtime, session: aiohttp.ClientSession
) -> None:
    url = f"{base(server)}/demo/images/mug-ceramic.png"
    async with session.get(url) as response:
        assert response.status == 200
        assert response.content_type == "image/png"
        assert response.headers["Cache-Control"] == "public, max-age=86400"
        body = await response.read()
        etag = response.headers["ETag"]
    assert body == (shipped(DEMO_IMAGES) / "mug-ceramic.png").read_bytes()

    async with session.get(url, headers={"If-None-Match": f'"other", W/{etag}'}) as again:
        assert again.status == 304
        assert again.headers["ETag"] == etag
        assert await again.read() == b""
    async with session.get(url, headers={"If-None-Match": '"other"'}) as changed:
        assert changed.status == 200
    async with session.head(url) as head:
        assert (head.status, head.content_type) == (200, "image/png")


@pytest.mark.parametrize(
    "path",
    [
        "/demo/images/no-such-product.png",
        "/demo/images/MUG-CERAMIC.PNG",
        "/demo/images/mug-ceramic.png.bak",
        "/demo/images/mug-ceramic",
        "/demo/images/.png",
        "/demo/images/..%2Fcatalog.json",
        "/demo/images/%2e%2e%2fcatalog.json",
        "/demo/images/..%2F..%2Fpyproject.toml",
        "/demo/images/..%5C..%5Cpyproject.toml",
        "/demo/images/%2Fetc%2Fpasswd",
        "/demo/images/mug-ceramic.png%00.txt",
        "/demo/images/../catalog.json",
        "/demo/images/../../pyproject.toml",
        "/demo/images/",
        "/demo/catalog.json",
    ],
)
async def test_no_other_name_reaches_a_file(
    server: Sendtime, session: aiohttp.ClientSession, path: str
) -> None:
    # sent byte for byte, as an attacker would (no client-side normalising)
    async with session.get(URL(base(server) + path, encoded=True)) as response:
        assert response.status == 404, path
        body = await response.read()
    assert not body.startswith(PNG_SIGNATURE)
    for secret in (b"[tool", b"root:", b'"image_url"'):
        assert secret not in body


async def test_without_the_folder_no_picture_and_nothing_else_breaks(
    make_settings: SettingsFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sendtime.server import app as app_module

    monkeypatch.setattr(app_module, "DEMO_IMAGES", "demo/no-images-here")
    async with Sendtime(make_settings()) as server, aiohttp.ClientSession() as session:
        async with session.get(f"{base(server)}/demo/images/mug-ceramic.png") as response:
            assert response.status == 404
        async with session.get(f"{base(server)}/readyz") as ready:
            assert ready.status == 200


def event(kind: str, message_id: str, minutes_ago: float, **fields: Any) -> dict[str, Any]:
    at = datetime.now(UTC) - timedelta(minutes=minutes_ago)
    return {"type": kind, "messageId": message_id, "userId": "ada", "timestamp": at.isoformat(), **fields}


async def load_shopper(session: aiohttp.ClientSession, server: Sendtime) -> None:
    """A shopper with views, a cart and an order of demo products."""
    batch = [
        event("identify", "i", 30, traits={"email": "ada@example.com", "firstName": "Ada"}),
        event("track", "v1", 20, event="Product Viewed", properties={"product_id": "teapot-cast"}),
        event("track", "v2", 19, event="Product Viewed", properties={"product_id": "kettle-steel"}),
        event(
            "track",
            "a1",
            18,
            event="Product Added",
            properties={"cart_id": "c1", "product_id": "kettle-steel", "price": 72},
        ),
        event(
            "track", "a2", 17, event="Product Added", properties={"cart_id": "c1", "product_id": "tea-sencha"}
        ),
        event(
            "track",
            "o1",
            60,
            event="Order Completed",
            properties={
                "order_id": "o1",
                "total": 39,
                "currency": "EUR",
                "products": [{"product_id": "scale-digital"}],
            },
        ),
    ]
    async with session.post(f"{base(server)}/v1/batch", json={"batch": batch}, headers=AUTH) as response:
        assert response.status == 200, await response.text()


@pytest.mark.parametrize("template", ["abandoned_cart", "browse_abandonment", "post_purchase"])
async def test_a_rendered_email_names_pictures_that_load_from_the_server(
    server: Sendtime, session: aiohttp.ClientSession, template: str
) -> None:
    await load_shopper(session, server)
    async with session.get(
        f"{base(server)}/v1/content/ada?template={template}", headers={**AUTH, "Sendtime-Deadline-Ms": "5000"}
    ) as response:
        assert response.status == 200, await response.text()
        answer = await response.json()
    html = answer["email"]["html"]
    sources = IMG_SRC.findall(html)
    assert len(sources) >= 3, html  # the products the template shows
    for source in sources:
        assert source.startswith(f"{base(server)}/demo/images/"), source
        async with session.get(source) as picture:
            assert picture.status == 200, source
            assert picture.content_type == "image/png"
            assert (await picture.read()).startswith(PNG_SIGNATURE)
    assert "shop.example.com/img" not in html
    # the blocks' data carry the same absolute URLs (ESPs that render themselves)
    for block in answer["blocks"].values():
        for text in re.findall(r'"image_url": "([^"]*)"', json.dumps(block["data"])):
            assert text.startswith(f"{base(server)}/demo/images/"), text


async def test_pictures_point_at_the_configured_public_address(
    make_settings: SettingsFactory, session: aiohttp.ClientSession
) -> None:
    settings = make_settings(delivery__public_base_url="https://mail.example.org/sendtime/")
    async with Sendtime(settings) as server:
        await load_shopper(session, server)
        async with session.get(
            f"{base(server)}/v1/content/ada?blocks=cart,recently_viewed", headers=AUTH
        ) as response:
            assert response.status == 200, await response.text()
            blocks = (await response.json())["blocks"]
    (line, *_) = blocks["cart"]["data"]["lines"]
    assert line["product"]["image_url"] == "https://mail.example.org/sendtime/demo/images/kettle-steel.png"
    assert [p["image_url"] for p in blocks["recently_viewed"]["data"]["products"]] == [
        "https://mail.example.org/sendtime/demo/images/kettle-steel.png",
        "https://mail.example.org/sendtime/demo/images/teapot-cast.png",
    ]


CHROMIUM = next((found for name in ("chromium", "chromium-browser") if (found := shutil.which(name))), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium installed (Debian: apt-get install chromium): the pictures were not checked",
)


def image_fetches(families: Any, status: str) -> float:
    return value(families, "sendtime_http_requests_total", route="/demo/images/{name}", status=status)


@pytest.fixture
async def sent(make_settings: SettingsFactory) -> AsyncIterator[Sendtime]:
    """A server whose abandoned_cart flow sent one email to the outbox, with
    no public address configured: the HTTP edge's own is used."""
    config = flows_config('kind = "outbox"', delay_s=0.0)
    async with Sendtime(
        make_settings(config.replace('public_base_url = "https://mail.example.com"', ""))
    ) as app:
        async with channel_to(app) as channel:
            await ingest(channel, identify("i1"), add_to_cart("a1"))
            await wait_for_status(channel, {D.DELIVERY_STATUS_SENT})
        yield app


@needs_chromium
@pytest.mark.slow
async def test_the_status_pages_preview_shows_the_pictures(sent: Sendtime, tmp_path: Path) -> None:
    """The email a flow sent, as the status page previews it in a browser."""
    base_url = base(sent)
    async with aiohttp.ClientSession() as http, http.get(f"{base_url}/?key=dev-key") as page:
        found = re.search(r'href="(/v1/deliveries/1/preview\?token=[^"]+)"', await page.text())
    assert found is not None
    before = image_fetches(await scrape(sent.http_port), "200")
    assert CHROMIUM is not None
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=700,1600",
        f"--screenshot={tmp_path / 'preview.png'}", base_url + html.unescape(found[1]),
    ]  # fmt: skip
    result = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=90, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "preview.png").read_bytes().startswith(PNG_SIGNATURE)
    families = await scrape(sent.http_port)
    # the cart's kettle and the four recommendations, each fetched by the browser
    assert image_fetches(families, "200") - before >= 5
    assert image_fetches(families, "404") == 0


@needs_chromium
@pytest.mark.slow
async def test_the_preview_loads_the_pictures(
    server: Sendtime,
    session: aiohttp.ClientSession,
    cli: RunCli,  # noqa: F811
    tmp_path: Path,
) -> None:
    await load_shopper(session, server)
    before = image_fetches(await scrape(server.http_port), "200")
    shot = await cli("preview", "abandoned_cart", "--user", "ada", "--png", str(tmp_path / "cart.png"))
    assert shot.code == 0, shot.stderr
    families = await scrape(server.http_port)
    # Chromium fetched each picture the email shows (the cart's two lines and
    # four recommendations), every one answered 200
    assert image_fetches(families, "200") - before >= 6
    assert image_fetches(families, "404") == 0
