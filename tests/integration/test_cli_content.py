"""Send-time content from the outside: the Python client's get_content and
render_email, and the ``sendtime content | render | preview | demo-data``
commands run as subprocesses, all against a real sendtime on 127.0.0.1 with
the demo catalog and the shipped templates (the server fixture runs from the
repository root, where its default paths find them)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from sendtime.client import (
    AsyncClient,
    BlockSource,
    Client,
    Content,
    FallbackReason,
    InvalidArgument,
    NotFound,
    SendtimeError,
)
from sendtime.client._content import block_from_proto, content_request
from sendtime.server.app import Sendtime
from sendtime.v1 import content_service_pb2
from tests.integration.server_process import Result, run_sendtime

# slow: each command runs the CLI as a process of its own (and Chromium) (make test-fast leaves them out)
pytestmark = pytest.mark.slow

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SHOPPER_CART = {"kettle-steel", "kettle-electric", "filters-100"}


RunCli = Callable[..., Awaitable[Result]]


def target(app: Sendtime) -> str:
    return f"127.0.0.1:{app.grpc_port}"


async def run_cli(*args: str, cwd: Path, path: str | None = None) -> Result:
    """Run ``sendtime ARGS`` in ``cwd``; ``path`` replaces $PATH."""
    return await run_sendtime(*args, cwd=cwd, env={"PATH": path} if path is not None else None)


@pytest.fixture
def cli(server: Sendtime, tmp_path: Path) -> RunCli:
    """Run a client command against the fixture server, in tmp_path."""

    async def run(command: str, *args: str, path: str | None = None) -> Result:
        return await run_cli(command, *args, "--target", target(server), cwd=tmp_path, path=path)

    return run


@pytest.fixture
async def demo(cli: RunCli) -> dict[str, Any]:
    loaded = await cli("demo-data", "--json")
    assert loaded.code == 0, loaded.stderr
    result: dict[str, Any] = loaded.json()
    return result


@pytest.fixture
async def client(server: Sendtime) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(target(server), "dev-key") as client:
        yield client


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header.startswith(PNG_SIGNATURE)
    width, height = struct.unpack(">II", header[16:24])
    return width, height


# ------------------------------------------------------------------- demo-data


async def test_demo_data_loads_once_and_is_idempotent(cli: RunCli, demo: dict[str, Any]) -> None:
    total = len(demo["events"])
    assert (demo["accepted"], demo["duplicate"]) == (total, 0)
    assert {e["user_id"] for e in demo["events"]} == {"demo-shopper", "demo-buyer"}
    assert "sendtime content demo-shopper --target" in demo["try"][0]

    again = await cli("demo-data")

    assert again.code == 0, again.stderr
    assert f"already loaded: all {total} events were duplicates" in again.stdout
    assert "sendtime content demo-shopper" in again.stdout
    assert "sendtime render abandoned_cart --user demo-shopper --out cart.html" in again.stdout


# --------------------------------------------------------------------- content


async def test_content_json_shows_the_cart_rechecked_against_the_catalog(
    cli: RunCli, demo: dict[str, Any]
) -> None:
    result = await cli("content", "demo-shopper", "--json")

    assert result.code == 0, result.stderr
    content = result.json()
    assert content["user_id"] == "demo-shopper"
    assert list(content["blocks"]) == ["cart", "recommendations", "recently_viewed", "offers", "last_order"]
    # the caller's 300 ms deadline, as the server reads it: it travels as a
    # timeout re-based on the server's clock, so it can read a hair over 300
    assert 0 < content["budget_ms"] < 301
    assert content["server_time_ms"] < content["budget_ms"]

    cart = content["blocks"]["cart"]
    assert (cart["source"], cart["reason"]) == ("fresh", None)
    lines = {line["product"]["id"]: line for line in cart["data"]["lines"]}
    assert set(lines) == SHOPPER_CART
    kettle = lines["kettle-steel"]
    assert (kettle["added_price"], kettle["unit_price"], kettle["price_dropped"]) == (72.0, 64.0, True)
    assert lines["kettle-electric"]["in_stock"] is False
    assert lines["filters-100"]["quantity"] == 2
    assert cart["data"]["total"] == 64.0 + 2 * 6.0  # the out-of-stock line is not counted

    picks = content["blocks"]["recommendations"]["data"]["products"]
    assert picks
    assert not {p["id"] for p in picks} & SHOPPER_CART
    # no offers are configured, and the shopper has ordered nothing
    for name in ("offers", "last_order"):
        assert content["blocks"][name] == {
            "data": None,
            "source": "fallback",
            "reason": "missing_data",
            "age_ms": content["blocks"][name]["age_ms"],
            "detail": "",
        }


async def test_content_reads_well(cli: RunCli, demo: dict[str, Any]) -> None:
    result = await cli("content", "demo-shopper", "--blocks", "cart, recommendations", "--deadline-ms", "250")

    assert result.code == 0, result.stderr
    out = result.stdout
    assert out.startswith("content for user demo-shopper: 2 blocks in ")
    assert "ms budget" in out.splitlines()[0]
    assert "cart: fresh" in out
    assert (
        "1 x Gooseneck Kettle, Brushed Steel (kettle-steel)  64.00 EUR  [price dropped from 72.00 EUR]"
    ) in out
    assert "1 x Electric Kettle 1.7 L (kettle-electric)  79.00 EUR  [OUT OF STOCK]" in out
    assert "recommendations: " in out
    assert "recently_viewed" not in out


async def test_content_for_an_unknown_block_or_stranger_falls_back(cli: RunCli, server: Sendtime) -> None:
    result = await cli("content", "--anonymous-id", "stranger", "--blocks", "cart,nosuch", "--json")

    assert result.code == 0, result.stderr
    blocks = result.json()["blocks"]
    assert blocks["cart"]["source"] == "fallback"
    assert blocks["cart"]["reason"] == "missing_data"
    assert "nosuch" in blocks["nosuch"]["detail"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("content",), "give exactly one of the user id and --anonymous-id"),
        (("content", "u1", "--anonymous-id", "a1"), "give exactly one"),
        (("content", "u1", "--deadline-ms", "0"), "--deadline-ms: must be more than 0"),
        (("render", "abandoned_cart"), "give exactly one"),
        (("preview", "abandoned_cart", "--user", "u1", "--png", "x.png", "--width", "5"), "--width"),
    ],
)
async def test_bad_arguments_exit_2(cli: RunCli, args: tuple[str, ...], message: str) -> None:
    result = await cli(*args)

    assert result.code == 2
    assert message in result.stderr


async def test_an_unreachable_server_exits_1(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = await run_cli("content", "u1", "--target", f"127.0.0.1:{port}", cwd=tmp_path)

    assert result.code == 1
    assert f"cannot reach sendtime at 127.0.0.1:{port}" in result.stderr


# ---------------------------------------------------------------------- render


async def test_render_writes_the_html_with_the_shoppers_products(
    cli: RunCli, demo: dict[str, Any], tmp_path: Path
) -> None:
    result = await cli("render", "abandoned_cart", "--user", "demo-shopper", "--out", "cart.html")

    assert result.code == 0, result.stderr
    html = (tmp_path / "cart.html").read_text()
    assert html.lstrip().lower().startswith("<!doctype html")
    for name in ("Gooseneck Kettle, Brushed Steel", "Electric Kettle 1.7 L", "Paper Filters, 100 pack"):
        assert name in html
    assert "72.00" in html  # the price the kettle was added at, struck through
    out = result.stdout
    assert out.startswith("abandoned_cart (version ")
    assert "subject:   Ada, you left something in your cart" in out
    assert "  cart: " in out
    assert "fell back: offers (rendered with the template's fallback)" in out
    assert f"wrote cart.html ({len(html.encode()):,} bytes of HTML)" in out
    assert "Total (" not in out  # the text part only with --text


async def test_render_json_and_text(cli: RunCli, demo: dict[str, Any]) -> None:
    as_json = await cli("render", "post_purchase", "--user", "demo-buyer", "--json")

    assert as_json.code == 0, as_json.stderr
    email = as_json.json()
    assert email["template_id"] == "post_purchase"
    assert len(email["template_version"]) >= 8
    assert email["subject"] == "Thanks for your order, Grace!"
    assert email["fell_back"] == []
    assert email["blocks"]["last_order"]["data"]["order_id"] == "demo-buyer-order-1"
    assert "Hand Burr Grinder" in email["html"]
    assert "Hand Burr Grinder" in email["text"]
    assert not [key for key in email if key.startswith("_")]

    as_text = await cli("render", "browse_abandonment", "--user", "demo-shopper")

    assert as_text.code == 0, as_text.stderr
    assert "subject:   Ada, still thinking it over?" in as_text.stdout
    assert "Brewing Scale with Timer (https://shop.example.com/p/scale-digital)" in as_text.stdout
    assert "(give --out FILE.html to write the HTML)" in as_text.stdout


async def test_render_an_unknown_template_names_it(cli: RunCli, demo: dict[str, Any], tmp_path: Path) -> None:
    result = await cli("render", "no_such_template", "--user", "demo-shopper", "--out", "x.html")

    assert result.code == 1
    assert "not found" in result.stderr
    assert "no_such_template" in result.stderr
    assert not (tmp_path / "x.html").exists()

    as_json = await cli("render", "no_such_template", "--user", "demo-shopper", "--json")

    assert as_json.code == 1
    assert as_json.error()["error"]["reason"] == "TEMPLATE_NOT_FOUND"


# --------------------------------------------------------------------- preview


async def test_preview_without_chromium_says_how_to_install_it(
    cli: RunCli, demo: dict[str, Any], tmp_path: Path
) -> None:
    missing = tmp_path / "no-chromium-here"
    result = await cli(
        "preview", "abandoned_cart", "--user", "demo-shopper", "--png", "cart.png", "--chromium", str(missing)
    )

    assert result.code == 1
    assert str(missing) in result.stderr
    assert "apt-get install chromium" in result.stderr
    assert not (tmp_path / "cart.png").exists()

    empty = tmp_path / "empty-bin"
    empty.mkdir()
    on_path = await cli(
        "preview", "abandoned_cart", "--user", "demo-shopper", "--png", "cart.png", "--json", path=str(empty)
    )

    assert on_path.code == 1
    assert "no Chromium on PATH (looked for chromium, chromium-browser, google-chrome)" in on_path.stderr
    assert "apt-get install chromium" in on_path.error()["error"]["message"]


@pytest.mark.skipif(
    not any(shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")),
    reason="no Chromium installed (Debian: apt-get install chromium); the PNG cannot be checked",
)
async def test_preview_screenshots_the_email(cli: RunCli, demo: dict[str, Any], tmp_path: Path) -> None:
    desktop = await cli("preview", "abandoned_cart", "--user", "demo-shopper", "--png", "cart.png")

    assert desktop.code == 0, desktop.stderr
    assert png_size(tmp_path / "cart.png") == (700, 1600)
    assert "wrote cart.png (700x1600 screenshot" in desktop.stdout
    assert "fell back: offers" in desktop.stdout

    mobile = await cli(
        "preview", "abandoned_cart", "--user", "demo-shopper", "--png", "phone.png", "--mobile", "--json"
    )

    assert mobile.code == 0, mobile.stderr
    assert png_size(tmp_path / "phone.png") == (390, 1600)
    assert mobile.json()["png_bytes"] == (tmp_path / "phone.png").stat().st_size


# ---------------------------------------------------------------------- client


async def load_shopper(client: AsyncClient) -> None:
    await client.identify("u1", first_name="Ada", email="ada@example.com", consent={"marketing": True})
    await client.track(
        "Product Added",
        {"product_id": "kettle-steel", "price": 72.0, "quantity": 1, "cart_id": "c1"},
        user_id="u1",
    )
    await client.track("Product Viewed", {"product_id": "tea-sencha"}, user_id="u1")


async def test_get_content_returns_typed_blocks(client: AsyncClient) -> None:
    await load_shopper(client)

    content = await client.get_content("u1", blocks=["cart", "recently_viewed", "offers"], timeout=0.25)

    assert [b.name for b in content.blocks] == ["cart", "recently_viewed", "offers"]
    cart = content["cart"]
    assert (cart.source, cart.reason, cart.fell_back) == (BlockSource.FRESH, None, False)
    assert cart.data["cart_id"] == "c1"
    assert cart.data["lines"][0]["price_dropped"] is True
    assert content["recently_viewed"].data["products"][0]["id"] == "tea-sencha"
    offers = content["offers"]
    assert (offers.source, offers.reason, offers.data, offers.fell_back) == (
        BlockSource.FALLBACK,
        FallbackReason.MISSING_DATA,
        None,
        True,
    )
    # the call's deadline is the server's budget (gRPC sends it rounded up to whole ms)
    assert 0.1 < content.budget <= 0.25 + 0.001
    assert 0 < content.server_time < content.budget
    assert content.get("last_order") is None
    with pytest.raises(KeyError):
        content["last_order"]

    again = await client.get_content("u1", blocks=["cart"], campaign="spring", locale="de-DE", cart_id="c1")
    assert again["cart"].data["cart_id"] == "c1"
    cached = await client.get_content("u1", blocks=["cart"], campaign="spring", locale="de-DE", cart_id="c1")
    assert cached["cart"].source is BlockSource.CACHED
    assert cached["cart"].age > 0


async def test_render_email_returns_the_email_and_its_blocks(client: AsyncClient) -> None:
    await load_shopper(client)

    # gRPC sends a timeout rounded up: to whole ms under 1 s, to 10 ms units
    # from 1 s on, so the server may see a little more than was set.
    email = await client.render_email("abandoned_cart", "u1", timeout=0.5)

    assert email.template_id == "abandoned_cart"
    assert email.template_version
    assert email.subject == "Ada, you left something in your cart"
    assert email.preheader
    assert "Gooseneck Kettle, Brushed Steel" in email.html
    assert "Gooseneck Kettle, Brushed Steel" in email.text
    assert {b.name for b in email.blocks} == {"cart", "recommendations", "offers"}
    assert [b.name for b in email.fell_back] == ["offers"]
    assert 0.4 < email.budget <= 0.5 + 0.001


async def test_content_errors_are_typed(client: AsyncClient) -> None:
    with pytest.raises(NotFound) as missing:
        await client.render_email("no_such_template", "u1")
    assert missing.value.reason == "TEMPLATE_NOT_FOUND"
    assert "no_such_template" in missing.value.message

    with pytest.raises(InvalidArgument) as both:
        await client.get_content("u1", anonymous_id="a1")
    assert [v.field for v in both.value.field_violations] == ["user_id"]

    with pytest.raises(InvalidArgument):
        await client.render_email("", "u1")

    with pytest.raises(TypeError, match="not one string"):
        await client.get_content("u1", blocks="cart")


async def test_the_blocking_client_has_the_same_calls(server: Sendtime, client: AsyncClient) -> None:
    await load_shopper(client)
    with Client(target(server), "dev-key") as blocking:
        content = await asyncio.to_thread(blocking.get_content, "u1", blocks=["cart"], timeout=0.3)
        email = await asyncio.to_thread(blocking.render_email, "abandoned_cart", "u1")
        with pytest.raises(NotFound):
            await asyncio.to_thread(blocking.render_email, "no_such_template", "u1")

    assert isinstance(content, Content)
    assert content["cart"].data["lines"][0]["product"]["id"] == "kettle-steel"
    assert email.subject == "Ada, you left something in your cart"


def test_blocks_from_a_newer_server_or_a_broken_one() -> None:
    newer = content_service_pb2.ContentBlock(name="x", data_json=b"[1]", source=99, reason=99)  # type: ignore[arg-type]
    block = block_from_proto(newer)
    assert (block.data, block.source, block.reason) == ([1], BlockSource.UNKNOWN, FallbackReason.UNKNOWN)

    empty = block_from_proto(content_service_pb2.ContentBlock(name="y"))
    assert (empty.data, empty.reason, empty.age) == (None, None, 0.0)

    with pytest.raises(SendtimeError) as broken:
        block_from_proto(content_service_pb2.ContentBlock(name="z", data_json=b"{not json"))
    assert broken.value.code is grpc.StatusCode.INTERNAL
    assert broken.value.reason == "INVALID_RESPONSE"

    request = content_request("u1", None, iter(["cart", "offers"]), "c", None, None)
    assert (list(request.blocks), request.context.campaign, request.anonymous_id) == (
        ["cart", "offers"],
        "c",
        "",
    )
