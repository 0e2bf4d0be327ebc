"""The bounds validation puts on an event (issue 15 item 6, issue 16 item 2):
its time window, money, ids, JSON depth; and the flow planner's date
arithmetic, which must hold whatever reaches it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from sendtime.server.domain.errors import InvalidInput
from sendtime.server.domain.events import (
    DEFAULT_WINDOW,
    MAX_JSON_DEPTH,
    Event,
    EventKind,
    EventWindow,
    Identity,
    IncomingEvent,
    nests_deeper,
    validate,
)
from sendtime.server.domain.flows import FlowPlanner
from tests.unit.test_flows import flow as abandoned_cart_flow

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def track(
    properties: object = None, *, at: datetime | None = None, user: str = "u1", name: str = "Custom"
) -> IncomingEvent:
    return IncomingEvent(
        message_id="m1",
        kind=EventKind.TRACK,
        user_id=user,
        name=name,
        timestamp=at,
        properties=msgspec.json.encode(properties if properties is not None else {}),
    )


def fields(incoming: IncomingEvent, window: EventWindow = DEFAULT_WINDOW) -> list[str]:
    with pytest.raises(InvalidInput) as caught:
        validate(incoming, NOW, window)
    return [v.field for v in caught.value.violations]


def test_the_time_window_is_a_day_ahead_and_ten_years_back_by_default() -> None:
    assert fields(track(at=NOW + timedelta(days=1, seconds=1))) == ["timestamp"]
    assert fields(track(at=NOW - timedelta(days=3651))) == ["timestamp"]
    assert fields(track(at=datetime(9999, 12, 31, 23, 59, tzinfo=UTC))) == ["timestamp"]
    assert fields(track(at=datetime(1, 1, 1, tzinfo=UTC))) == ["timestamp"]
    assert validate(track(at=NOW - timedelta(days=3649)), NOW).timestamp == NOW - timedelta(days=3649)


def test_the_window_follows_its_settings() -> None:
    narrow = EventWindow(max_ahead=timedelta(minutes=5), max_age=timedelta(days=1))
    assert fields(track(at=NOW + timedelta(minutes=6)), narrow) == ["timestamp"]
    assert fields(track(at=NOW - timedelta(days=2)), narrow) == ["timestamp"]
    validate(track(at=NOW + timedelta(minutes=4)), NOW, narrow)


def test_a_time_ahead_within_the_window_counts_as_the_arrival() -> None:
    """So it cannot outrank a later change (an opt-out) in last-writer-wins order."""
    event = validate(track(at=NOW + timedelta(hours=23)), NOW)
    assert event.timestamp == NOW


@pytest.mark.parametrize(
    ("properties", "field"),
    [
        ({"cart_id": "c", "product_id": "p", "price": 2**200}, "properties.price"),
        ({"cart_id": "c", "product_id": "p", "price": 1e12 + 1}, "properties.price"),
        ({"cart_id": "c", "product_id": "p", "quantity": 1_000_001}, "properties.quantity"),
        ({"cart_id": "c", "product_id": "p", "position": -1}, "properties.position"),
        ({"cart_id": "c", "product_id": 2**64}, "properties.product_id"),
        ({"cart_id": "c\x00", "product_id": "p"}, "properties.cart_id"),
    ],
)
def test_money_counts_and_property_ids_are_bounded(properties: dict[str, object], field: str) -> None:
    assert fields(track(properties, name="Product Added")) == [field]


def test_a_price_at_the_bound_is_accepted() -> None:
    validate(
        track(
            {"cart_id": "c", "product_id": "p", "price": 1e12, "quantity": 1_000_000}, name="Product Added"
        ),
        NOW,
    )


@pytest.mark.parametrize("bad", ["a\x00b", "a\nb", "\x7f", "a\x85b", "tab\there"])
def test_control_characters_are_refused_in_ids_and_names(bad: str) -> None:
    assert fields(track(user=bad)) == ["user_id"]
    assert fields(track(name=bad)) == ["name"]
    incoming = msgspec.structs.replace(track(), message_id=bad)
    assert fields(incoming) == ["message_id"]


def test_json_depth_is_measured_outside_strings_too() -> None:
    at_limit = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    over = b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1)
    assert not nests_deeper(at_limit)
    assert nests_deeper(over)
    assert nests_deeper(b"[" * 100_000 + b"]" * 100_000)  # beyond Python's recursion limit
    # brackets inside strings are text, not structure
    assert not nests_deeper(json.dumps({"a": "[" * 100, "b": [{"c": "{{{{"}] * 50}).encode())
    wide = json.dumps({"products": [{"id": i, "options": {"size": [1, 2]}} for i in range(200)]}).encode()
    assert not nests_deeper(wide)


def test_deep_properties_and_traits_name_the_limit() -> None:
    deep = b'{"a":' + b"[" * 40 + b"]" * 40 + b"}"
    with pytest.raises(InvalidInput) as caught:
        validate(
            IncomingEvent(message_id="m", kind=EventKind.TRACK, user_id="u", name="X", properties=deep), NOW
        )
    assert [(v.field, v.description) for v in caught.value.violations] == [
        ("properties", f"nests objects and arrays deeper than {MAX_JSON_DEPTH} levels")
    ]
    with pytest.raises(InvalidInput) as caught:
        validate(IncomingEvent(message_id="m", kind=EventKind.IDENTIFY, user_id="u", extra_traits=deep), NOW)
    assert [v.field for v in caught.value.violations] == ["extra_traits"]


def test_invalid_utf8_in_properties_is_refused_even_where_the_schema_skips() -> None:
    properties = b'{"cart_id": "c", "product_id": "p", "note": "\xff"}'
    incoming = IncomingEvent(
        message_id="m", kind=EventKind.TRACK, user_id="u", name="Product Added", properties=properties
    )
    with pytest.raises(InvalidInput) as caught:
        validate(incoming, NOW)
    assert [v.field for v in caught.value.violations] == ["properties"]
    assert "UTF-8" in caught.value.violations[0].description


def test_the_planner_holds_times_at_the_end_of_the_calendar() -> None:
    """A year 9999 Product Added overflowed due_at inside the store's
    transaction. Validation refuses it now; the planner must not raise even so."""
    flow = abandoned_cart_flow()  # the flows tests' own
    late = datetime(9999, 12, 31, 23, 59, tzinfo=UTC)
    identity = Identity("u1")
    event = Event(
        message_id="m",
        identity=identity,
        profile_key=identity.key,
        kind=EventKind.TRACK,
        name="Product Added",
        timestamp=late,
        received_at=late,
        properties=b'{"cart_id": "c", "product_id": "p"}',
    )
    (send,), _ = FlowPlanner([flow]).plan([event])
    assert send.due_at == datetime.max.replace(tzinfo=UTC)
