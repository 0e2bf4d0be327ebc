"""BroadcastStore and ProfileStore.scan_profiles: segments, broadcasts (one
per idempotency key), and a broadcast's rows of the ledger: added once per
user, parked, rescheduled, settled and counted."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import msgspec

from sendtime.server.domain.broadcasts import (
    PARKED,
    Broadcast,
    BroadcastState,
    PlannedRecipient,
    SendAtKind,
    broadcast_id,
    plan_sends,
    planning_held,
)
from sendtime.server.domain.profile import Profile
from sendtime.server.domain.segments import Segment
from sendtime.server.domain.sends import SendStatus
from tests.contract.conftest import Backend, track

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def broadcast(key: str = "winter-sale", **fields: object) -> Broadcast:
    values: dict[str, object] = {
        "id": broadcast_id(key),
        "idempotency_key": key,
        "name": "Winter sale",
        "template_id": "browse_abandonment",
        "segment": "de",
        "expression": 'traits.country == "DE"',
        "subscription_group": "marketing",
        "sender": "shop@example.com",
        "send_at_kind": SendAtKind.NOW,
        "send_at": NOW,
        "created_at": NOW,
        **fields,
    }
    return Broadcast(**values)  # type: ignore[arg-type]


async def store_profiles(backend: Backend, users: list[str]) -> None:
    profiles = backend.storage.profiles
    if profiles.writes_profiles_with_events:
        await backend.events().append([track(f"m-{u}", "Product Viewed", user=u) for u in users])
    else:
        encode = msgspec.msgpack.Encoder().encode
        await profiles.save_profiles([(f"u:{u}", encode(Profile(user_id=u))) for u in users], 1)


async def test_scan_profiles_walks_every_profile_once_in_key_order(backend: Backend) -> None:
    users = [f"user{i:03d}" for i in range(25)]
    await store_profiles(backend, users)
    seen: list[str] = []
    after = ""
    while page := await backend.storage.profiles.scan_profiles(after, 10):
        assert len(page) <= 10
        seen.extend(key for key, _ in page)
        after = page[-1][0]
        decoded = msgspec.msgpack.decode(page[0][1], type=Profile)
        assert decoded.user_id == page[0][0].removeprefix("u:")
    assert seen == sorted(f"u:{u}" for u in users)


async def test_segments_are_saved_replaced_and_listed(backend: Backend) -> None:
    store = backend.storage.broadcasts
    assert await store.get_segment("de") is None
    await store.save_segment(Segment(name="de", expression='traits.country == "DE"'))
    await store.save_segment(Segment(name="buyers", expression="order_count > 0"))
    await store.save_segment(Segment(name="de", expression='traits.country == "DE" && order_count == 0'))
    assert [s.name for s in await store.list_segments()] == ["buyers", "de"]
    stored = await store.get_segment("de")
    assert stored is not None
    assert stored.expression.endswith("order_count == 0")


async def test_one_broadcast_per_idempotency_key(backend: Backend) -> None:
    store = backend.storage.broadcasts
    first, made = await store.create_broadcast(broadcast())
    assert made
    assert first.id == broadcast_id("winter-sale")
    again, made_again = await store.create_broadcast(broadcast(name="another name"))
    assert not made_again
    assert again.name == "Winter sale"
    await store.create_broadcast(broadcast("spring-sale", created_at=NOW + timedelta(days=1)))
    assert [b.idempotency_key for b in await store.list_broadcasts()] == ["spring-sale", "winter-sale"]


async def test_a_broadcast_changes_state_only_from_the_state_expected(backend: Backend) -> None:
    store = backend.storage.broadcasts
    stored, _ = await store.create_broadcast(broadcast())
    planning = msgspec.structs.replace(stored, state=BroadcastState.PLANNING, started_at=NOW)
    assert await store.update_broadcast(planning, expect=[BroadcastState.SCHEDULED])
    # a second start finds it planning already
    assert not await store.update_broadcast(planning, expect=[BroadcastState.SCHEDULED])
    loaded = await store.get_broadcast(stored.id)
    assert loaded is not None
    assert loaded.state is BroadcastState.PLANNING
    assert loaded.started_at == NOW
    done = msgspec.structs.replace(loaded, state=BroadcastState.DONE)
    assert await store.update_broadcast(done, expect=[BroadcastState.PLANNING])
    assert await store.list_broadcasts(active_only=True) == []


async def test_a_broadcasts_sends_are_added_once_parked_rescheduled_and_settled(backend: Backend) -> None:
    store = backend.storage.broadcasts
    b = broadcast(rate_per_s=10.0)
    recipients = [PlannedRecipient(f"u:user{i}", f"user{i}", "", NOW) for i in range(6)]
    sends = plan_sends(b, recipients, NOW)
    assert await store.add_recipients(sends[:4]) == 4
    # planned again after a crash: the first four are left as they were
    assert await store.add_recipients(sends) == 2
    assert await store.send_counts(b.flow_id) == {("scheduled", ""): 6}

    assert await store.park_sends(b.flow_id, PARKED) == 6
    parked = await store.parked_sends(b.flow_id, PARKED)
    assert sorted(moment for _, moment in parked) == [NOW] * 6
    assert len({send_id for send_id, _ in parked}) == 6
    assert not (await backend.storage.ledger.claim_due(NOW + timedelta(days=365), 10)).records

    resumed = NOW + timedelta(hours=1)
    assert await store.reschedule_sends([(send_id, resumed) for send_id, _ in parked[:3]]) == 3
    claimed = await backend.storage.ledger.claim_due(resumed, 10)
    assert sorted(r.id for r in claimed.records) == sorted(send_id for send_id, _ in parked[:3])
    assert await store.settle_remaining(b.flow_id, SendStatus.CANCELLED, "broadcast cancelled") == 3
    assert await store.send_counts(b.flow_id) == {("sending", ""): 3, ("cancelled", "broadcast cancelled"): 3}


async def test_changes_to_one_broadcast_at_once_are_each_applied(backend: Backend) -> None:
    """change_broadcast reads and writes as one step: 30 at once, none lost."""
    store = backend.storage.broadcasts
    made, _ = await store.create_broadcast(broadcast())

    def one_more(stored: Broadcast) -> Broadcast:
        return msgspec.structs.replace(stored, audience=stored.audience + 1)

    await asyncio.gather(*(store.change_broadcast(made.id, one_more) for _ in range(30)))
    stored = await store.get_broadcast(made.id)
    assert stored is not None
    assert stored.audience == 30
    assert await store.change_broadcast(made.id, lambda _: None) is None
    assert await store.change_broadcast("bc_none", one_more) is None


async def test_one_replica_holds_a_broadcasts_planning_until_its_hold_runs_out(backend: Backend) -> None:
    store = backend.storage.broadcasts
    made, _ = await store.create_broadcast(broadcast())

    async def hold_at(holder: str, now: datetime) -> Broadcast | None:
        return await store.change_broadcast(
            made.id, lambda stored: planning_held(stored, holder=holder, now=now, hold_s=30)
        )

    # two replicas at once: one gets it
    first, second = await asyncio.gather(hold_at("a", NOW), hold_at("b", NOW))
    assert (first is None) != (second is None)
    holder = "a" if first is not None else "b"
    other = "b" if holder == "a" else "a"
    assert await hold_at(other, NOW + timedelta(seconds=29)) is None
    renewed = await hold_at(holder, NOW + timedelta(seconds=20))  # renewed: 50 s now
    assert renewed is not None
    assert renewed.state is BroadcastState.PLANNING
    assert await hold_at(other, NOW + timedelta(seconds=45)) is None
    taken = await hold_at(other, NOW + timedelta(seconds=50))  # its holder stopped renewing
    assert taken is not None
    assert taken.planner == other
    assert taken.started_at == NOW
    assert await hold_at(holder, NOW + timedelta(seconds=51)) is None  # the old holder lost it
