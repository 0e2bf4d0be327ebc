"""The plain-text part from HTML, and the filters templates format data with
(``money``, ``safe_url``), seen through small templates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sendtime.server.rendering import TextOptions, html_to_text, parse_template

LINKS = TextOptions()


def test_blocks_become_paragraphs_and_breaks_lines() -> None:
    html = "<html><body><div>First <b>para</b>graph</div><p>Line one<br>Line   two</p></body></html>"
    assert html_to_text(html, LINKS) == "First paragraph\n\nLine one\nLine two\n"


def test_headings_are_underlined() -> None:
    html = "<h1>Your cart</h1><h2>You may like</h2><h3>Small</h3><p>x</p>"
    assert html_to_text(html, LINKS) == "Your cart\n=========\n\nYou may like\n------------\n\nSmall\n\nx\n"


def test_links_read_as_text_then_url() -> None:
    html = (
        '<p><a href="https://shop.example.com/cart">Back to cart</a></p>'
        '<p><a href="https://shop.example.com/">https://shop.example.com/</a></p>'
        '<p><a href="mailto:help@example.com">Write to us</a></p>'
        '<p><a href="#">Unsubscribe</a> <a href="%%unsub%%">Manage</a></p>'
        '<p><a href="https://shop.example.com/p/1"><img src="x.jpg" alt="Shoe"></a></p>'
    )
    assert html_to_text(html, LINKS) == (
        "Back to cart (https://shop.example.com/cart)\n\n"
        "https://shop.example.com/\n\n"
        "Write to us (help@example.com)\n\n"
        "Unsubscribe Manage\n"
    )


def test_link_urls_and_image_alts_are_options() -> None:
    html = '<p><a href="https://x.example/">Go</a> <img src="a.png" alt="A shoe"></p>'
    assert html_to_text(html, TextOptions(links=False)) == "Go\n"
    assert html_to_text(html, TextOptions(images=True)) == "Go (https://x.example/) [A shoe]\n"


def test_struck_prices_read_as_was() -> None:
    html = "<p><strong>€99.00</strong> <s>€129.00</s></p>"
    assert html_to_text(html, LINKS) == "€99.00 (was €129.00)\n"


def test_hidden_and_non_text_parts_are_left_out() -> None:
    html = (
        "<html><head><title>T</title><style>p{color:red}</style></head><body>"
        '<div style="display:none;font-size:1px">Preview text</div>'
        "<!--[if mso]><p>Outlook only</p><![endif]--><script>alert(1)</script>"
        "<p>Shown</p></body></html>"
    )
    assert html_to_text(html, LINKS) == "Shown\n"


def test_lists_rules_and_table_cells() -> None:
    html = "<ul><li>One</li><li>Two</li></ul><hr><table><tr><td>Total</td><td>€5</td></tr></table>"
    assert html_to_text(html, LINKS) == "- One\n- Two\n\n--------------------\n\nTotal €5\n"


def test_long_lines_wrap_without_breaking_urls() -> None:
    url = "https://shop.example.com/a/very/long/path/that/must/stay/on/one/line?with=query"
    html = f"<p>{'word ' * 30}<a href='{url}'>link</a></p>"
    text = html_to_text(html, TextOptions(wrap=40))
    lines = text.splitlines()
    assert all(len(line) <= 40 for line in lines if url not in line)
    assert any(line.endswith(f"({url})") or line == f"({url})" for line in lines)
    assert html_to_text(html, TextOptions(wrap=0)).count("\n") == 1


def test_empty_and_odd_input() -> None:
    assert html_to_text("", LINKS) == ""
    assert html_to_text("<p>a \ue000 b \ue001 c</p>", LINKS) == "a b c\n"


# -- filters, through a template ------------------------------------------------------------


def render_body(liquid: str, context: dict[str, Any]) -> str:
    source = (
        '+++\nid = "t"\nsubject = "s"\n+++\n'
        f"<mjml><mj-body><mj-section><mj-column><mj-text>{liquid}</mj-text>"
        "</mj-column></mj-section></mj-body></mjml>\n"
    )
    return parse_template(Path("t.mjml.liquid"), source.encode()).render(context).text.strip()


@pytest.mark.parametrize(
    ("amount", "currency", "locale", "shown"),
    [
        (99, "EUR", "en-IE", "€99.00"),
        (1234.5, "USD", "en-US", "$1,234.50"),
        ("19.9", "EUR", "de-DE", "19,90 €"),  # a no-break space in the HTML
        (12.5, "GBP", "en_GB", "£12.50"),
        (1000, "JPY", "ja-JP", "￥1,000"),
        (5, "", "en-US", "5.00"),
        (5, "eur", "xx-NOPE", "€5.00"),
        (5, None, "", "5.00"),
        ("not a number", "EUR", "en-US", ""),
        (None, "EUR", "en-US", ""),
        (True, "EUR", "en-US", ""),
        ("NaN", "EUR", "en-US", ""),
    ],
)
def test_money_formats_for_the_users_locale(
    amount: object, currency: object, locale: str, shown: str
) -> None:
    user = {"locale": locale, "amount": amount, "currency": currency}
    assert render_body("{{ user.amount | money: user.currency }}", {"user": user}) == shown


@pytest.mark.parametrize(
    ("url", "kept"),
    [
        ("https://shop.example.com/p/1?a=1&b=2", True),
        ("http://shop.example.com/", True),
        ("mailto:help@example.com", True),
        ("%%unsubscribe%%", True),
        ("#section", True),
        ("javascript:alert(1)", False),
        ("JAVASCRIPT:alert(1)", False),
        ("  javascript:alert(1)", False),
        ("data:text/html,hi", False),
        ("ftp://example.com/", False),
        ("", False),
        (None, False),
        (42, False),
    ],
)
def test_safe_url_keeps_web_links_only(url: object, kept: bool) -> None:
    text = render_body('<a href="{{ user.url | safe_url }}">link</a>', {"user": {"url": url}})
    if kept and isinstance(url, str) and url.startswith(("http", "mailto")):
        assert text == f"link ({url.removeprefix('mailto:')})"
    else:
        assert text == "link"
    html = (
        parse_template(
            Path("t.mjml.liquid"),
            b'+++\nid = "t"\nsubject = "s"\n+++\n<mjml><mj-body><mj-section><mj-column><mj-button href="{{ user.url | safe_url }}">x</mj-button></mj-column></mj-section></mj-body></mjml>',
        )
        .render({"user": {"url": url}})
        .html
    )
    expected = str(url).replace("&", "&amp;") if kept else "#"
    assert f'href="{expected}"' in html
