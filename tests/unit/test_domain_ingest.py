"""Ingestor with AfterCommit and ProfileBook over in-memory ports (tests/fakes):
acks per event in input order, one store per message id, read-your-writes,
flows planned in the append, refusals whole. No sockets, no sleeps."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import pytest

from sendtime.server.domain.errors import InvalidInput, Overloaded
from sendtime.server.domain.events import Event
from sendtime.server.domain.ingest import Ack, Outcome, Undecodable
from sendtime.server.domain.sends import SendStatus
from tests.fakes import IngestRig, abandoned_cart_flow, identify, track

ADDED = {"product_id": "p1", "cart_id": "c1", "name": "Socks", "price": 9.5, "quantity": 2}


def outcomes(acks: Sequence[Ack]) -> list[tuple[str, Outcome]]:
    return [(ack.message_id, ack.outcome) for ack in acks]


async def test_one_ack_per_event_in_input_order_and_a_bad_one_sinks_nothing() -> None:
    async with IngestRig() as rig:
        acks = await rig.ingest(
            identify("m1"),
            track("m2", "Product Added", {"cart_id": "c1"}),  # no product: invalid
            track("m3", "Product Added", ADDED),
        )
        undecodable = Undecodable("m4", InvalidInput.field("event", "not JSON"))
        (rejected,) = await rig.ingestor.ingest([undecodable])
    assert outcomes(acks) == [("m1", Outcome.ACCEPTED), ("m2", Outcome.REJECTED), ("m3", Outcome.ACCEPTED)]
    assert [ack.index for ack in acks] == [0, 1, 2]
    assert acks[1].error is not None
    assert [v.field for v in acks[1].error.violations] == ["properties.product_id"]
    assert (rejected.outcome, rejected.error) == (Outcome.REJECTED, undecodable.error)
    assert [event.message_id for _, event in rig.events.log] == ["m1", "m3"]


async def test_a_message_id_is_stored_once_within_a_batch_and_across_batches() -> None:
    async with IngestRig() as rig:
        first = await rig.ingest(track("m1", "Product Added", ADDED), track("m1", "Product Added", ADDED))
        again = await rig.ingest(track("m1", "Product Added", ADDED))
        profile = rig.profiles.in_memory("u:ada")
    assert outcomes(first) == [("m1", Outcome.ACCEPTED), ("m1", Outcome.DUPLICATE)]
    assert outcomes(again) == [("m1", Outcome.DUPLICATE)]
    assert len(rig.events.log) == 1
    assert profile is not None
    assert profile.event_count == 1
    assert rig.learned == ["m1"]


async def test_whoever_reads_after_the_ack_sees_the_event() -> None:
    async with IngestRig() as rig:
        await rig.ingest(identify("m1", first_name="Ada"))
        profile = rig.profiles.in_memory("u:ada")
        assert profile is not None  # folded before the ack, with no wait
        assert profile.traits["email"].value == "ada@example.com"
        assert rig.invalidated == ["u:ada"]  # its cached content is dropped too
    # and saved, with the position it includes, when the book closes
    saved = rig.profile_store.saved("u:ada")
    assert saved is not None
    assert saved.traits["first_name"].value == "Ada"
    assert rig.profile_store.position == rig.events.position == 1


async def test_the_clock_gives_the_arrival_time_and_the_window_around_it() -> None:
    async with IngestRig() as rig:
        now = rig.clock.now()
        acks = await rig.ingest(
            track("past", "Product Viewed", {"product_id": "p1"}, timestamp=now - timedelta(hours=1)),
            track("ahead", "Product Viewed", {"product_id": "p1"}, timestamp=now + timedelta(minutes=5)),
            track("far", "Product Viewed", {"product_id": "p1"}, timestamp=now + timedelta(days=2)),
        )
        rig.clock.advance(60)
        later = await rig.ingest(track("later", "Product Viewed", {"product_id": "p2"}))
    assert outcomes(acks)[:2] == [("past", Outcome.ACCEPTED), ("ahead", Outcome.ACCEPTED)]
    assert acks[2].outcome is Outcome.REJECTED
    stored: dict[str, Event] = {event.message_id: event for _, event in rig.events.log}
    assert stored["past"].timestamp == now - timedelta(hours=1)
    assert stored["ahead"].timestamp == now  # not after its arrival
    assert stored["past"].received_at == now
    assert later[0].outcome is Outcome.ACCEPTED
    assert stored["past"].received_at + timedelta(seconds=60) == rig.events.log[-1][1].received_at


async def test_a_store_that_refuses_refuses_the_whole_batch_and_says_so() -> None:
    refused: list[tuple[int, str]] = []

    class Observer:
        def acked(self, acks: Sequence[Ack], stored: Sequence[Event], acked_at: datetime) -> None:
            raise AssertionError("nothing was acked")

        def refused(self, count: int, reason: str) -> None:
            refused.append((count, reason))

    async with IngestRig(observer=Observer()) as rig:
        rig.events.refuse = Overloaded("20000 events are waiting to be stored; retry shortly")
        with pytest.raises(Overloaded):
            await rig.ingest(identify("m1"), track("m2", "Product Added", {"cart_id": "c1"}))
    # the invalid one never reached the store; the valid one was refused whole
    assert refused == [(1, "RESOURCE_EXHAUSTED")]
    assert rig.events.log == []


async def test_an_event_whose_own_write_fails_is_rejected_alone() -> None:
    async with IngestRig() as rig:
        rig.events.unstorable["m2"] = "a value the database cannot hold"
        acks = await rig.ingest(identify("m1"), track("m2", "Product Added", ADDED), identify("m3"))
    assert outcomes(acks) == [("m1", Outcome.ACCEPTED), ("m2", Outcome.REJECTED), ("m3", Outcome.ACCEPTED)]
    error = acks[1].error
    assert error is not None
    assert error.reason == "NOT_STORABLE"
    assert "a value the database cannot hold" in error.message


async def test_an_entry_event_schedules_its_send_and_wakes_the_dispatcher_in_the_append() -> None:
    async with IngestRig([abandoned_cart_flow()]) as rig:
        now = rig.clock.now()
        await rig.ingest(track("add", "Product Added", ADDED))
        (send,) = rig.ledger.sends.values()
        assert (send.status, send.flow_id, send.entry_key, send.due_at) == (
            SendStatus.SCHEDULED,
            "abandoned_cart",
            "c1",
            now + timedelta(minutes=30),
        )
        assert rig.woken == [send.due_at]
        # another add to the same cart is the same send
        await rig.ingest(track("add-2", "Product Added", {**ADDED, "product_id": "p2"}))
        assert len(rig.ledger.sends) == 1
        # an order ends it, in the append that stores the order
        rig.clock.advance(60)
        await rig.ingest(track("order", "Order Completed", {"order_id": "o1", "cart_id": "c1", "total": 19}))
    assert rig.ledger.sends[send.id].status is SendStatus.CANCELLED
    assert rig.ledger.sends[send.id].reason == "exit: Order Completed"
    assert rig.woken == [send.due_at]  # nothing new was scheduled by the others


async def test_a_fold_that_fails_still_answers_and_stops_the_saves() -> None:
    async with IngestRig(max_cached=1) as rig:
        await rig.ingest(identify("m1"))
        rig.profile_store.fail_loads = OSError("disk gone")
        # another user's profile cannot be loaded: the event is durable, the ack still comes
        acks = await rig.ingest(identify("m2", user="grace"))
        assert outcomes(acks) == [("m2", Outcome.ACCEPTED)]
        rig.profile_store.fail_loads = None
    # nothing was saved: a saved position would claim the unfolded event
    assert rig.profile_store.saves == []
    assert rig.profile_store.position == 0
