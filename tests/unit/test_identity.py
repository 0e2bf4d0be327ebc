"""One shopper under several ids: who each id belongs to, and the merged
profile, the same whatever order the links and events arrive in."""

from __future__ import annotations

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from sendtime.server.domain.events import Event, EventKind, IncomingEvent, validate
from sendtime.server.domain.identity import Identities, IdLink, Link, UserAlias, identities_from, links_of
from sendtime.server.domain.profile import Profile, merge, view
from tests.unit.test_profile import SESSION, at, folded, track


def link(anonymous_id: str, user_id: str, minute: float, message_id: str = "") -> Link:
    return Link(at(minute), message_id or f"l-{anonymous_id}-{user_id}-{minute}", anonymous_id, user_id)


def test_an_anonymous_visitor_who_identifies_is_that_user_before_and_after() -> None:
    ids = Identities([link("anon-1", "ada", 10)])
    assert ids.owner("anon-1", at(2)) == "ada"  # browsed, then logged in
    assert ids.owner("anon-1", at(30)) == "ada"
    assert ids.owner("anon-2", at(30)) is None
    assert ids.anonymous_ids("ada") == {"anon-1"}


def test_several_devices_are_one_person() -> None:
    ids = Identities([link("phone", "ada", 1), link("laptop", "ada", 5), link("tablet", "ada", 9)])
    assert {ids.owner(device, at(20)) for device in ("phone", "laptop", "tablet")} == {"ada"}
    assert ids.anonymous_ids("ada") == {"phone", "laptop", "tablet"}


def test_a_shared_device_never_makes_two_users_one() -> None:
    # one browser: Ada logs in at 10, Bob at 20, Ada again at 30
    ids = Identities(
        [link("family-pc", "ada", 10), link("family-pc", "bob", 20), link("family-pc", "ada", 30)]
    )
    assert ids.person("ada") == "ada"
    assert ids.person("bob") == "bob"
    assert ids.user_ids("ada") == {"ada"}
    assert [ids.owner("family-pc", at(m)) for m in (5, 15, 25, 35)] == ["ada", "ada", "bob", "ada"]
    # both know the device; each event on it is one person's
    assert ids.anonymous_ids("ada") == ids.anonymous_ids("bob") == {"family-pc"}


def test_an_alias_between_user_ids_makes_one_person_with_every_anonymous_id() -> None:
    ids = Identities([link("anon-old", "ada-old-account", 1), link("anon-new", "ada", 5)])
    assert ids.add_alias(UserAlias(previous_id="ada-old-account", user_id="ada"))
    assert not ids.add_alias(UserAlias(previous_id="ada", user_id="ada-old-account"))
    assert ids.person("ada") == ids.person("ada-old-account") == "ada"
    assert ids.user_ids("ada") == {"ada", "ada-old-account"}
    assert ids.anonymous_ids("ada-old-account") == {"anon-old", "anon-new"}
    assert ids.owner("anon-old", at(50)) == "ada"


LINKS = [
    link("family-pc", "ada", 10),
    link("family-pc", "bob", 20),
    link("phone", "ada", 12),
    link("family-pc", "ada", 30),
    link("bobs-phone", "bob", 3),
]
ALIASES = [UserAlias("ada-old-account", "ada"), UserAlias("robert", "bob")]


@settings(max_examples=100, deadline=None)
@given(st.permutations(LINKS), st.permutations(ALIASES), st.booleans())
def test_any_arrival_order_of_links_gives_the_same_answers(
    links: list[Link], aliases: list[UserAlias], aliases_first: bool
) -> None:
    ids = Identities()
    if aliases_first:
        for alias in aliases:
            ids.add_alias(alias)
    for learned in links:
        ids.add_link(learned)
    if not aliases_first:
        for alias in aliases:
            ids.add_alias(alias)
    reference = Identities(LINKS, ALIASES)
    for anonymous_id in ("family-pc", "phone", "bobs-phone"):
        for minute in (0, 11, 15, 25, 40):
            assert ids.owner(anonymous_id, at(minute)) == reference.owner(anonymous_id, at(minute))
    for user in ("ada", "bob", "robert", "ada-old-account"):
        assert ids.person(user) == reference.person(user)
        assert ids.anonymous_ids(user) == reference.anonymous_ids(user)


def test_learning_a_link_twice_changes_nothing() -> None:
    ids = Identities()
    assert ids.add_link(link("anon-1", "ada", 1, "m1"))
    assert not ids.add_link(link("anon-1", "ada", 1, "m1"))


# -- the merged profile -------------------------------------------------------------


def as_anonymous(event: Event) -> Event:
    return msgspec.structs.replace(
        event, identity=msgspec.structs.replace(event.identity, user_id="", anonymous_id="anon-1")
    )


# The shuffled session of the fold's own test, and an order that names no cart
# (it closes every cart before it) and a cart after it.
EVENTS = [
    *SESSION,
    track("Order Completed", {"order_id": "o2", "total": 5}, 11),
    track("Product Added", {"cart_id": "c3", "product_id": "p5", "quantity": 1}, 12),
]


def merged(first: Profile, second: Profile) -> Profile:
    result = Profile()
    merge(result, first)
    merge(result, second)
    return result


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([SESSION, EVENTS]).flatmap(
        lambda events: st.tuples(
            st.just(events),
            st.lists(st.booleans(), min_size=len(events), max_size=len(events)),
            st.booleans(),
        )
    )
)
def test_the_merged_profile_is_the_profile_of_every_event(case: tuple[list[Event], list[bool], bool]) -> None:
    """However a session's events split between an anonymous id and the user
    id, merging the two profiles (either into the other) gives what folding
    every event into one profile gives."""
    events, anonymous, user_first = case
    under_user = [e for e, a in zip(events, anonymous, strict=True) if not a]
    under_anonymous = [as_anonymous(e) for e, a in zip(events, anonymous, strict=True) if a]
    user, visitor = folded(under_user), folded(under_anonymous)
    result = merged(user, visitor) if user_first else merged(visitor, user)
    expected = view(folded(events))
    shown = view(result)
    # the ids are whichever profile named them first; everything else is the union
    assert msgspec.structs.replace(shown, user_id="", anonymous_id="") == msgspec.structs.replace(
        expected, user_id="", anonymous_id=""
    )


def test_merging_leaves_the_other_profile_as_it_was() -> None:
    visitor = folded([as_anonymous(e) for e in SESSION[:4]])
    before = msgspec.msgpack.encode(visitor)
    merge(folded(SESSION[4:]), visitor)
    assert msgspec.msgpack.encode(visitor) == before


def test_merging_a_profile_into_itself_twice_changes_nothing_but_the_count() -> None:
    # the one part that is not idempotent, by design: events are counted once per
    # profile, and a person's profiles hold disjoint events
    profile = folded(SESSION)
    again = folded(SESSION)
    merge(again, folded(SESSION))
    assert msgspec.structs.replace(view(again), event_count=0) == msgspec.structs.replace(
        view(profile), event_count=0
    )


# -- the links events carry ---------------------------------------------------------


def _event(kind: EventKind, user: str = "", anonymous: str = "", previous: str = "") -> Event:
    return validate(
        IncomingEvent(
            message_id="e1",
            kind=kind,
            user_id=user,
            anonymous_id=anonymous,
            previous_id=previous,
            name="Product Viewed" if kind is EventKind.TRACK else "",
            timestamp=at(3),
        ),
        at(3),
    )


def test_an_identify_or_track_with_both_ids_carries_a_link_and_other_events_none() -> None:
    expected = (IdLink("a:anon-1", "u:ada", at(3), "e1"),)
    assert links_of(_event(EventKind.IDENTIFY, "ada", "anon-1")) == expected
    assert links_of(_event(EventKind.TRACK, "ada", "anon-1")) == expected
    assert links_of(_event(EventKind.TRACK, "ada")) == ()
    assert links_of(_event(EventKind.TRACK, anonymous="anon-1")) == ()
    assert links_of(_event(EventKind.PAGE, "ada", "anon-1")) == ()


def test_an_alias_links_its_previous_id_as_either_kind_of_id() -> None:
    links = links_of(_event(EventKind.ALIAS, "ada", previous="old"))
    assert {(link.from_key, link.to_key) for link in links} == {("a:old", "u:ada"), ("u:old", "u:ada")}
    assert links_of(_event(EventKind.ALIAS, "ada", previous="ada")) == ()
    identities = identities_from(links)
    assert identities.person("old") == identities.person("ada")
    assert identities.owner("old", at(1)) == identities.person("ada")
