"""The output tag's own lookup of plain paths (``{{ a.b.c | filters }}``,
each name a key of a dict) writes what python-liquid's lookup writes, for
every kind of value a path can meet: nested dicts, the special names size,
first and last (as keys and not), lists and indexes, missing names, None,
objects that are not dicts, loop variables, assigned names and filters."""

from __future__ import annotations

from typing import Any

import pytest
from liquid import Environment, Undefined

from sendtime.server.rendering._liquid import make_environment, money, safe_url

DATA: dict[str, Any] = {
    "user": {"first_name": "Ada <b>", "locale": "de-DE", "size": "XL", "tags": ["a", "b"]},
    "cart": {
        "lines": [{"name": "Mug", "price": 12.5}, {"name": "Pot & Lid", "price": 30}],
        "currency": "EUR",
    },
    "bare": {},
    "nothing": None,
    "text": "plain",
    "number": 3,
    "pairs": {"first": "one", "last": "two"},
    "url": {"href": "javascript:alert(1)", "ok": "https://shop.example.com/p?a=1&b=2"},
}
EXPRESSIONS = [
    "user.first_name",
    "user.size",
    "user.tags",
    "user.tags.size",
    "user.tags.first",
    "user.tags.last",
    "user.tags[1]",
    "user.missing",
    "user.first_name.size",
    "user.missing.deeper",
    "cart.lines.size",
    "cart.lines.first.name",
    "cart.lines[1].name",
    "cart.lines[1].price | money: cart.currency",
    "bare.size",
    "bare.anything",
    "nothing",
    "nothing.below",
    "text",
    "text.size",
    "number",
    "number.below",
    "pairs.first",
    "pairs.last",
    "pairs.size",
    "absent",
    "absent | default: 'none'",
    "user.missing | default: 'fallback'",
    "user.first_name | upcase | strip",
    "url.href | safe_url",
    "url.ok | safe_url",
]


def plain_environment() -> Environment:
    env = Environment(autoescape=True, undefined=Undefined, strict_filters=True)
    env.add_filter("money", money)
    env.add_filter("safe_url", safe_url)
    return env


@pytest.mark.parametrize("expression", EXPRESSIONS)
def test_a_plain_path_writes_what_python_liquid_writes(expression: str) -> None:
    source = "{{ " + expression + " }}"
    ours = make_environment(autoescape=True).from_string(source).render(**DATA)
    theirs = plain_environment().from_string(source).render(**DATA)
    assert ours == theirs


def test_loop_variables_and_assigned_names_are_looked_up_alike() -> None:
    source = (
        "{% assign who = user %}{% for line in cart.lines %}"
        "{{ forloop.index }}:{{ line.name }}={{ line.price | money: cart.currency }}"
        " {{ who.first_name }} {{ forloop.last }};{% endfor %}"
    )
    ours = make_environment(autoescape=True).from_string(source).render(**DATA)
    assert ours == plain_environment().from_string(source).render(**DATA)
    assert "1:Mug=" in ours
    assert "Pot &amp; Lid" in ours
