"""The delivery ledger's last step before relay, on a real SQLite store: the
hand-over writes "relaying" only when no exit event, suppression or frequency
cap stops the send, and says which one did."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sendtime.server.domain.flows import PlannedSend
from sendtime.server.domain.sends import SendRecord, SendStatus
from sendtime.server.store.sqlite import LastChecks, SqliteStore

NOW = datetime.now(UTC)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = await SqliteStore.open(tmp_path / "sendtime.db")
    yield store
    await store.close()


def planned(
    key: str, *, entry_key: str = "cart-1", due_at: datetime = NOW - timedelta(seconds=1)
) -> PlannedSend:
    """An abandoned-cart send for ada, entered five minutes ago."""
    return PlannedSend(
        send_key=key,
        flow_id="abandoned_cart",
        template_id="abandoned_cart",
        profile_key="u:ada",
        user_id="ada",
        anonymous_id="",
        entry_key=entry_key,
        entry_message_id=f"m-{key}",
        entry_time=NOW - timedelta(minutes=5),
        received_at=NOW - timedelta(minutes=5),
        due_at=due_at,
        subscription_group="marketing",
    )


async def claimed(store: SqliteStore, key: str, *, entry_key: str = "cart-1") -> SendRecord:
    await store.schedule_send(planned(key, entry_key=entry_key))
    due = await store.claim_due(NOW, 10)
    (record,) = [r for r in due.records if r.send_key == key]
    return record


def checks(record: SendRecord, *, cap_count: int = 0) -> LastChecks:
    return LastChecks(
        profile_key=record.profile_key,
        flow_id=record.flow_id,
        entry_key=record.entry_key,
        entry_time=record.entry_time,
        group="marketing",
        subjects=(record.profile_key, "email:ada@example.com"),
        cap_since=NOW - timedelta(days=1) if cap_count else None,
        cap_count=cap_count,
    )


async def test_claim_says_when_the_next_send_is_due(store: SqliteStore) -> None:
    await claimed(store, "k1")
    later = NOW + timedelta(hours=1)
    await store.schedule_send(planned("k2", entry_key="cart-2", due_at=later))
    due = await store.claim_due(NOW, 10)
    assert due.records == []
    assert due.next_due is not None
    assert abs((due.next_due - later).total_seconds()) < 1e-3


async def test_hand_over_writes_relaying_when_nothing_stops_the_send(store: SqliteStore) -> None:
    record = await claimed(store, "k1")
    handover = await store.hand_over(record.id, relay="smtp", template_version="v1", checks=checks(record))
    assert handover.handed_over
    sent = await store.get_send(send_id=record.id)
    assert sent is not None
    assert (sent.status, sent.relay, sent.template_version) == (SendStatus.RELAYING, "smtp", "v1")
    # a second hand-over of the same send finds it no longer "sending"
    again = await store.hand_over(record.id, relay="smtp", template_version="v1", checks=checks(record))
    assert not again.handed_over
    assert (again.exit_event, again.suppressed, again.capped) == (None, False, False)


async def test_hand_over_is_stopped_by_a_suppressed_address(store: SqliteStore) -> None:
    record = await claimed(store, "k1")
    await store.suppress("email:ada@example.com", "*", "complaint", "webhook")
    handover = await store.hand_over(record.id, relay="smtp", template_version="v1", checks=checks(record))
    assert (handover.handed_over, handover.suppressed) == (False, True)
    still = await store.get_send(send_id=record.id)
    assert still is not None
    assert still.status is SendStatus.SENDING  # the dispatcher writes the outcome


async def test_hand_over_is_stopped_by_the_frequency_cap(store: SqliteStore) -> None:
    first = await claimed(store, "k1")
    assert (
        await store.hand_over(first.id, relay="smtp", template_version="v1", checks=checks(first))
    ).handed_over
    await store.update_send(first.id, SendStatus.SENT, expect=SendStatus.RELAYING, accepted_at=NOW)
    second = await claimed(store, "k2", entry_key="cart-2")
    handover = await store.hand_over(
        second.id, relay="smtp", template_version="v1", checks=checks(second, cap_count=1)
    )
    assert (handover.handed_over, handover.capped, handover.sent) == (False, True, 1)
    roomier = await store.hand_over(
        second.id, relay="smtp", template_version="v1", checks=checks(second, cap_count=2)
    )
    assert roomier.handed_over


async def test_frequency_cap_counts_a_send_still_at_the_esp(store: SqliteStore) -> None:
    # Two sends for one user claimed together: the first is "relaying" (the ESP
    # has it, no answer yet) when the second is handed over under a cap of one.
    first = await claimed(store, "k1")
    second = await claimed(store, "k2", entry_key="cart-2")
    assert (
        await store.hand_over(
            first.id, relay="smtp", template_version="v1", checks=checks(first, cap_count=1)
        )
    ).handed_over
    handover = await store.hand_over(
        second.id, relay="smtp", template_version="v1", checks=checks(second, cap_count=1)
    )
    assert (handover.handed_over, handover.capped, handover.sent) == (False, True, 1)
