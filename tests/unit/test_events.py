"""Validation of incoming events against the contract and Segment's e-commerce spec v2."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from sendtime.server.domain.errors import InvalidInput
from sendtime.server.domain.events import (
    MAX_EVENT_BYTES,
    CartChange,
    ConsentState,
    EventKind,
    IncomingEvent,
    OrderCompleted,
    ProductViewed,
    TraitsUpdate,
    validate,
)

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def track(name: str, properties: bytes, **fields: object) -> IncomingEvent:
    base: dict[str, object] = {"message_id": "m1", "user_id": "u1"}
    base.update(fields)
    return IncomingEvent(kind=EventKind.TRACK, name=name, properties=properties, **base)  # type: ignore[arg-type]


def violations(event: IncomingEvent) -> dict[str, str]:
    with pytest.raises(InvalidInput) as caught:
        validate(event, NOW)
    return {v.field: v.description for v in caught.value.violations}


def test_known_event_decodes_to_its_typed_schema() -> None:
    event = validate(
        track("Product Added", b'{"cart_id": "c1", "product_id": 42, "price": 9.5, "quantity": 2, "x": 1}'),
        NOW,
    )
    assert isinstance(event.payload, CartChange)
    assert event.payload.product_id == 42
    assert event.payload.quantity == 2
    assert event.identity.key == "u:u1"
    assert event.timestamp == NOW  # no client timestamp: the time it was received


def test_all_spec_events_have_schemas() -> None:
    samples = {
        "Product Viewed": b'{"product_id": "p1", "price": 3, "currency": "EUR"}',
        "Product List Viewed": b'{"list_id": "l", "products": [{"product_id": "p1"}]}',
        "Products Searched": b'{"query": "mugs"}',
        "Product Removed": b'{"product_id": "p1"}',
        "Cart Viewed": b'{"cart_id": "c", "products": [{"product_id": "p1", "quantity": 1}]}',
        "Checkout Started": b'{"order_id": "o", "products": []}',
        "Order Completed": b'{"order_id": "o1", "total": 10, "products": [{"sku": "s"}]}',
        "Order Refunded": b'{"order_id": "o1"}',
    }
    for name, properties in samples.items():
        assert validate(track(name, properties), NOW).payload is not None, name


def test_wrong_type_names_the_nested_field() -> None:
    found = violations(track("Order Completed", b'{"order_id": "o", "products": [{"price": "cheap"}]}'))
    assert list(found) == ["properties.products[0].price"]
    assert "Expected" in found["properties.products[0].price"]


def test_missing_required_property_is_named() -> None:
    assert violations(track("Order Completed", b'{"total": 3}')) == {"properties.order_id": "is required"}


def test_cart_change_needs_a_product() -> None:
    assert "properties.product_id" in violations(track("Product Added", b'{"price": 1}'))


@pytest.mark.parametrize(
    ("properties", "field"),
    [
        (b'{"product_id": "p", "price": -1}', "properties.price"),
        (b'{"product_id": "p", "quantity": -2}', "properties.quantity"),
        (b'{"product_id": "p", "currency": "euro"}', "properties.currency"),
    ],
)
def test_ranges_and_patterns(properties: bytes, field: str) -> None:
    assert field in violations(track("Product Added", properties))


def test_custom_event_takes_any_object_but_only_an_object() -> None:
    event = validate(track("Wishlist Shared", b'{"anything": [1, 2, {"deep": true}]}'), NOW)
    assert event.payload is None
    assert "properties" in violations(track("Wishlist Shared", b"[1, 2]"))
    assert "is not valid JSON" in violations(track("Wishlist Shared", b"{nope"))["properties"]


def test_every_envelope_fault_is_reported_at_once() -> None:
    found = violations(track("", b"{}", message_id="x" * 101, user_id=""))
    assert set(found) == {"message_id", "user_id", "name"}


def test_size_limit_per_event() -> None:
    big = b'{"blob": "' + b"a" * MAX_EVENT_BYTES + b'"}'
    assert "limit is 32768" in violations(track("Custom", big))["properties"]


def test_event_without_a_kind_is_rejected() -> None:
    event = IncomingEvent(message_id="m", kind=None, user_id="u")
    assert "kind" in violations(event)


def test_naive_client_timestamp_is_taken_as_utc() -> None:
    event = validate(track("Custom", b"{}", timestamp=datetime(2026, 1, 1, 8, 0)), NOW)
    assert event.timestamp == datetime(2026, 1, 1, 8, 0, tzinfo=UTC)


def test_identify_traits_are_checked() -> None:
    event = IncomingEvent(
        message_id="m",
        kind=EventKind.IDENTIFY,
        user_id="u",
        traits=TraitsUpdate(email="not-an-email", locale="english!", timezone="Mars/Olympus"),
    )
    assert set(violations(event)) == {"traits.email", "traits.locale", "traits.timezone"}


def test_identify_merges_extra_traits_json() -> None:
    event = validate(
        IncomingEvent(
            message_id="m",
            kind=EventKind.IDENTIFY,
            user_id="u",
            traits=TraitsUpdate(email="ada@example.com", consent={"marketing": ConsentState.OPTED_IN}),
            extra_traits=b'{"plan": "pro"}',
        ),
        NOW,
    )
    assert isinstance(event.payload, TraitsUpdate)
    assert event.payload.extra == {"plan": "pro"}
    assert event.payload.consent == {"marketing": ConsentState.OPTED_IN}


def test_product_viewed_keeps_product_fields() -> None:
    event = validate(track("Product Viewed", b'{"sku": "S-1", "name": "Mug", "url": "https://x/p"}'), NOW)
    assert isinstance(event.payload, ProductViewed)
    assert (event.payload.sku, event.payload.name) == ("S-1", "Mug")


def test_order_completed_accepts_numeric_ids() -> None:
    event = validate(track("Order Completed", b'{"order_id": 1001, "cart_id": 7}'), NOW)
    assert isinstance(event.payload, OrderCompleted)
    assert (event.payload.order_id, event.payload.cart_id) == (1001, 7)
