"""The dispatcher: turns due sends into emails at the ESP, exactly once.

For each due send, claimed durably (status "sending"):

1. checks what the profile says: an email address, consent for the send's
   group, quiet hours (hold or skip);
2. renders the template with live content (the same pipeline as GetContent);
3. in one transaction, right before relay, checks what the store says (exit
   events since the entry, the suppression list, the frequency cap) and
   writes "relaying", durably: an order, an unsubscribe or another send that
   landed while the email rendered still stops it, and the store is visited
   once, not twice, on the way to the ESP;
4. hands the message to the relay (retries with backoff there), and writes
   the outcome: sent with the ESP's message id, failed with its reason, or
   scheduled again later for a transient failure.

The scheduler loop wakes when a commit schedules something sooner than it
planned to look, so a flow with no delay sends within milliseconds; one trip
through the store's writer claims what is due and says when the next one is.
A finished send wakes the loop only when it was waiting for a free slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, Protocol

from opentelemetry.trace import Span, Tracer

from sendtime.server.domain.content import ContentContext, ContentPipeline, RenderedEmail
from sendtime.server.domain.errors import SendtimeError
from sendtime.server.domain.events import Identity
from sendtime.server.domain.flows import Flow, Reentry
from sendtime.server.domain.ingest import utc_now
from sendtime.server.domain.ports import DeliveryLedger, HandOver, LastChecks
from sendtime.server.domain.profile import Profile
from sendtime.server.domain.profiles import ProfileBook
from sendtime.server.domain.provenance import Source
from sendtime.server.domain.sends import FrequencyCap, QuietHours, SendOutcome, SendRecord, SendStatus
from sendtime.server.domain.unsubscribe import EmailLinks
from sendtime.server.relay import message as mime
from sendtime.server.relay.base import (
    OutgoingEmail,
    PermanentFailure,
    RetryingRelay,
    TransientFailure,
    UncertainFailure,
)

log = logging.getLogger(__name__)

_RETRY_LATER_BASE: Final = timedelta(seconds=30)
_EARLIEST: Final = datetime.min.replace(tzinfo=UTC)


@dataclass(slots=True)
class Attempt:
    """What one go at a claimed send came to: for metrics and the log line."""

    outcome: SendOutcome
    #: Why, as a class: no_email, opted_out, no_opt_in, suppressed, frequency_cap,
    #: quiet_hours, nothing_to_show, bad_address, exit, not_sending, render_error, refused,
    #: transient, gave_up, internal; "" when sent.
    reason: str = ""
    #: The ESP's or the renderer's own words, for a failure.
    detail: str = ""
    relay_tries: int = 0
    render_s: float = 0.0
    relay_s: float = 0.0
    #: From the triggering event's arrival to the ESP's acceptance (sent only).
    latency_s: float | None = None


@dataclass(frozen=True, slots=True)
class CampaignSend:
    """What a campaign (a broadcast) says of one of its sends as it goes out."""

    sender: str = ""
    require_blocks: tuple[str, ...] = ()
    #: Put it back, due then, instead of sending it (a paused broadcast).
    hold_until: datetime | None = None
    #: Settle it so instead of sending it: (status, reason, reason class).
    stop: tuple[SendStatus, str, str] | None = None


class Campaigns(Protocol):
    async def campaign_send(self, record: SendRecord, now: datetime) -> CampaignSend | None:
        """None when ``record`` is not a campaign's send."""
        ...


class SendObserver(Protocol):
    def attempted(self, record: SendRecord, attempt: Attempt, relay: str, elapsed_s: float) -> None:
        """Told once per claimed send, after its outcome was written."""
        ...


@dataclass(frozen=True, slots=True)
class DispatchPolicy:
    default_sender: str
    unsubscribe_mailto: str
    list_id: str
    message_id_domain: str
    frequency_cap: FrequencyCap | None
    quiet_hours: QuietHours | None
    render_budget_s: float
    max_concurrent: int
    max_send_attempts: int
    poll_interval_s: float
    #: Marketing sends need an explicit opt-in; else only an opt-out stops them.
    require_opt_in: bool = False


class _Stopped(Exception):
    """A step of a send ended it, having written why: the attempt to report."""

    def __init__(self, attempt: Attempt) -> None:
        super().__init__(attempt.outcome)
        self.attempt = attempt


@dataclass(frozen=True, slots=True)
class _Plan:
    """What the send belongs to: a flow, a campaign (a broadcast's send), or neither (the API's)."""

    flow: Flow | None
    campaign: CampaignSend | None

    @property
    def required(self) -> tuple[str, ...]:
        """Blocks that must have data, else the send is skipped."""
        if self.flow is not None:
            return self.flow.require_blocks
        return self.campaign.require_blocks if self.campaign is not None else ()

    @property
    def sender(self) -> str:
        """The From the flow or campaign names ("": the default sender)."""
        if self.flow is not None and self.flow.sender:
            return self.flow.sender
        return self.campaign.sender if self.campaign is not None else ""


@dataclass(frozen=True, slots=True)
class _Recipient:
    """Who a send goes to, as the profile said when it was checked."""

    #: Every profile key of the person (exits, suppressions and caps apply to all).
    person_keys: tuple[str, ...]
    profile: Profile
    email: str
    #: When the profile was checked: the email's date, its links' issue time, the cap's window.
    now: datetime
    #: The one-click unsubscribe URL ("" for a transactional send).
    unsubscribe_url: str


class Dispatcher:
    def __init__(
        self,
        *,
        ledger: DeliveryLedger,
        profiles: ProfileBook,
        pipeline: ContentPipeline,
        relay: RetryingRelay,
        links: EmailLinks,
        flows: Mapping[str, Flow],
        policy: DispatchPolicy,
        clock: Callable[[], datetime] = utc_now,
        observer: SendObserver | None = None,
        tracer: Tracer | None = None,
        campaigns: Campaigns | None = None,
    ) -> None:
        self._campaigns = campaigns
        self._observer = observer
        self._tracer = tracer
        self._ledger = ledger
        self._profiles = profiles
        self._pipeline = pipeline
        self._relay = relay
        self._links = links
        self._flows = dict(flows)
        self._policy = policy
        self._clock = clock
        self._wake = asyncio.Event()
        #: When the sleeping loop will look for due sends anyway (None: it is looking now).
        self._next_look: datetime | None = None
        #: The loop waits for a send to finish before it claims more.
        self._waiting_for_slot = False
        self._stopping = False
        self._loop_task: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        """Sends claimed and not finished."""
        return len(self._sends)

    async def start(self) -> None:
        again, unsure = await self._ledger.recover_interrupted(relay_idempotent=self._relay.idempotent)
        if again or unsure:
            log.warning(
                "after a restart: %d interrupted sends scheduled again, %d marked uncertain (not resent)",
                again,
                unsure,
            )
        self._loop_task = asyncio.create_task(self._run(), name="sendtime-dispatcher")

    def wake(self, due_at: datetime | None = None) -> None:
        """Something may be due (at ``due_at``) sooner than the loop planned to look."""
        if due_at is None or self._next_look is None or due_at < self._next_look:
            self._wake.set()

    async def close(self, grace_s: float) -> None:
        """Stop claiming; let sends in flight finish within the grace period.
        One cut short stays "sending"/"relaying" and is recovered at the next start."""
        self._stopping = True
        self._wake.set()
        if self._loop_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self._sends:
            _, pending = await asyncio.wait(self._sends, timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self._relay.close()

    # -- the loop -------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            self._next_look = None  # looking now: any wake-up counts
            timeout = self._policy.poll_interval_s
            free = self._policy.max_concurrent - len(self._sends)
            self._waiting_for_slot = free <= 0
            if free > 0:
                try:
                    due = await self._ledger.claim_due(self._clock(), free)
                except Exception:
                    log.exception("claiming due sends failed; retrying shortly")
                else:
                    for record in due.records:
                        task = asyncio.create_task(self._send_guarded(record), name=f"send-{record.id}")
                        self._sends.add(task)
                        task.add_done_callback(self._send_done)
                    if len(due.records) == free:
                        continue  # there may be more due right away
                    if due.next_due is not None:
                        timeout = min(timeout, max((due.next_due - self._clock()).total_seconds(), 0.0))
            self._next_look = self._clock() + timedelta(seconds=timeout)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _send_done(self, task: asyncio.Task[None]) -> None:
        self._sends.discard(task)
        if self._waiting_for_slot:
            # The loop stopped claiming because every slot was taken: one is free now.
            self._waiting_for_slot = False
            self._wake.set()

    # -- one send -------------------------------------------------------------

    async def _send_guarded(self, record: SendRecord) -> None:
        started = time.perf_counter()
        try:
            if self._tracer is None:
                attempt = await self._send(record)
            else:
                with self._tracer.start_as_current_span(
                    "sendtime.send",
                    attributes={
                        "sendtime.send.id": record.id,
                        "sendtime.flow": record.flow_id or "api",
                        "sendtime.template": record.template_id,
                        "sendtime.send.round": record.attempts,
                    },
                ) as span:
                    attempt = await self._send(record)
                    _describe(span, attempt)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.exception("send %s failed unexpectedly", record.id)
            attempt = Attempt(SendOutcome.FAILED, "internal", f"internal error: {error}")
            await self._finish(record, SendStatus.FAILED, attempt.detail, expect=SendStatus.SENDING)
        if self._observer is not None:
            self._observer.attempted(record, attempt, self._relay.name, time.perf_counter() - started)

    async def _send(self, record: SendRecord) -> Attempt:
        """One claimed send, step by step; a step that ends it (skipped, held,
        failed, cancelled...) has written why and raises _Stopped."""
        try:
            plan = await self._plan(record)
            recipient = await self._recipient(record)
            render_started = time.perf_counter()
            rendered = await self._render(record, plan, recipient)
            render_s = time.perf_counter() - render_started
            outgoing = await self._address(record, plan, recipient, rendered, render_s)
            await self._hand_over(record, plan, recipient, rendered, render_s)
            return await self._relay_and_record(record, outgoing, render_s)
        except _Stopped as stopped:
            return stopped.attempt

    async def _plan(self, record: SendRecord) -> _Plan:
        """The flow or campaign the send belongs to (a paused or ended campaign stops it)."""
        flow = self._flows.get(record.flow_id)
        campaign = None
        if flow is None and self._campaigns is not None:
            campaign = await self._campaigns.campaign_send(record, self._clock())
            await self._unless_campaign_stopped(record, campaign)
        return _Plan(flow, campaign)

    async def _recipient(self, record: SendRecord) -> _Recipient:
        """Who gets it, and whether the profile allows it now (address,
        consent, quiet hours); the links the email carries for them."""
        # the person the send's id was when the flow was entered (a shared
        # device's anonymous id may be someone else's by now)
        person = await self._profiles.person(record.profile_key, record.entry_time)
        profile = person.profile if person is not None else None
        # only a few traits and the consent are needed here: not the whole
        # view (carts, orders), which the content pipeline builds for itself
        email = _text(profile, "email")
        if profile is None or not email:
            await self._finish(record, SendStatus.SKIPPED, "the profile has no email address")
            raise _Stopped(Attempt(SendOutcome.SKIPPED, "no_email"))
        now = self._clock()
        refusal = self._refusal(record, profile, now)
        if refusal is not None:
            status, reason, hold_until, reason_class = refusal
            if hold_until is not None:
                await self._ledger.update_send(
                    record.id,
                    SendStatus.SCHEDULED,
                    expect=SendStatus.SENDING,
                    reason=reason,
                    due_at=hold_until,
                )
                self.wake(hold_until)
                raise _Stopped(Attempt(SendOutcome.HELD, reason_class))
            await self._finish(record, status, reason)
            raise _Stopped(Attempt(SendOutcome.of(status), reason_class))
        group = record.subscription_group
        unsubscribe_url = self._links.unsubscribe_url(record.profile_key, group, now) if group else ""
        return _Recipient(person.keys if person is not None else (), profile, email, now, unsubscribe_url)

    async def _render(self, record: SendRecord, plan: _Plan, recipient: _Recipient) -> RenderedEmail:
        """The email with live content; stopped when it cannot be made or a
        block the flow requires has nothing to show."""
        # every email, transactional ones too, links its recipient's preferences page
        links = [("preferences_url", self._links.preferences_url(record.profile_key, recipient.now))]
        if recipient.unsubscribe_url:
            # the body's Unsubscribe link is the same one-click URL as the header's
            links.append(("unsubscribe_url", recipient.unsubscribe_url))
        profile = recipient.profile
        # rendered for the person: an anonymous cart gets the name given later
        identity = (
            Identity(profile.user_id, "")
            if profile.user_id
            else Identity(record.user_id, record.anonymous_id)
        )
        flow = plan.flow
        context = ContentContext(
            campaign=record.flow_id,
            cart_id=record.entry_key if flow is not None and flow.entry_key == "cart_id" else "",
            links=tuple(links),
        )
        render_started = time.perf_counter()
        try:
            answer = await self._pipeline.email(
                record.template_id, identity, context, self._policy.render_budget_s, may_shed=False
            )
        except SendtimeError as error:
            detail = f"cannot render {record.template_id}: {error.message}"
            await self._finish(record, SendStatus.FAILED, detail)
            raise _Stopped(
                Attempt(
                    SendOutcome.FAILED, "render_error", detail, render_s=time.perf_counter() - render_started
                )
            ) from None
        missing = [b.name for b in answer.blocks if b.name in plan.required and b.source is Source.FALLBACK]
        if missing:
            await self._finish(record, SendStatus.SKIPPED, f"nothing to show: no {', '.join(missing)}")
            render_s = time.perf_counter() - render_started
            raise _Stopped(Attempt(SendOutcome.SKIPPED, "nothing_to_show", render_s=render_s))
        return answer.email

    async def _address(
        self, record: SendRecord, plan: _Plan, recipient: _Recipient, rendered: RenderedEmail, render_s: float
    ) -> OutgoingEmail:
        """The message as it will leave, with the headers mailbox providers require."""
        group = record.subscription_group
        profile = recipient.profile
        try:
            return mime.build(
                send_key=record.send_key,
                message_id_domain=self._policy.message_id_domain,
                sender=plan.sender or self._policy.default_sender,
                recipient_email=recipient.email,
                recipient_name=" ".join(
                    filter(None, (_text(profile, "first_name"), _text(profile, "last_name")))
                ),
                reply_to=plan.flow.reply_to if plan.flow is not None else "",
                subject=rendered.subject,
                html=rendered.html,
                text=rendered.text,
                date=recipient.now,
                list_id=self._policy.list_id if group else "",
                unsubscribe_url=recipient.unsubscribe_url,
                unsubscribe_mailto=self._policy.unsubscribe_mailto if group else "",
            )
        except ValueError as error:
            await self._finish(record, SendStatus.SKIPPED, f"cannot address the email: {error}")
            raise _Stopped(Attempt(SendOutcome.SKIPPED, "bad_address", render_s=render_s)) from None

    async def _hand_over(
        self, record: SendRecord, plan: _Plan, recipient: _Recipient, rendered: RenderedEmail, render_s: float
    ) -> None:
        """The last look, right before the message leaves, in the transaction
        that hands it over ("relaying"): an exit event, a suppression or
        another send stored while the email rendered still stops it."""
        if plan.campaign is not None and self._campaigns is not None:
            # paused or cancelled while it rendered: it stops here, within a second
            campaign = await self._campaigns.campaign_send(record, self._clock())
            await self._unless_campaign_stopped(record, campaign, render_s)
        handover = await self._ledger.hand_over(
            record.id,
            relay=self._relay.name,
            template_version=rendered.version,
            checks=self._last_checks(record, recipient.email, recipient.now, recipient.person_keys),
        )
        if not handover.handed_over:
            raise _Stopped(await self._refused_at_handover(record, handover, render_s))

    async def _relay_and_record(
        self, record: SendRecord, outgoing: OutgoingEmail, render_s: float
    ) -> Attempt:
        """Hand the message to the ESP and write what came of it."""
        relay_started = time.perf_counter()
        try:
            accepted = await self._relay.send(outgoing)
        except PermanentFailure as failure:
            relay_s = time.perf_counter() - relay_started
            await self._finish(
                record,
                SendStatus.FAILED,
                failure.reason,
                expect=SendStatus.RELAYING,
                attempt=(record.attempts, "refused", f"{failure.reason} (after {failure.attempts} tries)"),
            )
            return Attempt(SendOutcome.FAILED, "refused", failure.reason, failure.attempts, render_s, relay_s)
        except UncertainFailure as failure:
            # as if the server had died while "relaying": the ESP may have it
            relay_s = time.perf_counter() - relay_started
            await self._finish(
                record,
                SendStatus.UNCERTAIN,
                f"the ESP may have taken it; not resent: {failure.reason}",
                expect=SendStatus.RELAYING,
                attempt=(record.attempts, "uncertain", failure.reason),
            )
            return Attempt(
                SendOutcome.UNCERTAIN, "no_answer", failure.reason, failure.attempts, render_s, relay_s
            )
        except TransientFailure as failure:
            relay_s = time.perf_counter() - relay_started
            gave_up = await self._retry_later(record, failure)
            return Attempt(
                SendOutcome.FAILED if gave_up else SendOutcome.RETRY,
                "gave_up" if gave_up else "transient",
                failure.reason,
                failure.attempts,
                render_s,
                relay_s,
            )
        relay_s = time.perf_counter() - relay_started
        accepted_at = self._clock()
        await self._ledger.update_send(
            record.id,
            SendStatus.SENT,
            expect=SendStatus.RELAYING,
            esp_message_id=accepted.esp_message_id,
            accepted_at=accepted_at,
            attempt=(
                record.attempts,
                "accepted",
                f"{accepted.esp_message_id} (after {accepted.attempts} tries)",
            ),
        )
        return Attempt(
            SendOutcome.SENT,
            relay_tries=accepted.attempts,
            render_s=render_s,
            relay_s=relay_s,
            latency_s=(accepted_at - record.received_at).total_seconds(),
        )

    async def _unless_campaign_stopped(
        self, record: SendRecord, campaign: CampaignSend | None, render_s: float = 0.0
    ) -> None:
        """Stops the send when its campaign says so: held (paused) or settled (cancelled, ended)."""
        if campaign is None:
            return
        if campaign.hold_until is not None:
            await self._ledger.update_send(
                record.id,
                SendStatus.SCHEDULED,
                expect=SendStatus.SENDING,
                reason="held: the broadcast is paused",
                due_at=campaign.hold_until,
            )
            raise _Stopped(Attempt(SendOutcome.HELD, "paused", render_s=render_s))
        if campaign.stop is not None:
            status, reason, reason_class = campaign.stop
            await self._finish(record, status, reason)
            raise _Stopped(Attempt(SendOutcome.of(status), reason_class, render_s=render_s))

    def _refusal(
        self, record: SendRecord, profile: Profile | None, now: datetime
    ) -> tuple[SendStatus, str, datetime | None, str] | None:
        """Why not to send now, as far as the profile tells: (status, reason,
        hold until, reason class) or None. What the store knows (exits, the
        suppression list, the cap) is checked when the send is handed over."""
        group = record.subscription_group
        if not group:
            return None  # transactional: no consent, suppression, caps or quiet hours
        consent = profile.consent.get(group) if profile is not None else None
        if consent is not None and str(consent.value) == "opted_out":
            return SendStatus.SKIPPED, f"opted out of {group}", None, "opted_out"
        if self._policy.require_opt_in and consent is None:
            return SendStatus.SKIPPED, f"no opt-in to {group} (delivery.require_opt_in)", None, "no_opt_in"
        quiet = self._policy.quiet_hours
        if quiet is not None:
            until = quiet.next_allowed(now, _text(profile, "timezone"))
            if until is not None:
                if quiet.hold:
                    return (
                        SendStatus.SCHEDULED,
                        f"held for quiet hours until {until.isoformat()}",
                        until,
                        "quiet_hours",
                    )
                return SendStatus.SKIPPED, "quiet hours", None, "quiet_hours"
        return None

    def _last_checks(
        self, record: SendRecord, email: str, now: datetime, person_keys: Sequence[str]
    ) -> LastChecks:
        """Exits, suppressions and the cap per person: under any of their ids."""
        group = record.subscription_group
        cap = self._policy.frequency_cap if group else None
        capped = cap is not None and cap.count > 0
        keys = tuple(dict.fromkeys((record.profile_key, *person_keys)))
        return LastChecks(
            profile_key=record.profile_key,
            flow_id=record.flow_id,
            entry_key=record.entry_key,
            entry_time=record.entry_time,
            group=group,
            subjects=(*keys, f"email:{email.lower()}") if group else (),
            cap_since=now - cap.period if cap is not None and capped else None,
            cap_count=cap.count if cap is not None and capped else 0,
            attempt=record.attempts,
            person_keys=keys,
            duplicate_since=self._reentry_since(record),
        )

    def _reentry_since(self, record: SendRecord) -> datetime | None:
        """Since when another send of this flow entry to another of the
        person's ids makes this one a duplicate: the re-entry rule's, as the
        send key applies it to one id (once per key: ever; once per period:
        this period)."""
        flow = self._flows.get(record.flow_id)
        if flow is None:
            return None
        if flow.reentry is Reentry.ONCE_PER_PERIOD:
            period = flow.reentry_period.total_seconds()
            start = record.entry_time.timestamp() // period * period
            return datetime.fromtimestamp(start, UTC)
        return _EARLIEST

    async def _refused_at_handover(self, record: SendRecord, handover: HandOver, render_s: float) -> Attempt:
        if handover.exit_event is not None:
            await self._finish(record, SendStatus.CANCELLED, f"exit: {handover.exit_event}")
            return Attempt(SendOutcome.CANCELLED, "exit", render_s=render_s)
        if handover.duplicate:
            # the person had this email under another of their ids
            await self._finish(record, SendStatus.SKIPPED, "duplicate")
            return Attempt(SendOutcome.SKIPPED, "duplicate", render_s=render_s)
        if handover.suppressed:
            await self._finish(record, SendStatus.SKIPPED, f"suppressed for {record.subscription_group}")
            return Attempt(SendOutcome.SKIPPED, "suppressed", render_s=render_s)
        cap = self._policy.frequency_cap
        if handover.capped and cap is not None:
            await self._finish(
                record, SendStatus.SKIPPED, f"frequency cap: {handover.sent} sends in the last {cap.period}"
            )
            return Attempt(SendOutcome.SKIPPED, "frequency_cap", render_s=render_s)
        # No longer "sending": settled elsewhere (nothing in sendtime does that
        # while a send renders). Whatever it is now stands; say so and move on.
        log.warning("send %s was no longer sending at hand-over; left as it is", record.id)
        return Attempt(SendOutcome.SKIPPED, "not_sending", render_s=render_s)

    async def _retry_later(self, record: SendRecord, failure: TransientFailure) -> bool:
        """Schedule the send again later; True when it has had its last round."""
        detail = f"{failure.reason} (after {failure.attempts} tries)"
        if record.attempts >= self._policy.max_send_attempts:
            await self._finish(
                record,
                SendStatus.FAILED,
                f"gave up after {record.attempts} rounds: {failure.reason}",
                expect=SendStatus.RELAYING,
                attempt=(record.attempts, "failed", detail),
            )
            return True
        due = self._clock() + _RETRY_LATER_BASE * (2 ** (record.attempts - 1))
        await self._ledger.update_send(
            record.id,
            SendStatus.SCHEDULED,
            expect=SendStatus.RELAYING,
            reason=f"will retry: {failure.reason}",
            due_at=due,
            attempt=(record.attempts, "failed", detail),
        )
        self.wake(due)
        return False

    async def _finish(
        self,
        record: SendRecord,
        status: SendStatus,
        reason: str,
        *,
        expect: SendStatus = SendStatus.SENDING,
        attempt: tuple[int, str, str] | None = None,
    ) -> None:
        await self._ledger.update_send(record.id, status, expect=expect, reason=reason, attempt=attempt)


def _describe(span: Span, attempt: Attempt) -> None:
    span.set_attribute("sendtime.send.outcome", attempt.outcome)
    if attempt.reason:
        span.set_attribute("sendtime.send.reason", attempt.reason)
    if attempt.relay_tries:
        span.set_attribute("sendtime.relay.tries", attempt.relay_tries)


def _text(profile: Profile | None, trait: str) -> str:
    if profile is None:
        return ""
    stamped = profile.traits.get(trait)
    value = stamped.value if stamped is not None else None
    return value if isinstance(value, str) else ""
