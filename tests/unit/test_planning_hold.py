"""Who plans a broadcast: planning_held, the rule replicas share."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec

from sendtime.server.domain.broadcasts import Broadcast, BroadcastState, SendAtKind, planning_held

NOW = datetime(2026, 12, 4, 19, 0, tzinfo=UTC)


def stored(**fields: object) -> Broadcast:
    made = Broadcast(
        id="bc_1",
        idempotency_key="k",
        name="k",
        template_id="t",
        segment="",
        expression="true",
        subscription_group="marketing",
        sender="shop@example.com",
        send_at_kind=SendAtKind.NOW,
        send_at=NOW,
        created_at=NOW,
    )
    return msgspec.structs.replace(made, **fields)


def test_a_scheduled_broadcast_begins_its_planning_held_by_the_replica() -> None:
    held = planning_held(stored(), holder="a", now=NOW, hold_s=30)
    assert held is not None
    assert (held.state, held.planner, held.started_at) == (BroadcastState.PLANNING, "a", NOW)
    assert held.plan_held_until == NOW + timedelta(seconds=30)


def test_paused_or_cancelled_while_planned_the_holder_still_renews_others_cannot_take_it() -> None:
    later = NOW + timedelta(seconds=60)
    for state in (BroadcastState.PAUSED, BroadcastState.CANCELLED):
        broadcast = stored(state=state, planner="a", plan_held_until=NOW)
        renewed = planning_held(broadcast, holder="a", now=later, hold_s=30)
        assert renewed is not None
        assert renewed.state is state
        assert planning_held(broadcast, holder="b", now=later, hold_s=30) is None


def test_once_planned_it_is_held_by_nobody() -> None:
    for state in (BroadcastState.SENDING, BroadcastState.PAUSED, BroadcastState.DONE):
        planned = stored(state=state, planner="a", planned_at=NOW, plan_held_until=NOW)
        for holder in ("a", "b"):
            assert planning_held(planned, holder=holder, now=NOW, hold_s=30) is None


def test_planning_written_without_a_hold_is_taken_over_at_once() -> None:
    """A broadcast left planning by a version without holds, or held for 0 s (one server alone)."""
    for hold in (None, NOW):
        left = stored(state=BroadcastState.PLANNING, started_at=NOW, plan_held_until=hold)
        taken = planning_held(left, holder="b", now=NOW, hold_s=0)
        assert taken is not None
        assert (taken.planner, taken.started_at) == ("b", NOW)
