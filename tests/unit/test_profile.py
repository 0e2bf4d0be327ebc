"""The profile fold: carts, views, orders, traits; the same profile whatever the arrival order."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from sendtime.server.domain.events import (
    ConsentState,
    Event,
    EventKind,
    IncomingEvent,
    TraitsUpdate,
    validate,
)
from sendtime.server.domain.profile import MAX_VIEWED, Profile, fold, merge, view

T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
_counter = iter(range(1_000_000))


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def track(name: str, properties: dict[str, object], minute: float, user: str = "u1") -> Event:
    return validate(
        IncomingEvent(
            message_id=f"m{next(_counter)}",
            kind=EventKind.TRACK,
            user_id=user,
            name=name,
            timestamp=at(minute),
            properties=msgspec.json.encode(properties),
        ),
        at(minute),
    )


def identify(minute: float, **traits: object) -> Event:
    return validate(
        IncomingEvent(
            message_id=f"m{next(_counter)}",
            kind=EventKind.IDENTIFY,
            user_id="u1",
            timestamp=at(minute),
            traits=TraitsUpdate(**traits),  # type: ignore[arg-type]
        ),
        at(minute),
    )


def folded(events: list[Event]) -> Profile:
    profile = Profile()
    for event in events:
        fold(profile, event)
    return profile


def cart_lines(profile: Profile) -> dict[str, dict[str, int]]:
    return {c.cart_id: {line.product_id: line.quantity for line in c.lines} for c in view(profile).carts}


def test_cart_adds_removes_and_keeps_latest_details() -> None:
    profile = folded(
        [
            track("Product Added", {"cart_id": "c", "product_id": "p1", "price": 10, "quantity": 2}, 1),
            track("Product Added", {"cart_id": "c", "product_id": "p2", "price": 5}, 2),
            track("Product Added", {"cart_id": "c", "product_id": "p1", "price": 8, "quantity": 1}, 3),
            track("Product Removed", {"cart_id": "c", "product_id": "p2"}, 4),
        ]
    )
    (cart,) = view(profile).carts
    (line,) = cart.lines
    assert (line.product_id, line.quantity, line.price) == ("p1", 3, 8)
    assert cart.updated_at == at(4)


def test_removing_part_of_a_quantity() -> None:
    profile = folded(
        [
            track("Product Added", {"cart_id": "c", "product_id": "p1", "quantity": 3}, 1),
            track("Product Removed", {"cart_id": "c", "product_id": "p1", "quantity": 1}, 2),
        ]
    )
    assert cart_lines(profile) == {"c": {"p1": 2}}


def test_order_with_cart_id_empties_that_cart_only() -> None:
    profile = folded(
        [
            track("Product Added", {"cart_id": "c1", "product_id": "p1"}, 1),
            track("Product Added", {"cart_id": "c2", "product_id": "p2"}, 1),
            track("Order Completed", {"order_id": "o1", "cart_id": "c1", "total": 10}, 2),
        ]
    )
    assert cart_lines(profile) == {"c2": {"p2": 1}}
    assert [o.order_id for o in view(profile).orders] == ["o1"]


def test_order_without_cart_id_empties_carts_filled_before_it() -> None:
    profile = folded(
        [
            track("Product Added", {"cart_id": "c1", "product_id": "p1"}, 1),
            track("Order Completed", {"order_id": "o1", "total": 10}, 2),
            track("Product Added", {"cart_id": "c1", "product_id": "p9"}, 3),
        ]
    )
    assert cart_lines(profile) == {"c1": {"p9": 1}}


def test_an_order_forgets_the_operations_of_the_carts_it_closed() -> None:
    # A shopper who orders often must not carry every closed cart's history:
    # the clear mark alone keeps closed operations from counting.
    events = []
    for n in range(15):
        events += [
            track("Product Added", {"cart_id": f"c{n}", "product_id": "p1", "quantity": 2}, 10 * n + 1),
            track("Product Removed", {"cart_id": f"c{n}", "product_id": "p1", "quantity": 1}, 10 * n + 2),
            track("Order Completed", {"order_id": f"o{n}", "cart_id": f"c{n}"}, 10 * n + 3),
        ]
    events += [
        track("Product Added", {"cart_id": "open", "product_id": "p2"}, 200),
        track("Product Added", {"cart_id": "c3", "product_id": "p3"}, 5),  # late: before c3's order
    ]
    profile = folded(events)
    assert {key: len(cart.ops) for key, cart in profile.carts.items() if cart.ops} == {"open": 1}
    assert cart_lines(profile) == {"open": {"p2": 1}}

    everything = folded([*events, track("Order Completed", {"order_id": "all"}, 300)])
    assert sum(len(cart.ops) for cart in everything.carts.values()) == 0
    assert cart_lines(everything) == {}


def test_merging_keeps_only_the_operations_no_order_closed() -> None:
    # the visitor's cart ops came before an order the user placed (one that names no cart)
    visitor = folded([track("Product Added", {"cart_id": "c", "product_id": "p1"}, 1, user="anon")])
    user = folded(
        [
            track("Product Added", {"cart_id": "d", "product_id": "p2"}, 2),
            track("Order Completed", {"order_id": "o"}, 3),
            track("Product Added", {"cart_id": "d", "product_id": "p3"}, 4),
        ]
    )
    for into, other in ((user, visitor), (visitor, user)):
        result = Profile()
        merge(result, into)
        merge(result, other)
        assert {
            key: [op.message_id for op in cart.ops] for key, cart in result.carts.items() if cart.ops
        } == {"d": [op.message_id for op in user.carts["d"].ops]}
        assert cart_lines(result) == {"d": {"p3": 1}}
        assert result.carts["c"].updated_at == at(1)


def test_checkout_snapshot_sets_the_whole_cart() -> None:
    profile = folded(
        [
            track("Product Added", {"cart_id": "c", "product_id": "p1"}, 1),
            track("Checkout Started", {"cart_id": "c", "products": [{"product_id": "p7", "quantity": 2}]}, 2),
        ]
    )
    assert cart_lines(profile) == {"c": {"p7": 2}}


def test_refund_before_its_order_still_lands_on_the_order() -> None:
    refund = track("Order Refunded", {"order_id": "o1", "total": 4}, 5)
    order = track("Order Completed", {"order_id": "o1", "total": 10, "products": [{"product_id": "p"}]}, 1)
    (seen,) = view(folded([refund, order])).orders
    assert (seen.total, seen.refunded_total, seen.completed_at, seen.refunded_at) == (10, 4, at(1), at(5))


def test_traits_and_consent_are_last_writer_wins_by_event_time() -> None:
    newer = identify(5, email="new@example.com", consent={"marketing": ConsentState.OPTED_OUT})
    older = identify(
        1, email="old@example.com", first_name="Ada", consent={"marketing": ConsentState.OPTED_IN}
    )
    shown = view(folded([newer, older]))
    assert shown.traits == {"email": "new@example.com", "first_name": "Ada"}
    assert shown.consent == {"marketing": "opted_out"}


def test_recently_viewed_is_bounded_newest_first() -> None:
    events = [track("Product Viewed", {"product_id": f"p{i}"}, i) for i in range(MAX_VIEWED + 10)]
    shown = view(folded(events)).recently_viewed
    assert len(shown) == MAX_VIEWED
    assert shown[0].product.product_id == f"p{MAX_VIEWED + 9}"


def test_activity_bounds_and_count() -> None:
    shown = view(folded([track("Custom", {}, 7), track("Custom", {}, 2)]))
    assert (shown.first_seen_at, shown.last_activity_at, shown.event_count) == (at(2), at(7), 2)


def test_profile_survives_a_msgpack_round_trip() -> None:
    profile = folded(
        [
            identify(0, email="a@example.com", consent={"marketing": ConsentState.OPTED_IN}),
            track("Product Added", {"cart_id": "c", "product_id": "p1", "price": 2.5}, 1),
            track("Order Completed", {"order_id": "o", "cart_id": "x"}, 2),
        ]
    )
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(profile), type=Profile)
    assert view(decoded) == view(profile)


# A realistic shopping session to shuffle: the fold must not care about arrival order.
SESSION = [
    identify(0, email="a@example.com", first_name="Ada", consent={"marketing": ConsentState.OPTED_IN}),
    track("Product Viewed", {"product_id": "p1", "price": 10}, 1),
    track("Product Added", {"cart_id": "c1", "product_id": "p1", "price": 10, "quantity": 2}, 2),
    track("Product Added", {"cart_id": "c1", "product_id": "p2", "price": 4}, 3),
    track("Product Removed", {"cart_id": "c1", "product_id": "p1", "quantity": 1}, 4),
    track("Order Completed", {"order_id": "o1", "cart_id": "c1", "total": 14}, 5),
    track("Product Added", {"cart_id": "c2", "product_id": "p3", "quantity": 1}, 6),
    identify(7, email="b@example.com", consent={"marketing": ConsentState.OPTED_OUT}),
    track("Product Viewed", {"product_id": "p1", "price": 9}, 8),
    track("Order Refunded", {"order_id": "o1", "total": 14}, 9),
    track("Product Removed", {"cart_id": "c2", "product_id": "p3"}, 10),
    track("Product Added", {"cart_id": "c2", "product_id": "p4", "quantity": 3}, 10),
]


@settings(max_examples=200, deadline=None)
@given(st.permutations(SESSION))
def test_any_arrival_order_gives_the_same_profile(order: list[Event]) -> None:
    assert view(folded(order)) == view(folded(SESSION))


def test_the_session_folds_to_what_a_person_expects() -> None:
    shown = view(folded(SESSION))
    assert cart_lines(folded(SESSION)) == {"c2": {"p4": 3}}
    assert shown.traits["email"] == "b@example.com"
    assert shown.consent == {"marketing": "opted_out"}
    assert shown.orders[0].refunded_total == 14
    assert shown.recently_viewed[0].product.price == 9


def test_an_item_added_in_the_same_instant_as_the_order_belongs_to_it() -> None:
    # Segment clients send millisecond timestamps: the add and the order can tie,
    # and the outcome must not hang on how their message ids happen to sort.
    for add_id, order_id in (("a", "z"), ("z", "a")):
        added = track("Product Added", {"cart_id": "c", "product_id": "p1"}, 3)
        order = track("Order Completed", {"order_id": "o", "cart_id": "c"}, 3)
        added = msgspec.structs.replace(added, message_id=add_id)
        order = msgspec.structs.replace(order, message_id=order_id)
        assert cart_lines(folded([added, order])) == {}
        assert cart_lines(folded([order, added])) == {}
