"""Whole emails rendered by shape are the emails the whole-markup pipeline
makes, byte for byte: for every shipped template and many users (varied carts,
names that need escaping or that MJML would write escaped, out-of-stock lines,
missing and empty blocks, locales, links), ``Template.render`` (MJML compiled
once per markup shape, the values put back in) equals ``Template.render_whole``
(Liquid, then MJML over the whole markup, then the text part read from the
whole HTML: the pipeline as it was)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from sendtime.server.rendering import TemplateStore
from sendtime.server.rendering._liquid import MARK_CLOSE, MARK_OPEN, Marked
from sendtime.server.rendering._template import MAX_SHAPES

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"

NAMES = [
    "Ada",
    "Grace",
    "O'Brien",
    'Dwayne "The Rock"',
    "<script>alert(1)</script>",
    "Zoë",
    "Ångström & Søn",
    "José María",
    "李小龍",
    "محمد",
    "👩‍💻 Dev",  # a zero-width joiner: MJML writes it escaped in attributes
    "e\u0301mile",  # a combining accent
    "Tab\there",
    " padded ",
    "two  spaces",
    "bell\x07",
    "private\ue001use",
    "~m~0~ not a mark",
    "{{ user.first_name }}",
    "&amp; already",
    "",
    "   ",
]
LOCALES = ["", "en-US", "en-GB", "de-DE", "fr-FR", "nl-NL", "ja-JP", "ar-EG", "xx-YY"]
URLS = [
    "https://shop.example.com/p/{n}",
    "https://shop.example.com/p/{n}?utm=a&b=c",
    "javascript:alert({n})",
    "",
    "https://shop.example.com/p/ë{n}",
    "{{{{ merge_tag }}}}",
]


def product(rng: random.Random, n: int) -> dict[str, Any]:
    return {
        "id": f"p{n}",
        "name": rng.choice(NAMES) or f"Product {n}",
        "url": rng.choice(URLS).format(n=n),
        "image_url": rng.choice(URLS).format(n=n),
        "price": rng.choice([9.5, 14.0, 1234.56, 0.0, 19.99]),
        "currency": rng.choice(["EUR", "USD", "JPY", "GBP", ""]),
        "category": "things",
        "in_stock": rng.random() > 0.2,
    }


def context(rng: random.Random) -> dict[str, Any]:
    lines = []
    for n in range(rng.choice([0, 1, 1, 2, 3, 3, 5])):
        item = product(rng, n)
        unit = item["price"]
        added = rng.choice([unit, unit + 5.0])
        lines.append(
            {
                "product": item,
                "quantity": rng.randint(1, 3),
                "unit_price": unit,
                "added_price": added,
                "price_dropped": unit < added,
                "in_stock": item["in_stock"],
                "line_total": unit,
            }
        )
    cart = {
        "cart_id": rng.choice(["c1", "", "cart with spaces&x"]),
        "lines": lines,
        "total": 42.5,
        "currency": rng.choice(["EUR", "USD"]),
        "item_count": sum(line["quantity"] for line in lines if line["in_stock"]),
        "out_of_stock_lines": sum(1 for line in lines if not line["in_stock"]),
    }
    picks = {
        "products": [product(rng, 10 + n) for n in range(rng.choice([0, 2, 3, 4, 6]))],
        "strategy": "popular",
    }
    viewed = {
        "products": [{**product(rng, 20 + n), "viewed_at": "2026-12-01T10:00:00+00:00"} for n in range(3)]
    }
    order = {
        "order_id": rng.choice(["o-1", "<o>"]),
        "total": 99.0,
        "currency": "EUR",
        "products": [product(rng, 30 + n) for n in range(rng.choice([0, 1, 2]))],
    }
    offers = {"offers": [{"id": "o", "code": rng.choice(["SAVE10", "A&B"]), "text": rng.choice(NAMES)}]}
    user: dict[str, Any] = {"id": "u", "first_name": rng.choice(NAMES), "last_name": rng.choice(NAMES)}
    if locale := rng.choice(LOCALES):
        user["locale"] = locale
    links = rng.choice(
        [
            {},
            {
                "unsubscribe_url": "https://x.example/u/tok?a=1&b=2",
                "view_in_browser_url": "https://x.example/v",
            },
            {"unsubscribe_url": "javascript:evil()"},
        ]
    )

    def maybe(block: dict[str, Any]) -> Any:
        return rng.choice([block, block, block, None, "not an object"])

    return {
        "user": user,
        "links": links,
        "cart": maybe(cart),
        "recommendations": maybe(picks),
        "recently_viewed": maybe(viewed),
        "last_order": maybe(order),
        "offers": maybe(offers),
    }


@pytest.mark.parametrize("template_id", ["abandoned_cart", "browse_abandonment", "post_purchase"])
def test_rendering_by_shape_gives_the_whole_markup_pipelines_email(template_id: str) -> None:
    template = TemplateStore(TEMPLATES).get(template_id)
    rng = random.Random(template_id)
    for _ in range(400):
        data = context(rng)
        assert template.render(data) == template.render_whole(data), data
    shapes = template._shapes
    assert shapes is not None
    # shapes were reused (far fewer than users), and most compile value for
    # value and are read for the text part once
    assert 0 < len(shapes) < 200 <= MAX_SHAPES
    assert sum(shape is not None and shape[1] is not None for shape in shapes.values()) > len(shapes) / 2


def test_a_template_whose_text_could_pass_for_a_mark_renders_whole(tmp_path: Path) -> None:
    source = (TEMPLATES / "browse_abandonment.mjml.liquid").read_text()
    (tmp_path / "browse_abandonment.mjml.liquid").write_text(
        source.replace("</mjml>", "<!-- ~m~0~ --></mjml>")
    )
    template = TemplateStore(tmp_path).get("browse_abandonment")
    assert template._shapes is None
    data = context(random.Random(1))
    assert template.render(data) == template.render_whole(data)


def test_marked_text_is_filled_by_mark_number_wherever_marks_repeat() -> None:
    marked = Marked(
        f"<title>{MARK_OPEN}1{MARK_CLOSE}</title><p>{MARK_OPEN}0{MARK_CLOSE} and {MARK_OPEN}1{MARK_CLOSE}</p>"
    )
    assert marked.has_marks
    assert marked.fill(["a", "b"]) == "<title>b</title><p>a and b</p>"
    plain = Marked("<p>no values</p>")
    assert not plain.has_marks
    assert plain.fill([]) == "<p>no values</p>"
