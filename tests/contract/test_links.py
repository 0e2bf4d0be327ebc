"""IdentityLinks: the links events carry are written with them, and read back
with the profiles they reach, transitively, in one call."""

from __future__ import annotations

import asyncio
from collections.abc import Container, Sequence
from datetime import datetime, timedelta

import msgspec

from sendtime.server.domain.events import Event, EventKind, IncomingEvent, TraitsUpdate, validate
from sendtime.server.domain.flows import FlowPlanner, PlannedExit, PlannedSend
from sendtime.server.domain.identity import IdLink, identities_from
from sendtime.server.domain.ports import Appended
from sendtime.server.domain.profile import Profile
from tests.contract.conftest import ABANDONED_CART, NOW, Backend


def event(
    message_id: str,
    kind: EventKind,
    *,
    user: str = "",
    anonymous: str = "",
    previous: str = "",
    at: datetime | None = None,
    name: str = "",
) -> Event:
    return validate(
        IncomingEvent(
            message_id=message_id,
            kind=kind,
            user_id=user,
            anonymous_id=anonymous,
            previous_id=previous,
            name=name or ("Product Viewed" if kind is EventKind.TRACK else ""),
            timestamp=at or NOW - timedelta(minutes=10),
            traits=TraitsUpdate(email=f"{user}@example.com") if kind is EventKind.IDENTIFY else None,
        ),
        NOW,
    )


async def stored_profiles(backend: Backend, keys: Sequence[str]) -> None:
    """Make sure each key has a stored profile (the profile book saves them
    on a backend that does not write them with the events)."""
    profiles = backend.storage.profiles
    if not profiles.writes_profiles_with_events:
        encode = msgspec.msgpack.Encoder().encode
        await profiles.save_profiles([(key, encode(Profile(event_count=1))) for key in keys], 1)


def pairs(links: Sequence[IdLink]) -> set[tuple[str, str]]:
    return {(link.from_key, link.to_key) for link in links}


async def test_an_identify_with_both_ids_links_them_in_its_commit(backend: Backend) -> None:
    events = backend.events()
    at = NOW - timedelta(minutes=5)
    await events.append(
        [
            event("v1", EventKind.TRACK, anonymous="anon-1"),
            event("i1", EventKind.IDENTIFY, user="ada", anonymous="anon-1", at=at),
        ]
    )
    await stored_profiles(backend, ["a:anon-1", "u:ada"])
    # reading either id reaches the other, with both profiles, in one call
    for key in ("a:anon-1", "u:ada"):
        people = await backend.storage.links.load_people([key])
        assert people.links == [IdLink("a:anon-1", "u:ada", at, "i1")]
        assert set(people.profiles) == {"a:anon-1", "u:ada"}


async def test_a_track_with_both_ids_links_them_and_an_anonymous_one_does_not(backend: Backend) -> None:
    await backend.events().append(
        [
            event("t1", EventKind.TRACK, user="ada", anonymous="anon-1"),
            event("t2", EventKind.TRACK, anonymous="anon-2"),
            event("t3", EventKind.TRACK, user="bob"),
            event("p1", EventKind.PAGE, user="cy", anonymous="anon-3"),
        ]
    )
    people = await backend.storage.links.load_people(["u:ada", "a:anon-2", "u:bob", "u:cy"])
    assert pairs(people.links) == {("a:anon-1", "u:ada")}


async def test_links_are_followed_transitively_across_devices_and_aliases(backend: Backend) -> None:
    events = backend.events()
    await events.append(
        [event(f"v-{d}", EventKind.TRACK, anonymous=d) for d in ("laptop", "phone", "tablet")]
    )
    await events.append([event("i1", EventKind.IDENTIFY, user="ada", anonymous="laptop")])
    await events.append([event("i2", EventKind.IDENTIFY, user="ada", anonymous="phone")])
    # the shop renamed the user: alias from the old user id to the new one
    await events.append([event("al", EventKind.ALIAS, user="ada-2", previous="ada")])
    await events.append([event("i3", EventKind.IDENTIFY, user="ada-2", anonymous="tablet")])
    await stored_profiles(backend, ["a:laptop", "a:phone", "a:tablet", "u:ada", "u:ada-2"])
    people = await backend.storage.links.load_people(["a:phone"])
    assert pairs(people.links) == {
        ("a:laptop", "u:ada"),
        ("a:phone", "u:ada"),
        # an alias does not say which kind of id previousId is: it links both
        ("a:ada", "u:ada-2"),
        ("u:ada", "u:ada-2"),
        ("a:tablet", "u:ada-2"),
    }
    assert set(people.profiles) == {"a:laptop", "a:phone", "a:tablet", "u:ada", "u:ada-2"}
    identities = identities_from(people.links)
    assert identities.person("ada") == identities.person("ada-2")
    assert identities.anonymous_ids("ada-2") == {"laptop", "phone", "tablet", "ada"}


async def test_a_shared_device_links_two_users_who_stay_two_people(backend: Backend) -> None:
    morning, evening = NOW - timedelta(hours=10), NOW - timedelta(hours=2)
    await backend.events().append(
        [
            event("i-ada", EventKind.IDENTIFY, user="ada", anonymous="kiosk", at=morning),
            event("i-bob", EventKind.IDENTIFY, user="bob", anonymous="kiosk", at=evening),
        ]
    )
    people = await backend.storage.links.load_people(["u:ada"])
    # the device's links reach bob, and the pure rules keep him apart
    assert pairs(people.links) == {("a:kiosk", "u:ada"), ("a:kiosk", "u:bob")}
    identities = identities_from(people.links)
    assert identities.person("ada") != identities.person("bob")
    assert identities.owner("kiosk", morning + timedelta(hours=1)) == "ada"
    assert identities.owner("kiosk", evening + timedelta(minutes=1)) == "bob"


async def test_a_duplicate_writes_no_second_link_and_an_unlinked_id_has_none(backend: Backend) -> None:
    events = backend.events()
    first = event("i1", EventKind.IDENTIFY, user="ada", anonymous="anon-1")
    await events.append([first])
    again = await events.append([first, event("i1", EventKind.IDENTIFY, user="eve", anonymous="anon-1")])
    assert again.is_new == [False, False]
    people = await backend.storage.links.load_people(["a:anon-1"])
    assert pairs(people.links) == {("a:anon-1", "u:ada")}
    nobody = await backend.storage.links.load_people(["u:nobody"])
    assert (nobody.links, nobody.profiles) == ([], {})


async def test_an_event_refused_alone_leaves_no_link(backend: Backend) -> None:
    events = backend.events(_Raising())
    appended = await events.append(
        [
            event("ok", EventKind.IDENTIFY, user="ada", anonymous="anon-1"),
            event("bad", EventKind.TRACK, user="cursed", anonymous="anon-2"),
        ]
    )
    assert (appended.is_new, list(appended.failed)) == ([True, False], [1])
    people = await backend.storage.links.load_people(["u:ada", "u:cursed"])
    assert pairs(people.links) == {("a:anon-1", "u:ada")}


async def test_links_of_concurrent_appends_are_all_kept(backend: Backend) -> None:
    events = backend.events()
    results = await asyncio.gather(
        *(
            events.append([event(f"i{n}", EventKind.IDENTIFY, user="ada", anonymous=f"device-{n}")])
            for n in range(20)
        )
    )
    assert all(isinstance(r, Appended) and r.is_new == [True] for r in results)
    people = await backend.storage.links.load_people(["a:device-7"])
    assert pairs(people.links) == {(f"a:device-{n}", "u:ada") for n in range(20)}


class _Raising:
    """A planner that cannot plan one user's events (any bug of the plan)."""

    def __init__(self) -> None:
        self._planner = FlowPlanner([ABANDONED_CART])

    def plan(
        self, events: Sequence[Event], scheduled: Container[str]
    ) -> tuple[list[PlannedSend], list[PlannedExit]]:
        if any(e.identity.user_id == "cursed" for e in events):
            raise ValueError("cannot plan for cursed")
        return self._planner.plan(events, scheduled)
