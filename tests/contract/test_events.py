"""EventStore: durable appends, de-duplication by message id, the round's flow
plan in the events' transaction, commit order, and one bad event failing alone."""

from __future__ import annotations

import asyncio
from collections.abc import Container, Sequence
from datetime import timedelta

from sendtime.server.domain.events import Event
from sendtime.server.domain.flows import FlowPlanner, PlannedExit, PlannedSend
from sendtime.server.domain.ports import Appended
from sendtime.server.domain.sends import SendStatus
from tests.contract.conftest import ABANDONED_CART, NOW, Backend, far_future_add, ids, track

CART = b'{"cart_id": "c1", "product_id": "p1"}'


async def test_a_message_id_is_stored_once(backend: Backend) -> None:
    events = backend.events()
    first = await events.append([track("m1", "Product Viewed"), track("m2", "Product Viewed")])
    assert first.is_new == [True, True]
    again = await events.append([track("m2", "Product Viewed"), track("m3", "Product Viewed")])
    assert again.is_new == [False, True]
    assert again.position > first.position
    # a repeat within one append: the first is the one stored
    within = await events.append([track("m4", "Product Viewed"), track("m4", "Product Viewed")])
    assert within.is_new == [True, False]
    replayed, _ = await backend.storage.profiles.replay(0)
    assert ids(replayed) == ["m1", "m2", "m3", "m4"]
    # nothing new: a position the listener was already told of (an ack waits for it)
    only_repeats = await events.append([track("m1", "Product Viewed")])
    assert only_repeats.is_new == [False]
    assert only_repeats.position <= backend.listener.rounds[-1].position


async def test_concurrent_appends_of_one_id_store_it_once(backend: Backend) -> None:
    events = backend.events()
    results = await asyncio.gather(*(events.append([track("same", "Product Viewed")]) for _ in range(20)))
    assert sorted(r.is_new[0] for r in results) == [False] * 19 + [True]


async def test_the_listener_hears_of_a_commit_before_the_append_returns(backend: Backend) -> None:
    events = backend.events()
    appended = await events.append([track("m1", "Product Added", CART), track("m2", "Product Viewed")])
    (round_,) = backend.listener.rounds
    assert ids(round_.new_events) == ["m1", "m2"]
    assert round_.position == appended.position
    assert round_.earliest_due is not None
    entered = NOW - timedelta(minutes=1)
    assert abs((round_.earliest_due - (entered + ABANDONED_CART.delay)).total_seconds()) < 1
    # nothing new, nothing scheduled: nothing to tell
    await events.append([track("m1", "Product Added", CART)])
    assert len(backend.listener.rounds) == 1


async def test_a_planned_send_is_stored_with_its_entry_event(backend: Backend) -> None:
    events = backend.events()
    await events.append([track("m1", "Product Added", CART)])
    (send,) = await backend.storage.ledger.list_sends(profile_key="u:ada")
    assert (send.flow_id, send.entry_key, send.entry_message_id) == ("abandoned_cart", "c1", "m1")
    assert send.status is SendStatus.SCHEDULED
    # the same cart again: one send per key
    await events.append([track("m2", "Product Added", CART)])
    assert len(await backend.storage.ledger.list_sends(profile_key="u:ada")) == 1
    assert backend.storage.stats().scheduled == {"abandoned_cart": 1}


async def test_an_exit_event_cancels_and_is_kept_for_the_last_check(backend: Backend) -> None:
    events = backend.events()
    await events.append([track("m1", "Product Added", CART)])
    await events.append([track("m2", "Order Completed", b'{"order_id": "o1", "products": []}')])
    (send,) = await backend.storage.ledger.list_sends(profile_key="u:ada")
    assert (send.status, send.reason) == (SendStatus.CANCELLED, "exit: Order Completed")
    assert backend.storage.stats().cancelled == {"abandoned_cart": 1}
    name = await backend.storage.exits.exit_since("u:ada", "abandoned_cart", "c1", send.entry_time)
    assert name == "Order Completed"
    assert await backend.storage.exits.exit_since("u:bob", "abandoned_cart", "c1", send.entry_time) is None


async def test_a_far_future_event_past_validation_is_held_not_failed(backend: Backend) -> None:
    # Issue 16: a far-future "Product Added" overflowed its send's due time in
    # the writer's transaction and failed every other event of the round. The
    # edge refuses such times now, and the planner holds a due time at the end
    # of the calendar instead of overflowing: nothing fails.
    events = backend.events()
    appended = await events.append(
        [track("good-1", "Product Added", CART), far_future_add("bad"), track("good-2", "Product Viewed")]
    )
    assert appended.is_new == [True, True, True]
    assert not appended.failed
    sends = {s.entry_message_id: s for s in await backend.storage.ledger.list_sends()}
    assert sorted(sends) == ["bad", "good-1"]
    assert sends["bad"].due_at.year == 9999


async def test_other_appends_of_a_round_are_not_failed_by_a_bad_one(backend: Backend) -> None:
    events = backend.events(_Raising())
    appends = [events.append([track(f"u{n}", "Product Added", CART, user=f"user{n}")]) for n in range(30)]
    appends.insert(15, events.append([track("bad", "Product Added", CART, user="cursed")]))
    results = await asyncio.gather(*appends, return_exceptions=True)
    refused = [n for n, r in enumerate(results) if not isinstance(r, Appended) or r.failed]
    assert refused == [15]
    assert sum(r.is_new[0] for r in results if isinstance(r, Appended)) == 30
    assert len(await backend.storage.ledger.list_sends(limit=100)) == 30


class _Raising:
    """A planner that cannot plan one user's events (any bug of the plan)."""

    def __init__(self) -> None:
        self._planner = FlowPlanner([ABANDONED_CART])

    def plan(
        self, events: Sequence[Event], scheduled: Container[str]
    ) -> tuple[list[PlannedSend], list[PlannedExit]]:
        if any(event.identity.user_id == "cursed" for event in events):
            raise ValueError("cannot plan for cursed")
        return self._planner.plan(events, scheduled)


async def test_a_planner_failing_for_one_event_fails_that_event_alone(backend: Backend) -> None:
    events = backend.events(_Raising())
    appended = await events.append(
        [track("a", "Product Added", CART), track("b", "Product Viewed", user="cursed"), track("c", "x")]
    )
    assert (appended.is_new, list(appended.failed)) == ([True, False, True], [1])
    assert "cannot plan for cursed" in appended.failed[1]


async def test_stored_track_events_are_replayed_for_learning(backend: Backend) -> None:
    events = backend.events()
    await events.append(
        [track("m1", "Product Viewed"), track("m2", "Page"), track("m3", "Product Added", CART)]
    )
    seen: list[tuple[str, str]] = []
    count = await events.replay_track_events(
        ["Product Viewed", "Product Added"], lambda k, n, _b: seen.append((k, n))
    )
    assert count == 2
    assert seen == [("u:ada", "Product Viewed"), ("u:ada", "Product Added")]
