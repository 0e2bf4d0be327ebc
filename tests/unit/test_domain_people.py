"""ProfileBook per person: the links events carry, learned as they are folded
or loaded with the profiles, make one person of several ids; a read under any
of them gives the person's profile, whatever the arrival order of the links
and the events, and a shared device keeps two people apart."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from sendtime.server.domain.events import EventKind, IncomingEvent, TraitsUpdate, validate
from sendtime.server.domain.profile import Profile, ProfileView, fold, view
from tests.fakes import IngestRig, ManualClock

T0 = ManualClock().now() - timedelta(hours=2)


def at(minute: int) -> datetime:
    return T0 + timedelta(minutes=minute)


def event(
    message_id: str,
    minute: int,
    name: str = "",
    properties: dict[str, object] | None = None,
    *,
    user: str = "",
    anonymous: str = "",
    email: str | None = None,
    kind: EventKind = EventKind.TRACK,
    previous: str = "",
) -> IncomingEvent:
    return IncomingEvent(
        message_id=message_id,
        kind=kind,
        user_id=user,
        anonymous_id=anonymous,
        name=name,
        timestamp=at(minute),
        properties=msgspec.json.encode(properties or {}),
        traits=TraitsUpdate(email=email) if kind is EventKind.IDENTIFY else None,
        previous_id=previous,
    )


# A shopper on two devices: browsing and a cart on the laptop before logging
# in, more after it, an order under the user id, the phone linked later.
SESSION = [
    event("v1", 1, "Product Viewed", {"product_id": "p1", "price": 10}, anonymous="laptop"),
    event("a1", 2, "Product Added", {"cart_id": "c1", "product_id": "p1", "quantity": 1}, anonymous="laptop"),
    event("i1", 3, user="ada", anonymous="laptop", email="ada@example.com", kind=EventKind.IDENTIFY),
    event("a2", 4, "Product Added", {"cart_id": "c1", "product_id": "p2", "quantity": 2}, user="ada"),
    event("v2", 5, "Product Viewed", {"product_id": "p3"}, anonymous="laptop"),
    event("a3", 6, "Product Added", {"cart_id": "c2", "product_id": "p3", "quantity": 1}, anonymous="phone"),
    event("o1", 7, "Order Completed", {"order_id": "o1", "cart_id": "c1", "total": 20}, user="ada"),
    event("i2", 8, user="ada", anonymous="phone", email="ada@work.example", kind=EventKind.IDENTIFY),
    event("v3", 9, "Product Viewed", {"product_id": "p4"}, anonymous="phone"),
]


def everything_in_one() -> ProfileView:
    profile = Profile()
    for incoming in SESSION:
        fold(profile, validate(incoming, ManualClock().now()))
    return view(profile)


def without_ids(shown: ProfileView) -> ProfileView:
    return msgspec.structs.replace(
        shown, user_id="", anonymous_id="", linked_user_ids=[], linked_anonymous_ids=[]
    )


async def read_after(order: list[int], max_cached: int) -> dict[str, ProfileView]:
    async with IngestRig(max_cached=max_cached) as rig:
        for index in order:  # one commit per event, in this arrival order
            await rig.ingest(SESSION[index])
        found = {}
        for key in ("u:ada", "a:laptop", "a:phone"):
            profile = await rig.profiles.get(key)
            assert profile is not None
            found[key] = view(profile)
        return found


@settings(max_examples=60, deadline=None)
@given(st.permutations(range(len(SESSION))), st.sampled_from([1, 2, 100]))
def test_any_arrival_order_of_links_and_events_gives_the_person_every_event(
    order: list[int], max_cached: int
) -> None:
    """Extends the fold's permutation test with links: however the events and
    the identify calls that link the ids arrive (and however few profiles the
    book may keep), each id reads the profile of every event of the person."""
    expected = without_ids(everything_in_one())
    found = asyncio.run(read_after(order, max_cached))
    for key, shown in found.items():
        assert without_ids(shown) == expected, key
    assert found["u:ada"].traits["email"] == "ada@work.example"  # the latest, by event time


async def test_a_link_folded_in_memory_makes_one_person_without_reading_the_store_again() -> None:
    async with IngestRig() as rig:
        await rig.ingest(SESSION[0], SESSION[1])
        await rig.ingest(event("i0", 2, user="ada", email="ada@example.com", kind=EventKind.IDENTIFY))
        loads = len(rig.profile_store.loads)
        await rig.ingest(SESSION[2])  # the link between two ids both in memory
        assert len(rig.profile_store.loads) == loads
        person = await rig.profiles.person("a:laptop")
        assert person is not None
        assert (person.profile.user_id, person.linked_user_ids) == ("ada", ("ada",))
        assert set(person.keys) == {"a:laptop", "u:ada"}
        assert len(rig.profile_store.loads) == loads
        # the content cached under either id is dropped when the person changes
        rig.invalidated.clear()
        await rig.ingest(event("v9", 10, "Product Viewed", {"product_id": "p9"}, user="ada"))
        assert set(rig.invalidated) == {"u:ada", "a:laptop"}


async def test_a_shared_device_keeps_two_people_apart() -> None:
    async with IngestRig() as rig:
        await rig.ingest(
            event("ia", 10, user="ada", anonymous="kiosk", email="ada@example.com", kind=EventKind.IDENTIFY),
            event("va", 11, "Product Viewed", {"product_id": "ada-view"}, anonymous="kiosk"),
            event("ib", 20, user="bob", anonymous="kiosk", email="bob@example.com", kind=EventKind.IDENTIFY),
            event("vb", 21, "Product Viewed", {"product_id": "bob-view"}, anonymous="kiosk"),
        )
        ada, bob = await rig.profiles.get("u:ada"), await rig.profiles.get("u:bob")
        assert ada is not None
        assert bob is not None
        assert (list(ada.viewed), ada.traits["email"].value) == (["ada-view"], "ada@example.com")
        assert (list(bob.viewed), bob.traits["email"].value) == (["bob-view"], "bob@example.com")
        # the device's id is whoever used it last; at a time, whoever used it then
        now = await rig.profiles.person("a:kiosk")
        then = await rig.profiles.person("a:kiosk", at(12))
        assert now is not None
        assert then is not None
        assert (now.profile.user_id, then.profile.user_id) == ("bob", "ada")


async def test_an_alias_makes_two_user_ids_one_person() -> None:
    async with IngestRig() as rig:
        await rig.ingest(
            event("i1", 1, user="old-id", email="ada@example.com", kind=EventKind.IDENTIFY),
            event("a1", 2, "Product Added", {"cart_id": "c1", "product_id": "p1"}, user="new-id"),
        )
        apart = await rig.profiles.get("u:new-id")
        assert apart is not None
        assert "email" not in apart.traits
        await rig.ingest(event("al", 3, user="new-id", previous="old-id", kind=EventKind.ALIAS))
        for key in ("u:new-id", "u:old-id"):
            person = await rig.profiles.person(key)
            assert person is not None
            assert person.profile.traits["email"].value == "ada@example.com"
            assert list(person.profile.carts) == ["c1"]


async def test_reading_an_id_never_seen_costs_one_store_call() -> None:
    async with IngestRig() as rig:
        loads = len(rig.profile_store.loads)
        assert await rig.profiles.get("u:stranger") is None
        assert len(rig.profile_store.loads) == loads + 1
