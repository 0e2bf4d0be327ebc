"""DeliveryLedger and SuppressionList: scheduling once per key, claiming due
sends, and the last step before relay: the hand-over writes "relaying" only
when no exit event, suppression or frequency cap stops the send, and says
which one did."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import msgspec

from sendtime.server.domain.flows import PlannedSend
from sendtime.server.domain.ports import DeliveryLedger, LastChecks
from sendtime.server.domain.sends import SendRecord, SendStatus
from tests.contract.conftest import NOW, Backend, track


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


async def claimed(store: DeliveryLedger, key: str, *, entry_key: str = "cart-1") -> SendRecord:
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
        attempt=record.attempts,
    )


async def test_claim_says_when_the_next_send_is_due(backend: Backend) -> None:
    store = backend.storage.ledger
    await claimed(store, "k1")
    later = NOW + timedelta(hours=1)
    await store.schedule_send(planned("k2", entry_key="cart-2", due_at=later))
    due = await store.claim_due(NOW, 10)
    assert due.records == []
    assert due.next_due is not None
    assert abs((due.next_due - later).total_seconds()) < 1e-3


async def test_hand_over_writes_relaying_when_nothing_stops_the_send(backend: Backend) -> None:
    store = backend.storage.ledger
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


async def test_hand_over_is_stopped_by_a_suppressed_address(backend: Backend) -> None:
    store = backend.storage.ledger
    record = await claimed(store, "k1")
    await backend.storage.suppressions.suppress("email:ada@example.com", "*", "complaint", "webhook")
    handover = await store.hand_over(record.id, relay="smtp", template_version="v1", checks=checks(record))
    assert (handover.handed_over, handover.suppressed) == (False, True)
    still = await store.get_send(send_id=record.id)
    assert still is not None
    assert still.status is SendStatus.SENDING  # the dispatcher writes the outcome


async def test_hand_over_is_stopped_by_the_frequency_cap(backend: Backend) -> None:
    store = backend.storage.ledger
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


async def test_frequency_cap_counts_a_send_still_at_the_esp(backend: Backend) -> None:
    store = backend.storage.ledger
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


async def test_a_send_is_scheduled_once_per_key(backend: Backend) -> None:
    ledger = backend.storage.ledger
    first = await ledger.schedule_send(planned("k1"))
    again = await ledger.schedule_send(planned("k1", entry_key="other"))
    assert again.id == first.id
    assert again.entry_key == "cart-1"
    assert await ledger.get_send(send_key="k1") == first
    assert await ledger.get_send(send_id=first.id + 1000) is None
    assert backend.storage.stats().scheduled == {"abandoned_cart": 1}


async def test_a_claimed_send_is_not_claimed_again(backend: Backend) -> None:
    ledger = backend.storage.ledger
    for n in range(5):
        await ledger.schedule_send(planned(f"k{n}", entry_key=f"cart-{n}"))
    first = await ledger.claim_due(NOW, 3)
    second = await ledger.claim_due(NOW, 10)
    assert len(first.records) == 3
    assert len(second.records) == 2
    assert {r.send_key for r in first.records}.isdisjoint(r.send_key for r in second.records)
    assert all(r.status is SendStatus.SENDING and r.attempts == 1 for r in first.records + second.records)
    assert second.next_due is None


async def test_update_send_moves_only_from_the_expected_status(backend: Backend) -> None:
    ledger = backend.storage.ledger
    record = await claimed(ledger, "k1")
    assert not await ledger.update_send(record.id, SendStatus.SENT, expect=SendStatus.RELAYING)
    assert await ledger.update_send(
        record.id, SendStatus.SKIPPED, expect=SendStatus.SENDING, reason="no cart", attempt=(1, "skipped", "")
    )
    stored = await ledger.get_send(send_id=record.id)
    assert stored is not None
    assert (stored.status, stored.reason) == (SendStatus.SKIPPED, "no cart")


async def test_recovery_after_a_crash_never_resends_what_the_esp_may_have(backend: Backend) -> None:
    ledger = backend.storage.ledger
    sending = await claimed(ledger, "k1")
    relaying = await claimed(ledger, "k2", entry_key="cart-2")
    await ledger.hand_over(relaying.id, relay="smtp", template_version="v1", checks=checks(relaying))
    # (long after: a shared ledger recovers only the claims whose lease ran out)
    assert await ledger.recover_interrupted(relay_idempotent=False, now=NOW + timedelta(days=1)) == (1, 1)
    again = await ledger.get_send(send_id=sending.id)
    unsure = await ledger.get_send(send_id=relaying.id)
    assert again is not None
    assert unsure is not None
    assert (again.status, unsure.status) == (SendStatus.SCHEDULED, SendStatus.UNCERTAIN)


async def test_a_fresh_claim_is_not_recovered_by_a_shared_ledger(backend: Backend) -> None:
    ledger = backend.storage.ledger
    if backend.name == "sqlite":
        return  # one process: every claim at start is a dead process's
    record = await claimed(ledger, "k1")
    assert await ledger.recover_interrupted(relay_idempotent=False) == (0, 0)
    still = await ledger.get_send(send_id=record.id)
    assert still is not None
    assert still.status is SendStatus.SENDING


async def test_a_send_claimed_again_after_its_lease_cannot_be_handed_over_by_the_first(
    backend: Backend,
) -> None:
    ledger = backend.storage.ledger
    first = await claimed(ledger, "k1")
    await ledger.recover_interrupted(relay_idempotent=False, now=NOW + timedelta(days=1))
    second = await claimed(ledger, "k1")
    assert second.attempts == first.attempts + 1
    late = await ledger.hand_over(first.id, relay="smtp", template_version="v1", checks=checks(first))
    assert not late.handed_over
    assert (
        await ledger.hand_over(second.id, relay="smtp", template_version="v1", checks=checks(second))
    ).handed_over


async def test_sends_are_listed_newest_first_by_page(backend: Backend) -> None:
    ledger = backend.storage.ledger
    for n in range(5):
        await ledger.schedule_send(planned(f"k{n}", entry_key=f"cart-{n}"))
    page = await ledger.list_sends(profile_key="u:ada", limit=3)
    assert [r.send_key for r in page] == ["k4", "k3", "k2"]
    rest = await ledger.list_sends(profile_key="u:ada", limit=3, before_id=page[-1].id)
    assert [r.send_key for r in rest] == ["k1", "k0"]
    assert await ledger.list_sends(flow_id="other") == []
    assert await ledger.flow_counts() == {"abandoned_cart": {"scheduled": 5}}


async def test_sent_since_counts_marketing_sends_that_may_have_reached_the_user(backend: Backend) -> None:
    ledger = backend.storage.ledger
    record = await claimed(ledger, "k1")
    since = NOW - timedelta(hours=1)
    assert await ledger.sent_since("u:ada", since) == 0
    await ledger.hand_over(record.id, relay="smtp", template_version="v1", checks=checks(record))
    assert await ledger.sent_since("u:ada", since) == 1


async def test_suppressions_are_kept_once_by_subject_and_group(backend: Backend) -> None:
    suppressions = backend.storage.suppressions
    assert await suppressions.suppress("u:ada", "marketing", "unsubscribed", "link")
    assert not await suppressions.suppress("u:ada", "marketing", "unsubscribed", "link")
    assert await suppressions.is_suppressed(["u:ada"], "marketing")
    assert not await suppressions.is_suppressed(["u:ada"], "news")
    assert await suppressions.suppress("email:bob@example.com", "*", "complaint", "webhook")
    assert await suppressions.is_suppressed(["u:bob", "email:bob@example.com"], "news")


async def test_unsuppress_lifts_only_a_suppression_given_for_that_reason(backend: Backend) -> None:
    suppressions = backend.storage.suppressions
    await suppressions.suppress("u:ada", "marketing", "unsubscribed", "link")
    await suppressions.suppress("email:ada@example.com", "*", "bounce", "sendgrid")
    assert not await suppressions.unsuppress("email:ada@example.com", "*", "unsubscribed")
    assert await suppressions.is_suppressed(["email:ada@example.com"], "marketing")
    assert await suppressions.unsuppress("u:ada", "marketing", "unsubscribed")
    assert not await suppressions.unsuppress("u:ada", "marketing", "unsubscribed")
    assert not await suppressions.is_suppressed(["u:ada"], "marketing")


# -- one person, several ids (domain.identity) ----------------------------------


async def claimed_for(
    store: DeliveryLedger, key: str, profile_key: str, *, entry_key: str = "cart-1"
) -> SendRecord:
    send = msgspec.structs.replace(planned(key, entry_key=entry_key), profile_key=profile_key)
    await store.schedule_send(send)
    due = await store.claim_due(NOW, 10)
    (record,) = [r for r in due.records if r.send_key == key]
    return record


def person_checks(record: SendRecord, *, cap_count: int = 0, duplicates: bool = False) -> LastChecks:
    """The checks of a send to the person known as u:ada and a:anon-1."""
    return dataclasses.replace(
        checks(record, cap_count=cap_count),
        person_keys=("u:ada", "a:anon-1"),
        duplicate_since=datetime.min.replace(tzinfo=UTC) if duplicates else None,
    )


async def test_an_exit_under_another_id_of_the_person_stops_the_send(backend: Backend) -> None:
    store = backend.storage.ledger
    anonymous = await claimed_for(store, "k1", "a:anon-1")
    # the order came under the user id, after the anonymous cart entered the flow
    await backend.events().append([track("o1", "Order Completed", b'{"order_id": "o1"}', at=NOW)])
    alone = await store.hand_over(anonymous.id, relay="smtp", template_version="v1", checks=checks(anonymous))
    assert alone.handed_over  # its own key has no exit: only the person's keys find it
    again = await claimed_for(store, "k2", "a:anon-1", entry_key="cart-2")
    handover = await store.hand_over(
        again.id, relay="smtp", template_version="v1", checks=person_checks(again)
    )
    assert (handover.handed_over, handover.exit_event) == (False, "Order Completed")


async def test_the_cap_counts_the_sends_to_every_id_of_the_person(backend: Backend) -> None:
    store = backend.storage.ledger
    first = await claimed_for(store, "k1", "u:ada")
    assert (
        await store.hand_over(first.id, relay="smtp", template_version="v1", checks=checks(first))
    ).handed_over
    anonymous = await claimed_for(store, "k2", "a:anon-1", entry_key="cart-2")
    own = checks(anonymous, cap_count=1)
    person = person_checks(anonymous, cap_count=1)
    assert (await store.sent_since("a:anon-1", NOW - timedelta(days=1))) == 0
    handover = await store.hand_over(anonymous.id, relay="smtp", template_version="v1", checks=person)
    assert (handover.handed_over, handover.capped, handover.sent) == (False, True, 1)
    assert (await store.hand_over(anonymous.id, relay="smtp", template_version="v1", checks=own)).handed_over


async def test_one_cart_entered_under_two_ids_of_the_person_is_sent_once(backend: Backend) -> None:
    store = backend.storage.ledger
    anonymous = await claimed_for(store, "k1", "a:anon-1")
    user = await claimed_for(store, "k2", "u:ada")
    first = await store.hand_over(
        anonymous.id, relay="smtp", template_version="v1", checks=person_checks(anonymous, duplicates=True)
    )
    assert first.handed_over
    second = await store.hand_over(
        user.id, relay="smtp", template_version="v1", checks=person_checks(user, duplicates=True)
    )
    assert (second.handed_over, second.duplicate) == (False, True)
    # another cart of the person is no duplicate
    other = await claimed_for(store, "k3", "u:ada", entry_key="cart-2")
    assert (
        await store.hand_over(
            other.id, relay="smtp", template_version="v1", checks=person_checks(other, duplicates=True)
        )
    ).handed_over
