"""Dispatcher over the in-memory ledger, profiles and relay (tests/fakes), with
the real content pipeline, on a manual clock: a due send becomes one email at
the ESP, or a final status that says why not. The loop is woken as a commit
wakes it; the tests wait on the ledger's changes, never on time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import datetime, time, timedelta
from email import message_from_bytes

import pytest

from sendtime.server.cache import CacheFetcher
from sendtime.server.dispatch import Attempt, Dispatcher, DispatchPolicy
from sendtime.server.domain.catalog import Product
from sendtime.server.domain.events import ConsentState
from sendtime.server.domain.flows import PlannedExit
from sendtime.server.domain.sends import FINAL_STATUSES, FrequencyCap, QuietHours, SendRecord, SendStatus
from sendtime.server.domain.unsubscribe import EmailLinks
from sendtime.server.relay.base import (
    PermanentFailure,
    RetryingRelay,
    RetryPolicy,
    TransientFailure,
    UncertainFailure,
)
from tests.fakes import (
    IngestRig,
    MemoryRelay,
    PlainTemplate,
    Templates,
    abandoned_cart_flow,
    content_pipeline,
    identify,
    track,
)

FLOW = abandoned_cart_flow(require_blocks=("cart",))
ADDED = {"product_id": "p1", "cart_id": "c1", "price": 9.5, "quantity": 1}
POLICY = DispatchPolicy(
    default_sender="shop@example.com",
    unsubscribe_mailto="unsubscribe@example.com",
    list_id="news.shop.example.com",
    message_id_domain="shop.example.com",
    frequency_cap=None,
    quiet_hours=None,
    render_budget_s=1.0,
    max_concurrent=4,
    max_send_attempts=2,
    # the loop looks when woken, never on a timer, in these tests
    poll_interval_s=3600,
)


@dataclass
class DispatchRig:
    rig: IngestRig
    relay: MemoryRelay
    template: PlainTemplate
    dispatcher: Dispatcher
    fetcher: CacheFetcher
    attempts: list[tuple[int, str, str]] = field(default_factory=list)

    async def enter_the_flow(self, user: str = "ada") -> SendRecord:
        """The user adds to a cart: one abandoned-cart send, scheduled."""
        await self.rig.ingest(track(f"add-{user}", "Product Added", ADDED, user=user))
        return next(r for r in self.rig.ledger.sends.values() if r.profile_key == f"u:{user}")

    async def when_due(self, send: SendRecord) -> SendRecord:
        """Move the clock to the send's due time, wake the loop, and return the
        send once the dispatcher has settled it (or scheduled it again)."""
        self.rig.clock.advance((send.due_at - self.rig.clock.now()).total_seconds())
        done = len(self.attempts) + 1
        self.dispatcher.wake()
        await self.rig.ledger.until(lambda: len(self.attempts) >= done)
        return self.rig.ledger.sends[send.id]


async def start(policy: DispatchPolicy = POLICY, *, idempotent: bool = False) -> DispatchRig:
    rig = IngestRig([FLOW])
    await rig.__aenter__()
    relay = MemoryRelay(idempotent=idempotent)
    template = PlainTemplate("abandoned_cart", {"cart": {}})
    pipeline, fetcher = content_pipeline(
        rig, Templates(template), products=[Product(id="p1", name="Socks", price=9.5, currency="EUR")]
    )
    attempts: list[tuple[int, str, str]] = []

    class Observer:
        def attempted(self, record: SendRecord, attempt: Attempt, relay: str, elapsed_s: float) -> None:
            attempts.append((record.id, attempt.outcome, attempt.reason))

    dispatcher = Dispatcher(
        ledger=rig.ledger,
        profiles=rig.profiles,
        pipeline=pipeline,
        # one try per round: a transient failure is the dispatcher's to schedule again
        relay=RetryingRelay(relay, RetryPolicy(attempts=1)),
        links=EmailLinks(b"k" * 32, lambda: "https://shop.example.com"),
        flows={FLOW.id: FLOW},
        policy=policy,
        clock=rig.clock.now,
        observer=Observer(),
    )
    rig.wake_dispatcher = dispatcher.wake
    return DispatchRig(rig, relay, template, dispatcher, fetcher, attempts)


async def stop(rig: DispatchRig) -> None:
    await rig.dispatcher.close(grace_s=5)
    await rig.fetcher.aclose()
    await rig.rig.__aexit__()


@pytest.fixture
async def dispatch() -> AsyncIterator[DispatchRig]:
    rig = await start()
    await rig.dispatcher.start()
    yield rig
    await stop(rig)


async def test_a_due_send_is_one_email_with_its_headers_and_the_ledger_says_sent(
    dispatch: DispatchRig,
) -> None:
    await dispatch.rig.ingest(identify("who", first_name="Ada", consent={"marketing": ConsentState.OPTED_IN}))
    send = await dispatch.enter_the_flow()
    assert dispatch.relay.sent == []  # not before it is due
    sent = await dispatch.when_due(send)
    assert (sent.status, sent.esp_message_id, sent.attempts, sent.relay) == (
        SendStatus.SENT,
        "esp-1",
        1,
        "memory",
    )
    assert sent.accepted_at == dispatch.rig.clock.now()
    assert dispatch.attempts == [(send.id, "sent", "")]
    (email,) = dispatch.relay.sent
    assert (email.recipient, email.idempotency_key) == ("Ada <ada@example.com>", send.send_key)
    message = message_from_bytes(email.mime)
    assert message["List-Unsubscribe"].startswith("<https://shop.example.com/v1/unsubscribe/")
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert "Socks" in email.text or "p1" in email.text  # the cart, as the pipeline gave it
    # the ledger moved through the hand-over, one way
    assert [status for send_id, status, _ in dispatch.rig.ledger.history if send_id == send.id] == [
        SendStatus.SENDING,
        SendStatus.RELAYING,
        SendStatus.SENT,
    ]


async def test_without_an_email_address_or_after_an_opt_out_nothing_is_sent(dispatch: DispatchRig) -> None:
    await dispatch.rig.ingest(identify("who-grace", user="grace", email=None))
    no_address = await dispatch.when_due(await dispatch.enter_the_flow("grace"))
    await dispatch.rig.ingest(identify("who", consent={"marketing": ConsentState.OPTED_OUT}))
    opted_out = await dispatch.when_due(await dispatch.enter_the_flow())
    assert (no_address.status, no_address.reason) == (SendStatus.SKIPPED, "the profile has no email address")
    assert (opted_out.status, opted_out.reason) == (SendStatus.SKIPPED, "opted out of marketing")
    assert [outcome[1:] for outcome in dispatch.attempts] == [
        ("skipped", "no_email"),
        ("skipped", "opted_out"),
    ]
    assert dispatch.relay.sent == []


async def test_an_order_that_lands_while_the_email_renders_still_cancels_it(dispatch: DispatchRig) -> None:
    await dispatch.rig.ingest(identify("who"))
    send = await dispatch.enter_the_flow()
    ledger = dispatch.rig.ledger
    # the exit is written as the template renders: after the claim, before the hand-over
    dispatch.template.on_render = lambda: ledger.exits.append(
        PlannedExit(
            profile_key="u:ada",
            flow_id=FLOW.id,
            entry_key="c1",
            event_time=dispatch.rig.clock.now(),
            event_name="Order Completed",
        )
    )
    cancelled = await dispatch.when_due(send)
    assert (cancelled.status, cancelled.reason) == (SendStatus.CANCELLED, "exit: Order Completed")
    assert dispatch.relay.sent == []


async def test_a_suppressed_address_is_skipped_at_the_hand_over(dispatch: DispatchRig) -> None:
    await dispatch.rig.ingest(identify("who", email="Ada@Example.com"))
    await dispatch.rig.ledger.suppressions.suppress("email:ada@example.com", "*", "bounce", "esp")
    skipped = await dispatch.when_due(await dispatch.enter_the_flow())
    assert (skipped.status, skipped.reason) == (SendStatus.SKIPPED, "suppressed for marketing")
    assert dispatch.relay.sent == []


async def test_nothing_to_show_skips_the_send(dispatch: DispatchRig) -> None:
    await dispatch.rig.ingest(identify("who"))
    send = await dispatch.enter_the_flow()
    # its only line removed: an empty cart, and the flow requires one
    await dispatch.rig.ingest(track("removed", "Product Removed", {"product_id": "p1", "cart_id": "c1"}))
    skipped = await dispatch.when_due(send)
    assert (skipped.status, skipped.reason) == (SendStatus.SKIPPED, "nothing to show: no cart")
    assert dispatch.attempts[-1][1:] == ("skipped", "nothing_to_show")


async def test_a_refusal_fails_the_send_and_an_unanswered_one_is_never_resent(dispatch: DispatchRig) -> None:
    await dispatch.rig.ingest(identify("who"), identify("who-grace", user="grace", email="grace@example.com"))
    dispatch.relay.failures = [PermanentFailure("550 no such user"), UncertainFailure("timed out after DATA")]
    refused = await dispatch.when_due(await dispatch.enter_the_flow())
    unanswered = await dispatch.when_due(await dispatch.enter_the_flow("grace"))
    assert (refused.status, refused.reason) == (SendStatus.FAILED, "550 no such user")
    assert unanswered.status is SendStatus.UNCERTAIN
    assert "not resent" in unanswered.reason
    rows = [(row.send_id, row.outcome) for row in dispatch.rig.ledger.attempts]
    assert rows == [(refused.id, "refused"), (unanswered.id, "uncertain")]
    assert dispatch.relay.sent == []


async def test_a_transient_failure_is_retried_later_then_given_up(dispatch: DispatchRig) -> None:
    await dispatch.rig.ingest(identify("who"))
    dispatch.relay.failures = [TransientFailure("421 try later"), TransientFailure("421 try later")]
    first = await dispatch.when_due(await dispatch.enter_the_flow())
    assert (first.status, first.reason) == (SendStatus.SCHEDULED, "will retry: 421 try later")
    assert first.due_at == dispatch.rig.clock.now() + timedelta(seconds=30)
    last = await dispatch.when_due(first)  # the second round is the policy's last
    assert (last.status, last.attempts) == (SendStatus.FAILED, 2)
    assert last.reason == "gave up after 2 rounds: 421 try later"
    assert [a[1:] for a in dispatch.attempts] == [("retry", "transient"), ("failed", "gave_up")]


async def test_quiet_hours_hold_the_send_until_they_end() -> None:
    quiet = QuietHours(start=time(12, 0), end=time(14, 0), default_timezone="UTC", hold=True)
    rig = await start(replace(POLICY, quiet_hours=quiet))
    await rig.dispatcher.start()
    try:
        await rig.rig.ingest(identify("who", timezone="Europe/London"))
        held = await rig.when_due(await rig.enter_the_flow())  # due 12:30 London time
        assert (held.status, held.due_at) == (
            SendStatus.SCHEDULED,
            datetime(2026, 3, 2, 14, 0, tzinfo=held.due_at.tzinfo),
        )
        assert held.reason.startswith("held for quiet hours until")
        sent = await rig.when_due(held)
        assert sent.status is SendStatus.SENT
    finally:
        await stop(rig)


async def test_the_frequency_cap_counts_what_was_sent_in_its_period() -> None:
    rig = await start(replace(POLICY, frequency_cap=FrequencyCap(count=1, period=timedelta(days=1))))
    await rig.dispatcher.start()
    try:
        await rig.rig.ingest(identify("who"))
        first = await rig.when_due(await rig.enter_the_flow())
        await rig.rig.ingest(track("add-2", "Product Added", {**ADDED, "cart_id": "c2"}))
        second = next(r for r in rig.rig.ledger.sends.values() if r.entry_key == "c2")
        capped = await rig.when_due(second)
    finally:
        await stop(rig)
    assert first.status is SendStatus.SENT
    assert (capped.status, capped.reason) == (
        SendStatus.SKIPPED,
        "frequency cap: 1 sends in the last 1 day, 0:00:00",
    )


async def test_a_restart_sends_what_was_claimed_and_never_handed_over() -> None:
    rig = await start()
    try:
        await rig.rig.ingest(identify("who"))
        send = await rig.enter_the_flow()
        # as if a crash came between the claim and the hand-over
        rig.rig.clock.advance(1800)
        (claimed,) = (await rig.rig.ledger.claim_due(rig.rig.clock.now(), 10)).records
        assert claimed.status is SendStatus.SENDING
        await rig.dispatcher.start()  # recovers it, then the loop sends it at once
        await rig.rig.ledger.until(lambda: rig.rig.ledger.sends[send.id].status in FINAL_STATUSES)
        final = rig.rig.ledger.sends[send.id]
    finally:
        await stop(rig)
    assert (final.status, final.attempts) == (SendStatus.SENT, 2)
    assert len(rig.relay.sent) == 1
