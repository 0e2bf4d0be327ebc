"""Segments: CEL expressions checked when made (the error points at the bad
part), and evaluated over folded profiles with every name the README lists."""

from __future__ import annotations

from datetime import timedelta

import msgspec
import pytest

from sendtime.server.domain.errors import InvalidInput
from sendtime.server.domain.events import ConsentState
from sendtime.server.domain.segments import VARIABLES, compile_segment
from tests.unit.test_profile import at, folded, identify, track

SHOPPER = folded(
    [
        identify(
            0,
            email="ada@example.com",
            timezone="Europe/Berlin",
            consent={"newsletter": ConsentState.OPTED_IN},
            extra={"country": "DE"},
        ),
        track("Product Viewed", {"product_id": "boot-1", "category": "boots", "price": 90.0}, 10),
        track("Product Viewed", {"product_id": "hat-1", "category": "hats", "price": 20.0}, 20),
        track("Product Added", {"product_id": "boot-1", "cart_id": "c1", "price": 90.0, "quantity": 2}, 30),
        track("Order Completed", {"order_id": "o1", "total": 45.5, "products": [{"product_id": "hat-1"}]}, 5),
    ]
)
NOW = at(60)


@pytest.mark.parametrize(
    "expression",
    [
        'traits.country == "DE" && email == "ada@example.com" && timezone == "Europe/Berlin"',
        'consent.newsletter == "opted_in" && !("marketing" in consent)',
        'viewed.exists(v, v.category == "boots" && now - v.viewed_at < duration("1h"))',
        '"boots" in viewed_categories && "hat-1" in viewed_products',
        "cart_total == 180.0 && cart_quantity == 2 && carts[0].product_ids == ['boot-1']",
        "order_count == 1 && order_total == 45.5 && orders[0].order_id == 'o1' && last_order_at < now",
        "event_count == 5 && first_seen_at < last_activity_at && user_id == 'u1' && anonymous_id == ''",
        # maps used whole, not only by field: built whole
        '"country" in traits && size(traits) == 3 && size(consent) == 1',
        'viewed.exists(v, "category" in v && v["category"] == "hats") && orders.all(o, o.total > 45.0)',
        "carts.exists(c, c.total == 180.0 && 'boot-1' in c.product_ids)",
    ],
)
def test_every_name_reads_the_profile(expression: str) -> None:
    assert compile_segment(expression).matches(SHOPPER, NOW) is True


def test_the_activation_holds_only_the_names_used_and_their_fields_read() -> None:
    segment = compile_segment('traits.country == "DE" && viewed.exists(v, v.category == "boots")')
    activation = {name: build(SHOPPER, NOW) for name, build in segment._builders}
    assert activation == {
        "traits": {"country": "DE"},
        "viewed": [{"category": "boots"}, {"category": "hats"}],
    }
    assert set(VARIABLES) >= {"traits", "consent", "carts", "orders", "viewed", "event_count", "now"}


def test_a_syntax_error_names_the_line_and_column_with_a_caret() -> None:
    with pytest.raises(InvalidInput) as caught:
        compile_segment('traits.country == "DE" &&', field="segment.expression")
    error = caught.value
    assert error.violations[0].field == "segment.expression"
    assert "line 1, column 26" in error.message
    assert error.message.splitlines()[-1] == "  " + " " * 25 + "^"


def test_an_unknown_name_is_named_with_its_column_and_the_known_ones() -> None:
    with pytest.raises(InvalidInput) as caught:
        compile_segment('order_count > 0 && contry == "DE"')
    assert "unknown name 'contry' at column 20" in caught.value.message
    assert "known names: user_id" in caught.value.message


def test_names_bound_by_macros_are_not_unknown() -> None:
    compile_segment("orders.exists(o, o.total > 10.0) && viewed.all(item, item.price < 100.0)")


@pytest.mark.parametrize(
    ("expression", "says"),
    [
        ('event_count > "3"', "No such overload"),
        ("email", "gives str"),
        ("order_count + 1", "gives int"),
        ("nosuchfunction(email)", "nosuchfunction"),
        ("", "is empty"),
    ],
)
def test_type_errors_and_results_that_are_not_booleans_are_refused(expression: str, says: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        compile_segment(expression)
    assert says in caught.value.message


def test_a_profile_the_expression_errs_on_is_counted_not_raised() -> None:
    segment = compile_segment('traits.country == "DE"')
    encode = msgspec.msgpack.Encoder().encode
    bare = folded([identify(0, email="bob@example.com")])
    rows = [("u:ada", encode(SHOPPER)), ("u:bob", encode(bare)), ("u:bad", b"not msgpack")]
    found = segment.evaluate_rows(rows, NOW)
    assert found.scanned == 3
    assert found.matched == 1
    assert found.recipients is not None
    assert [(r.profile_key, r.user_id, r.timezone) for r in found.recipients] == [
        ("u:ada", "u1", "Europe/Berlin")
    ]
    assert found.errors == 2
    assert found.first_error.startswith("u:bob: ")


def test_has_guards_a_trait_some_profiles_lack() -> None:
    segment = compile_segment('has(traits.country) && traits.country == "DE"')
    bare = folded([identify(0, email="bob@example.com")])
    assert segment.matches(bare, NOW + timedelta(days=1)) is False
    assert segment.matches(SHOPPER, NOW) is True
