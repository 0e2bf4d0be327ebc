"""The shipped templates: full data, every block missing, data that cannot be
rendered, injection in user and upstream data, headers, and the text part."""

from __future__ import annotations

import copy
import hashlib
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sendtime.server.rendering import (
    DEFAULT_LINKS,
    RenderedEmail,
    Template,
    TemplateStore,
    load_template,
    render,
)

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
SHIPPED = ("abandoned_cart", "browse_abandonment", "post_purchase")


def product(number: int, name: str, price: float, **extra: Any) -> dict[str, Any]:
    return {
        "id": f"p{number}",
        "name": name,
        "url": f"https://shop.example.com/p/{number}",
        "image_url": f"https://cdn.example.com/p/{number}.jpg",
        "price": price,
        "currency": "EUR",
        "category": "running",
        "in_stock": True,
        **extra,
    }


def cart_line(
    item: dict[str, Any], quantity: int, unit: float, added: float, in_stock: bool = True
) -> dict[str, Any]:
    return {
        "product": item,
        "quantity": quantity,
        "unit_price": unit,
        "added_price": added,
        "price_dropped": unit < added,
        "in_stock": in_stock,
        "line_total": round(unit * quantity, 2),
    }


def full_context() -> dict[str, Any]:
    """Every block, shaped as the content pipeline passes it."""
    runner = product(1, "Trail Runner GTX", 99.0)
    socks = product(2, "Merino Socks 3-pack", 24.5)
    jacket = product(3, "Windbreaker Jacket", 89.9, in_stock=False)
    return {
        "user": {
            "id": "u1",
            "email": "anna@example.com",
            "first_name": "Anna",
            "last_name": "Berg",
            "locale": "en-IE",
            "timezone": "Europe/Dublin",
            "loyalty_tier": "gold",
        },
        "cart": {
            "cart_id": "c-42",
            "lines": [
                cart_line(runner, 1, 99.0, 129.0),
                cart_line(socks, 2, 24.5, 24.5),
                cart_line(jacket, 1, 89.9, 89.9, in_stock=False),
            ],
            "total": 148.0,
            "currency": "EUR",
            "item_count": 3,
            "out_of_stock_lines": 1,
        },
        "recommendations": {
            "products": [product(4, "Running Cap", 19.0), product(5, "Hydration Vest", 74.0)],
            "strategy": "bought_together",
        },
        "recently_viewed": {
            "products": [
                {**product(8, "Alpine Down Parka", 249.0), "viewed_at": "2026-11-28T10:00:00Z"},
                {
                    **product(9, "Thermal Base Layer", 59.0, in_stock=False),
                    "viewed_at": "2026-11-28T09:58:00Z",
                },
            ]
        },
        "offers": {"offers": [{"id": "o1", "code": "COMEBACK10", "text": "10% off today only"}]},
        "last_order": {
            "order_id": "SO-10482",
            "total": 157.4,
            "currency": "EUR",
            "products": [runner, socks],
        },
        "links": {
            "unsubscribe_url": "https://shop.example.com/u/tok123",
            "preferences_url": "https://shop.example.com/prefs/tok123",
            "view_in_browser_url": "https://shop.example.com/v/tok123",
        },
    }


@pytest.fixture(scope="module")
def store() -> TemplateStore:
    return TemplateStore(TEMPLATES)


def visible_text(html: str) -> str:
    """The HTML's text, tags dropped: what a reader could see (or a filter could find)."""
    return re.sub(r"<[^>]+>", " ", html)


# -- the shipped templates, with all their data ------------------------------------------


def test_the_store_lists_the_three_shipped_templates_and_none_is_broken(store: TemplateStore) -> None:
    assert store.ids() == list(SHIPPED)
    assert [t.id for t in store.templates()] == list(SHIPPED)
    assert store.errors() == {}


@pytest.mark.parametrize("template_id", SHIPPED)
def test_every_shipped_template_declares_its_blocks_with_fallbacks(
    store: TemplateStore, template_id: str
) -> None:
    template = store.get(template_id)
    assert template.blocks, "a shipped template uses at least one block"
    for name, block in template.blocks.items():
        assert isinstance(block.fallback, dict), name
        assert block.description, name


@pytest.mark.parametrize("template_id", SHIPPED)
def test_every_shipped_template_renders_full_data_with_no_fallback(
    store: TemplateStore, template_id: str
) -> None:
    email = store.render(template_id, full_context())
    template = store.get(template_id)

    assert email.template_id == template_id
    assert email.version == template.version
    assert re.fullmatch(r"[0-9a-f]{12}", email.version)
    assert email.fell_back == ()
    assert "Anna" in email.subject
    assert email.preheader
    assert email.html.startswith("<!doctype html>")
    assert '<html lang="en-IE"' in email.html
    assert f"<title>{email.subject}</title>" in email.html
    # the preheader is the hidden preview text at the top of the body
    assert email.preheader.replace("'", "&#39;") in email.html
    assert 'href="https://shop.example.com/u/tok123"' in email.html
    assert "Unsubscribe" in email.text
    assert "https://shop.example.com/u/tok123" in email.text
    assert "<mj-" not in email.html, "every MJML element was compiled"
    for junk in ("None", "Undefined", "{{", "{%", "nan"):
        assert junk not in visible_text(email.html), junk


def test_abandoned_cart_shows_each_line_with_live_price_stock_offer_and_picks(store: TemplateStore) -> None:
    email = store.render("abandoned_cart", full_context())

    assert email.subject == "Anna, you left something in your cart"
    assert (
        email.preheader
        == "3 items saved for you - and a code to go with them. Come back before they're gone."
    )
    html = email.html
    for name in (
        "Trail Runner GTX",
        "Merino Socks 3-pack",
        "Windbreaker Jacket",
        "Running Cap",
        "Hydration Vest",
    ):
        assert name in html
    assert 'src="https://cdn.example.com/p/1.jpg"' in html
    assert "Quantity: 2" in html
    # the price dropped: current price, and the old one struck through
    assert "€99.00" in html
    assert re.search(r"<s [^>]*>€129\.00</s>", html)
    assert "Price drop" in html
    assert html.count("<s ") == 1, "only the line whose price dropped is struck"
    assert "Out of stock right now" in html
    assert html.count("Out of stock right now") == 1
    assert "€148.00" in html
    # the jacket is listed but not in the total, and the total says so
    assert "Total for the 3 items in stock" in email.text
    assert "COMEBACK10" in html
    assert "10% off today only" in html
    assert 'href="https://shop.example.com/cart?cart=c-42"' in html
    assert "Return to your cart" in html


def test_browse_abandonment_shows_what_was_viewed_and_picks(store: TemplateStore) -> None:
    email = store.render("browse_abandonment", full_context())

    assert email.subject == "Anna, still thinking it over?"
    assert email.preheader.startswith("Alpine Down Parka and more are waiting for you")
    for name in ("Alpine Down Parka", "Thermal Base Layer", "Running Cap", "Hydration Vest"):
        assert name in email.html
    assert "€249.00" in email.html
    assert "Sold out for now" in email.html
    assert 'href="https://shop.example.com/p/8"' in email.html
    assert "Pick up where you left off" in email.html


def test_post_purchase_thanks_for_the_order_and_cross_sells(store: TemplateStore) -> None:
    email = store.render("post_purchase", full_context())

    assert email.subject == "Thanks for your order, Anna!"
    assert email.preheader.startswith("Order SO-10482 is confirmed")
    assert "Thank you, Anna!" in email.html
    assert "SO-10482" in email.html
    assert "€157.40" in email.html
    for name in ("Trail Runner GTX", "Merino Socks 3-pack", "Running Cap", "Hydration Vest"):
        assert name in email.html
    assert 'href="https://shop.example.com/account/orders/SO-10482"' in email.html


def test_prices_follow_the_users_locale(store: TemplateStore) -> None:
    context = full_context()
    context["user"]["locale"] = "de-DE"
    html = store.render("abandoned_cart", context).html
    assert '<html lang="de-DE"' in html
    assert "99,00\xa0€" in html
    assert "129,00\xa0€" in html


# -- missing, failed and unusable blocks ----------------------------------------------------


@pytest.mark.parametrize("template_id", SHIPPED)
def test_every_block_missing_renders_the_fallbacks_and_says_so(
    store: TemplateStore, template_id: str
) -> None:
    template = store.get(template_id)
    email = store.render(template_id, {"user": {"id": "u1"}})

    assert email.fell_back == tuple(template.blocks)
    assert email.subject
    assert "None" not in email.subject
    assert not email.subject.startswith(",")
    for junk in ("None", "Undefined", "€", "{{", "{%"):
        assert junk not in visible_text(email.html), junk
    # no user, no links: the footer still links somewhere harmless
    assert 'href="#"' in email.html
    assert "Unsubscribe" in email.html


def test_fallbacks_read_as_a_complete_email(store: TemplateStore) -> None:
    cart = store.render("abandoned_cart", {"user": {}})
    assert cart.subject == "Hi, you left something in your cart"
    assert cart.preheader == "Your picks are saved. Come back before they're gone."
    assert "You left something behind" in cart.html
    assert "We saved the things you picked out" in cart.html
    assert 'href="https://shop.example.com/cart"' in cart.html
    assert "You might also like" not in cart.html

    browse = store.render("browse_abandonment", {})
    assert browse.subject == "Hi, still thinking it over?"
    assert "See what's new" in browse.html

    order = store.render("post_purchase", {"user": None})
    assert order.subject == "Thanks for your order, friend!"
    assert "Thank you for your order!" in order.html
    assert "Your order</h2>" not in order.html


@pytest.mark.parametrize("missing", [None, "absent", "not an object"])
def test_one_missing_block_falls_back_alone(store: TemplateStore, missing: str | None) -> None:
    context = full_context()
    if missing == "absent":
        del context["cart"]
    elif missing is None:
        context["cart"] = None
    else:
        context["cart"] = ["a list is not a cart"]

    email = store.render("abandoned_cart", context)

    assert email.fell_back == ("cart",)
    assert "Trail Runner GTX" not in email.html
    assert "We saved the things you picked out" in email.html
    assert "Running Cap" in email.html, "the other blocks keep their data"
    assert "COMEBACK10" in email.html


def test_data_the_template_cannot_render_falls_back_instead_of_failing(store: TemplateStore) -> None:
    context = full_context()
    # a comparison of a string with a number is a Liquid type error
    context["cart"]["item_count"] = "four"

    email = store.render("abandoned_cart", context)

    assert email.fell_back == ("cart",)
    assert "Trail Runner GTX" not in email.html
    assert "Running Cap" in email.html
    assert "COMEBACK10" in email.html


def test_odd_values_inside_blocks_never_break_the_email(store: TemplateStore) -> None:
    context = full_context()
    line = context["cart"]["lines"][0]
    line["unit_price"] = None
    line["added_price"] = "not a number"
    line["product"]["name"] = None
    context["cart"]["lines"].append({})
    context["user"]["first_name"] = "   "
    context["user"]["locale"] = "xx-NOPE"

    email = store.render("abandoned_cart", context)

    assert email.fell_back == ()
    assert email.subject == "Hi, you left something in your cart"
    assert "Merino Socks 3-pack" in email.html


def test_links_fill_in_what_is_missing_with_safe_defaults(store: TemplateStore) -> None:
    context = full_context()
    context["links"] = {"unsubscribe_url": "https://shop.example.com/u/x", "preferences_url": ""}
    html = store.render("abandoned_cart", context).html
    assert 'href="https://shop.example.com/u/x"' in html
    assert "View in browser" not in html, "no view-in-browser link when there is no URL"
    assert DEFAULT_LINKS["preferences_url"] == "#"


def test_the_context_is_not_modified(store: TemplateStore) -> None:
    context = full_context()
    context["cart"] = None
    before = copy.deepcopy(context)
    store.render("abandoned_cart", context)
    assert context == before


# -- safety: escaping, inert Liquid, headers ------------------------------------------------


INJECTION = (
    "<script>alert(1)</script>{{ 6 | times: 7 }}{% if true %}X-IF{% endif %}</mj-text><mj-raw>RAW</mj-raw>"
)


def test_html_and_liquid_in_user_and_upstream_data_are_inert_and_escaped(store: TemplateStore) -> None:
    context = full_context()
    context["user"]["first_name"] = INJECTION
    context["cart"]["lines"][0]["product"]["name"] = '" onerror="alert(1)" x="' + INJECTION
    context["offers"]["offers"][0]["code"] = "{{ user.email }}"

    email = store.render("abandoned_cart", context)

    html = email.html
    assert email.fell_back == ()
    assert "<script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<mj-raw>" not in html
    assert "&lt;mj-raw&gt;RAW&lt;/mj-raw&gt;" in html
    # Liquid in data is text, never evaluated
    assert "{{ 6 | times: 7 }}" in html
    assert "42" not in visible_text(html)
    assert "X-IF" not in html.replace("{% if true %}X-IF{% endif %}", "")
    assert "{{ user.email }}" in html
    assert "anna@example.com" not in html
    # quotes cannot close an attribute
    assert 'alt="&#34; onerror=&#34;alert(1)&#34;' in html
    assert ' onerror="alert(1)"' not in html
    # the subject is a header, not HTML: kept as text, not escaped, not evaluated
    assert email.subject.startswith("<script>alert(1)</script>{{ 6 | times: 7 }}")
    assert "42" not in email.subject


def test_the_text_part_keeps_injected_markup_as_text(store: TemplateStore) -> None:
    context = full_context()
    context["cart"]["lines"][0]["product"]["name"] = "<b>Bold</b> & {{ x }}"
    text = store.render("abandoned_cart", context).text
    assert "<b>Bold</b> & {{ x }}" in text


@pytest.mark.parametrize(
    "url",
    [
        "javascript:alert(1)",
        " JavaScript:alert(1)",
        "java\tscript:alert(1)",
        "data:text/html;base64,PHNjcmlwdD4=",
        "vbscript:msgbox",
        "file:///etc/passwd",
    ],
)
def test_dangerous_urls_in_data_become_harmless(store: TemplateStore, url: str) -> None:
    context = full_context()
    context["cart"]["lines"][0]["product"]["url"] = url
    context["cart"]["lines"][0]["product"]["image_url"] = url
    context["links"]["unsubscribe_url"] = url

    html = store.render("abandoned_cart", context).html

    assert "script:" not in html.lower()
    assert "data:text" not in html
    assert "file:" not in html
    assert "vbscript" not in html


@pytest.mark.parametrize(
    "name", ["Anna\r\nBcc: all@example.com", "Anna\nX", "Anna\u2028X", "Anna\x00\x1bX", "Anna\ud800\uffffX"]
)
def test_subject_and_preheader_carry_no_line_breaks_or_controls(store: TemplateStore, name: str) -> None:
    context = full_context()
    context["user"]["first_name"] = name
    context["recently_viewed"]["products"][0]["name"] = name

    for template_id in SHIPPED:
        email = store.render(template_id, context)
        for header in (email.subject, email.preheader):
            assert not re.search(r"[\x00-\x1f\x7f\u2028\u2029]", header), (template_id, header)
            assert "  " not in header
    assert store.render("abandoned_cart", context).subject.startswith("Anna ")


# -- the text part ---------------------------------------------------------------------------


def test_the_text_part_reads_as_the_email_does(store: TemplateStore) -> None:
    email = store.render("abandoned_cart", full_context())
    text = email.text

    assert "<" not in text.replace("<b>", "")
    lines = text.splitlines()
    # the heading, underlined
    heading = lines.index("Anna, you left something behind")
    assert lines[heading + 1] == "=" * len("Anna, you left something behind")
    # each product with its link, quantity and price; the struck price reads "was"
    assert "Trail Runner GTX (https://shop.example.com/p/1)" in lines
    assert "Quantity: 1" in lines
    assert any(line.startswith("€99.00") and "(was €129.00)" in line for line in lines)
    assert "Merino Socks 3-pack (https://shop.example.com/p/2)" in lines
    assert "Return to your cart (https://shop.example.com/cart?cart=c-42)" in lines
    assert "COMEBACK10" in lines
    assert "Running Cap (https://shop.example.com/p/4)" in lines
    # the hidden preview text and the images are not part of it
    assert email.preheader not in text
    assert "cdn.example.com" not in text
    # wrapped at the template's width, URLs never split
    assert all(len(line) <= 78 or " " not in line.strip() or "http" in line for line in lines)


@pytest.mark.parametrize("template_id", SHIPPED)
def test_every_text_part_names_the_products_and_links(store: TemplateStore, template_id: str) -> None:
    email = store.render(template_id, full_context())
    assert "Running Cap (https://shop.example.com/p/4)" in email.text
    assert "Unsubscribe (https://shop.example.com/u/tok123)" in email.text
    assert "\n\n\n" not in email.text


# -- template identity ----------------------------------------------------------------------


@pytest.mark.parametrize("template_id", SHIPPED)
def test_a_templates_version_is_the_hash_of_its_file(template_id: str) -> None:
    path = TEMPLATES / f"{template_id}.mjml.liquid"
    template = load_template(path)
    assert isinstance(template, Template)
    assert template.version == hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert template.path == path


def test_render_is_the_templates_render(store: TemplateStore) -> None:
    template = store.get("post_purchase")
    email = render(template, full_context())
    assert isinstance(email, RenderedEmail)
    assert email == template.render(full_context())


def test_the_package_is_pure_and_its_surface_is_pinned() -> None:
    code = (
        "import sys, sendtime.server.rendering as r; "
        "print(sorted(r.__all__)); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'aiohttp')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    surface, imported = out.splitlines()
    assert surface == str(
        sorted(
            [
                "DEFAULT_LINKS",
                "FILE_SUFFIX",
                "BlockSpec",
                "RenderPool",
                "RenderedEmail",
                "Template",
                "TemplateError",
                "TemplateSpec",
                "TemplateStore",
                "TextOptions",
                "html_to_text",
                "load_template",
                "parse_template",
                "render",
            ]
        )
    )
    assert "grpc" not in imported
    assert "aiohttp" not in imported
