"""In-memory fakes of the ports in domain/ports.py, a manual clock, and the few
other collaborators the domain services take (a relay, a template), for unit
tests of Ingestor, ProfileBook, ContentPipeline and Dispatcher that need no
sockets, no threads and no sleeps.

The fakes keep the ports' promises as the backends do (tests/contract holds
the backends to them): an append stores each message id once and plans its
sends in the same step, a claimed send counts an attempt, ``update_send``
moves a send only from the status expected, ``hand_over`` runs the last checks
and the move to "relaying" as one step. What a test wants to see or break is
public: the stored rows, the calls made, an error to raise next.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from sendtime.server.cache import CacheFetcher, MemoryCache
from sendtime.server.domain.catalog import Catalog, Product
from sendtime.server.domain.commits import AfterCommit
from sendtime.server.domain.content import ContentObserver, ContentPipeline, ContentPolicy, MissingValueError
from sendtime.server.domain.errors import NotFound, SendtimeError
from sendtime.server.domain.events import Event, EventKind, IncomingEvent, TraitsUpdate
from sendtime.server.domain.flows import (
    ANY_ENTRY,
    Flow,
    FlowPlanner,
    PlannedExit,
    PlannedSend,
)
from sendtime.server.domain.identity import IdLink, links_of
from sendtime.server.domain.ingest import Ack, IngestObserver, Ingestor
from sendtime.server.domain.ports import (
    Appended,
    CommitListener,
    CommittedRound,
    DueSends,
    HandOver,
    LastChecks,
    People,
    SendPlanner,
)
from sendtime.server.domain.profile import Profile
from sendtime.server.domain.profiles import ProfileBook
from sendtime.server.domain.recommend import Recommender
from sendtime.server.domain.sends import FINAL_STATUSES, SendRecord, SendStatus
from sendtime.server.relay.base import OutgoingEmail, RelayFailure
from tests.contract.conftest import ABANDONED_CART

_decode_profile = msgspec.msgpack.Decoder(Profile).decode


class ManualClock:
    """Time that moves only when a test moves it: ``now`` for the wall clock
    (datetimes, as the ingestor and dispatcher take it), ``monotonic`` for
    durations (seconds, as the content pipeline and the cache take it)."""

    def __init__(self, start: datetime = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)) -> None:
        self._now = start
        self._monotonic = 1_000.0

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._monotonic

    def advance(self, seconds: float) -> None:
        assert seconds >= 0, "time does not go back"
        self._now += timedelta(seconds=seconds)
        self._monotonic += seconds


# -- events --------------------------------------------------------------------


class MemoryEventStore:
    """An EventStore: each message id stored once, the round planned and the
    listener told before ``append`` returns, as a backend commit does."""

    def __init__(self, planner: SendPlanner, listener: CommitListener, ledger: MemoryLedger) -> None:
        self._planner = planner
        self._listener = listener
        self._ledger = ledger
        #: (position, event) in commit order: what is durable.
        self.log: list[tuple[int, Event]] = []
        self._seen: set[str] = set()
        self.position = 0
        #: Raised by the next appends (Overloaded, Unavailable), while set.
        self.refuse: SendtimeError | None = None
        #: Message ids whose own write fails, with why (Appended.failed).
        self.unstorable: dict[str, str] = {}
        self.appends = 0

    async def append(self, events: Sequence[Event]) -> Appended:
        self.appends += 1
        if self.refuse is not None:
            raise self.refuse
        is_new: list[bool] = []
        failed: dict[int, str] = {}
        new_events: list[Event] = []
        for index, event in enumerate(events):
            if event.message_id in self.unstorable:
                failed[index] = self.unstorable[event.message_id]
                is_new.append(False)
                continue
            new = event.message_id not in self._seen
            is_new.append(new)
            if new:
                self._seen.add(event.message_id)
                self.position += 1
                self.log.append((self.position, event))
                new_events.append(event)
        earliest_due = None
        if new_events:
            sends, exits = self._planner.plan(new_events, self._ledger.send_keys)
            earliest_due = self._ledger.apply(sends, exits)
            self._listener.committed(CommittedRound(new_events, self.position, earliest_due))
        return Appended(is_new, self.position, failed)

    async def replay_track_events(
        self, names: Sequence[str], consume: Callable[[str, str, bytes], None]
    ) -> int:
        count = 0
        for _, event in self.log:
            if event.kind.value == "track" and event.name in names:
                consume(event.profile_key, event.name, event.properties)
                count += 1
        return count


# -- profiles ------------------------------------------------------------------


class MemoryProfileStore:
    """A ProfileStore whose saved rows and position a test can read, and whose
    replay reads ``log`` (a MemoryEventStore's, or a test's own), as a backend
    replays its own event log."""

    writes_profiles_with_events = False

    def __init__(self, log: list[tuple[int, Event]] | None = None) -> None:
        self.log = log if log is not None else []
        self.rows: dict[str, bytes] = {}
        self.staged: dict[str, bytes] = {}
        self.position = 0
        #: The keys asked for by each load, in order.
        self.loads: list[list[str]] = []
        #: The (keys, position) of each save, in order.
        self.saves: list[tuple[list[str], int]] = []
        #: Raised by the next loads and saves, while set.
        self.fail_loads: Exception | None = None
        self.fail_saves: Exception | None = None
        #: Set while a load is held (a test opens it to let the load finish).
        self.hold_loads: asyncio.Event | None = None
        #: Set when a load starts (a test waits on it).
        self.loading = asyncio.Event()
        #: Saves wait for this while it is given and not set; ``saving`` is set when one starts.
        self.hold_saves: asyncio.Event | None = None
        self.saving = asyncio.Event()

    def saved(self, key: str) -> Profile | None:
        row = self.rows.get(key)
        return _decode_profile(row) if row is not None else None

    async def load_profiles(self, keys: Sequence[str]) -> dict[str, Profile]:
        self.loads.append(list(keys))
        self.loading.set()
        if self.hold_loads is not None:
            await self.hold_loads.wait()
        if self.fail_loads is not None:
            raise self.fail_loads
        return {key: _decode_profile(self.rows[key]) for key in keys if key in self.rows}

    async def load_people(self, keys: Sequence[str]) -> People:
        """An IdentityLinks over ``log``: the links its events carry (a
        backend writes them with the events), followed from ``keys``."""
        every = [link for _, event in self.log for link in links_of(event)]
        reached, links = set(keys), set[IdLink]()
        while True:
            more = {link for link in every if link.from_key in reached or link.to_key in reached} - links
            if not more:
                break
            links |= more
            reached |= {key for link in more for key in (link.from_key, link.to_key)}
        profiles = await self.load_profiles([*keys, *sorted(reached - set(keys))])
        return People(profiles, sorted(links, key=lambda link: (link.at, link.message_id)))

    async def stage_profiles(self, rows: Sequence[tuple[str, bytes]]) -> None:
        if self.fail_saves is not None:
            raise self.fail_saves
        self.staged.update(rows)

    async def save_profiles(self, rows: Sequence[tuple[str, bytes]], position: int) -> None:
        self.saving.set()
        if self.hold_saves is not None:
            await self.hold_saves.wait()
        if self.fail_saves is not None:
            self.staged.clear()  # the transaction that would have saved them rolled back
            raise self.fail_saves
        keys = [*self.staged, *(key for key, _ in rows)]
        self.rows.update(self.staged)
        self.rows.update(rows)
        self.staged.clear()
        self.position = position
        self.saves.append((keys, position))

    async def profiles_position(self) -> int:
        return self.position

    async def replay(self, after: int) -> tuple[list[Event], int]:
        return [event for position, event in self.log if position > after], max(
            (position for position, _ in self.log[-1:]), default=after
        )

    async def scan_profiles(self, after: str, limit: int) -> list[tuple[str, bytes]]:
        return sorted((key, row) for key, row in self.rows.items() if key > after)[:limit]


# -- the delivery ledger ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Suppression:
    subject: str
    group: str
    reason: str
    source: str


class MemorySuppressions:
    """A SuppressionList."""

    def __init__(self) -> None:
        self.entries: list[Suppression] = []

    async def suppress(self, subject: str, group: str, reason: str, source: str) -> bool:
        if any(s.subject == subject and s.group == group for s in self.entries):
            return False
        self.entries.append(Suppression(subject, group, reason, source))
        return True

    async def is_suppressed(self, subjects: Sequence[str], group: str) -> bool:
        return self.suppressed(subjects, group)

    def suppressed(self, subjects: Sequence[str], group: str) -> bool:
        return any(s.subject in subjects and s.group in (group, "*") for s in self.entries)

    async def unsuppress(self, subject: str, group: str, reason: str) -> bool:
        kept = [
            s for s in self.entries if not (s.subject == subject and s.group == group and s.reason == reason)
        ]
        lifted = len(kept) != len(self.entries)
        self.entries = kept
        return lifted


@dataclass(frozen=True, slots=True)
class AttemptRow:
    send_id: int
    attempt: int
    outcome: str
    detail: str


@dataclass
class MemoryLedger:
    """A DeliveryLedger and ExitLog over plain lists, on the clock a test moves."""

    clock: ManualClock
    suppressions: MemorySuppressions = field(default_factory=MemorySuppressions)
    sends: dict[int, SendRecord] = field(default_factory=dict)
    exits: list[PlannedExit] = field(default_factory=list)
    attempts: list[AttemptRow] = field(default_factory=list)
    #: Every status change, in order: (send id, status, reason).
    history: list[tuple[int, SendStatus, str]] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def until(self, done: Callable[[], bool]) -> None:
        """Returns once ``done()`` holds, looked at after every change: a
        condition, not a pause. (The guard only ends a test that would hang.)"""
        async with asyncio.timeout(30):
            while not done():
                self._changed.clear()
                await self._changed.wait()

    @property
    def send_keys(self) -> Container[str]:
        return {record.send_key for record in self.sends.values()}

    def by_key(self, send_key: str) -> SendRecord | None:
        return next((r for r in self.sends.values() if r.send_key == send_key), None)

    def apply(self, sends: Sequence[PlannedSend], exits: Sequence[PlannedExit]) -> datetime | None:
        """What an append planned, in the same step: sends scheduled once per
        key, exits written and the scheduled sends they end cancelled."""
        scheduled = [self._schedule(planned) for planned in sends if self.by_key(planned.send_key) is None]
        for exit_ in exits:
            self.exits.append(exit_)
            for record in list(self.sends.values()):
                if (
                    record.status is SendStatus.SCHEDULED
                    and record.profile_key == exit_.profile_key
                    and record.flow_id == exit_.flow_id
                    and exit_.entry_key in (record.entry_key, ANY_ENTRY)
                    and record.entry_time <= exit_.event_time
                ):
                    self._set(record, status=SendStatus.CANCELLED, reason=f"exit: {exit_.event_name}")
        return min((record.due_at for record in scheduled), default=None)

    def _schedule(self, planned: PlannedSend) -> SendRecord:
        now = self.clock.now()
        record = SendRecord(
            id=next(self._ids),
            **msgspec.structs.asdict(planned),
            status=SendStatus.SCHEDULED,
            reason="",
            attempts=0,
            relay="",
            esp_message_id="",
            template_version="",
            created_at=now,
            updated_at=now,
            accepted_at=None,
        )
        self.sends[record.id] = record
        self._changed.set()
        return record

    def _set(self, record: SendRecord, **changes: Any) -> SendRecord:
        updated = msgspec.structs.replace(record, updated_at=self.clock.now(), **changes)
        self.sends[record.id] = updated
        self._changed.set()
        if "status" in changes:
            self.history.append((record.id, updated.status, updated.reason))
        return updated

    async def schedule_send(self, planned: PlannedSend) -> SendRecord:
        return self.by_key(planned.send_key) or self._schedule(planned)

    async def claim_due(self, now: datetime, limit: int) -> DueSends:
        due = sorted(
            (r for r in self.sends.values() if r.status is SendStatus.SCHEDULED and r.due_at <= now),
            key=lambda r: r.due_at,
        )[:limit]
        claimed = [self._set(r, status=SendStatus.SENDING, attempts=r.attempts + 1) for r in due]
        waiting = [r.due_at for r in self.sends.values() if r.status is SendStatus.SCHEDULED]
        return DueSends(claimed, min(waiting, default=None))

    async def update_send(
        self,
        send_id: int,
        status: SendStatus,
        *,
        expect: SendStatus,
        reason: str = "",
        due_at: datetime | None = None,
        relay: str | None = None,
        esp_message_id: str | None = None,
        template_version: str | None = None,
        accepted_at: datetime | None = None,
        attempt: tuple[int, str, str] | None = None,
    ) -> bool:
        record = self.sends.get(send_id)
        if record is None or record.status is not expect:
            return False
        given = {
            "due_at": due_at,
            "relay": relay,
            "esp_message_id": esp_message_id,
            "template_version": template_version,
            "accepted_at": accepted_at,
        }
        changes: dict[str, Any] = {name: value for name, value in given.items() if value is not None}
        changes.update(status=status, reason=reason)
        self._set(record, **changes)
        if attempt is not None:
            self.attempts.append(AttemptRow(send_id, *attempt))
            self._changed.set()
        return True

    async def hand_over(
        self, send_id: int, *, relay: str, template_version: str, checks: LastChecks
    ) -> HandOver:
        record = self.sends[send_id]
        keys = sorted(set(checks.person_keys) | {checks.profile_key})
        others = [key for key in keys if key != checks.profile_key]
        exit_event = None
        for key in keys if checks.flow_id else ():
            exit_event = exit_event or await self.exit_since(
                key, checks.flow_id, checks.entry_key, checks.entry_time
            )
        duplicate = (
            checks.duplicate_since is not None
            and bool(checks.flow_id)
            and any(
                r.profile_key in others
                and r.flow_id == checks.flow_id
                and r.entry_key == checks.entry_key
                and r.entry_time >= checks.duplicate_since
                and r.status in (SendStatus.SENT, SendStatus.RELAYING, SendStatus.UNCERTAIN)
                for r in self.sends.values()
            )
        )
        suppressed = bool(checks.subjects) and self.suppressions.suppressed(checks.subjects, checks.group)
        sent = (
            sum(self._sent_since(key, checks.cap_since) for key in keys)
            if checks.cap_since is not None
            else 0
        )
        capped = checks.cap_since is not None and sent >= checks.cap_count
        current = record.status is SendStatus.SENDING and (
            not checks.attempt or record.attempts == checks.attempt
        )
        if current and exit_event is None and not duplicate and not suppressed and not capped:
            self._set(
                record, status=SendStatus.RELAYING, reason="", relay=relay, template_version=template_version
            )
            return HandOver(True)
        return HandOver(
            False, exit_event=exit_event, suppressed=suppressed, capped=capped, sent=sent, duplicate=duplicate
        )

    async def recover_interrupted(
        self, *, relay_idempotent: bool, now: datetime | None = None
    ) -> tuple[int, int]:
        again = unsure = 0
        for record in list(self.sends.values()):
            if record.status is SendStatus.SENDING or (
                record.status is SendStatus.RELAYING and relay_idempotent
            ):
                self._set(record, status=SendStatus.SCHEDULED, reason="interrupted")
                again += 1
            elif record.status is SendStatus.RELAYING:
                self._set(record, status=SendStatus.UNCERTAIN, reason="interrupted during relay")
                unsure += 1
        return again, unsure

    async def get_send(self, *, send_id: int | None = None, send_key: str | None = None) -> SendRecord | None:
        if send_id is not None:
            return self.sends.get(send_id)
        return self.by_key(send_key) if send_key is not None else None

    async def list_sends(
        self,
        *,
        profile_key: str | None = None,
        flow_id: str | None = None,
        limit: int = 50,
        before_id: int | None = None,
    ) -> list[SendRecord]:
        found = [
            r
            for r in sorted(self.sends.values(), key=lambda r: -r.id)
            if (profile_key is None or r.profile_key == profile_key)
            and (flow_id is None or r.flow_id == flow_id)
            and (before_id is None or r.id < before_id)
        ]
        return found[:limit]

    async def flow_counts(self) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {}
        for r in self.sends.values():
            by_status = counts.setdefault(r.flow_id, {})
            by_status[r.status.value] = by_status.get(r.status.value, 0) + 1
        return counts

    async def sent_since(self, profile_key: str, since: datetime) -> int:
        return self._sent_since(profile_key, since)

    def _sent_since(self, profile_key: str, since: datetime) -> int:
        return sum(
            1
            for r in self.sends.values()
            if r.profile_key == profile_key
            and r.subscription_group
            and r.status in (SendStatus.SENT, SendStatus.RELAYING, SendStatus.UNCERTAIN)
            and (r.accepted_at or r.updated_at) >= since
        )

    async def exit_since(self, profile_key: str, flow_id: str, entry_key: str, since: datetime) -> str | None:
        for exit_ in self.exits:
            if (
                exit_.profile_key == profile_key
                and exit_.flow_id == flow_id
                and exit_.entry_key in (entry_key, ANY_ENTRY)
                and exit_.event_time >= since
            ):
                return exit_.event_name
        return None

    def final(self) -> list[SendRecord]:
        return [r for r in self.sends.values() if r.status in FINAL_STATUSES]


# -- beyond the ports: a relay and a template --------------------------------------


class MemoryRelay:
    """A Relay (relay.base) that keeps what it was handed; ``failures`` are
    raised by the next attempts, one each, before any is accepted."""

    name = "memory"

    def __init__(self, *, idempotent: bool = False) -> None:
        self.idempotent = idempotent
        self.sent: list[OutgoingEmail] = []
        self.failures: list[RelayFailure] = []
        self.closed = False
        #: Set while an attempt is held (a test opens it to let the attempt go on).
        self.hold: asyncio.Event | None = None
        #: Told of each attempt as it starts (a test waits on it).
        self.attempting = asyncio.Event()

    async def attempt(self, email: OutgoingEmail) -> str:
        self.attempting.set()
        if self.hold is not None:
            await self.hold.wait()
        if self.failures:
            raise self.failures.pop(0)
        self.sent.append(email)
        return f"esp-{len(self.sent)}"

    async def close(self) -> None:
        self.closed = True


@dataclass(frozen=True)
class PlainEmail:
    """A RenderedEmail."""

    subject: str
    preheader: str
    html: str
    text: str
    template_id: str
    version: str
    fell_back: Sequence[str] = ()


@dataclass
class PlainTemplate:
    """An EmailTemplate that writes its blocks' data as text: what a test
    reads back is exactly what the pipeline gave it. A block named in
    ``unrenderable`` falls back as a template that cannot render it would."""

    id: str
    blocks: Mapping[str, Any]
    unrenderable: tuple[str, ...] = ()
    contexts: list[Mapping[str, Any]] = field(default_factory=list)
    #: Called as it renders (what a test makes happen meanwhile).
    on_render: Callable[[], object] | None = None

    def render(self, context: Mapping[str, Any]) -> PlainEmail:
        self.contexts.append(context)
        if self.on_render is not None:
            self.on_render()
        shown = {name: context.get(name) for name in self.blocks if name not in self.unrenderable}
        fell_back = [name for name in self.blocks if name in self.unrenderable or context.get(name) is None]
        body = f"{context['user'].get('id')}: {shown}"
        return PlainEmail(
            subject=f"for {context['user'].get('id')}",
            preheader="",
            html=f"<p>{body}</p>",
            text=body,
            template_id=self.id,
            version="v1",
            fell_back=[name for name in fell_back if name in self.blocks],
        )


class Templates:
    """A TemplateSource over PlainTemplates."""

    def __init__(self, *templates: PlainTemplate) -> None:
        self.by_id = {t.id: t for t in templates}

    def get(self, template_id: str) -> PlainTemplate:
        try:
            return self.by_id[template_id]
        except KeyError:
            raise NotFound(f"no template {template_id!r}") from None


class MemoryUpstream:
    """An UpstreamSource (domain.content) whose answers a test sets: the next
    ``answers`` in turn (an exception is raised), then ``answer`` for ever.
    Its URL names ``user.<needs>``, which the user's traits must give."""

    def __init__(
        self,
        name: str,
        *,
        answer: Any = None,
        needs: str = "",
        ttl_s: float = 60.0,
        stale_ttl_s: float = 600.0,
    ) -> None:
        self.name = name
        self.host = f"{name}.example.com"
        self.timeout_s = 1.0
        self.ttl_s = ttl_s
        self.stale_ttl_s = stale_ttl_s
        self.answer = answer
        self.answers: list[Any] = []
        self.needs = needs
        #: The URLs fetched, in order.
        self.fetched: list[str] = []
        #: Set while a fetch is held (a test opens it to let the fetch answer).
        self.hold: asyncio.Event | None = None

    def url_for(self, values: Mapping[str, str]) -> str:
        user = values["user.id"]
        if self.needs:
            if f"user.{self.needs}" not in values:
                raise MissingValueError(f"the profile has no {self.needs}")
            user = values[f"user.{self.needs}"]
        return f"https://{self.host}/v1/{user}"

    async def fetch(self, url: str, budget_s: float) -> Any:
        self.fetched.append(url)
        if self.hold is not None:
            await self.hold.wait()
        answer = self.answers.pop(0) if self.answers else self.answer
        if isinstance(answer, Exception):
            raise answer
        return answer


# -- the domain's ingest side, wired as the server wires it ------------------------


def abandoned_cart_flow(**changes: Any) -> Flow:
    """The contract suite's abandoned-cart flow, due after 30 minutes, with ``changes``."""
    return dataclasses.replace(ABANDONED_CART, **{"delay": timedelta(minutes=30), **changes})


class IngestRig:
    """Ingestor -> MemoryEventStore (planning ``flows`` into a MemoryLedger) ->
    AfterCommit -> ProfileBook over a MemoryProfileStore, on a ManualClock;
    what AfterCommit calls out to (learn, invalidate, wake) is recorded.
    ``async with`` starts and closes it as the server does."""

    def __init__(
        self, flows: Sequence[Flow] = (), *, max_cached: int = 10_000, observer: IngestObserver | None = None
    ) -> None:
        self.clock = ManualClock()
        self.ledger = MemoryLedger(self.clock)
        self.profile_store = MemoryProfileStore(log=[])
        # the flusher saves on close only: never on a timer in a test
        self.profiles = ProfileBook(
            self.profile_store, self.profile_store, max_cached=max_cached, flush_interval_s=3600
        )
        self.learned: list[str] = []
        self.invalidated: list[str] = []
        self.woken: list[datetime] = []
        #: Also told of each user whose cached content is to go (a ContentPipeline's).
        self.invalidate_user: Callable[[str], None] | None = None
        #: Also told when a commit scheduled a send (a Dispatcher's wake).
        self.wake_dispatcher: Callable[[datetime], None] | None = None
        self.after_commit = AfterCommit(
            profiles=self.profiles,
            learn=lambda events: self.learned.extend(e.message_id for e in events),
            invalidate_user=self._invalidate,
            wake_dispatcher=self._wake,
        )
        self.events = MemoryEventStore(FlowPlanner(flows), self.after_commit, self.ledger)
        self.events.log = self.profile_store.log  # replayed from what the event store keeps
        self.ingestor = Ingestor(self.events, self.after_commit, clock=self.clock.now, observer=observer)

    def _wake(self, due_at: datetime) -> None:
        self.woken.append(due_at)
        if self.wake_dispatcher is not None:
            self.wake_dispatcher(due_at)

    def _invalidate(self, profile_key: str) -> None:
        self.invalidated.append(profile_key)
        if self.invalidate_user is not None:
            self.invalidate_user(profile_key)

    async def __aenter__(self) -> IngestRig:
        await self.profiles.start()
        self.after_commit.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.after_commit.close()
        await self.profiles.close()

    async def ingest(self, *incoming: IncomingEvent) -> list[Ack]:
        return await self.ingestor.ingest(incoming)


def track(
    message_id: str, name: str, properties: Mapping[str, Any], *, user: str = "ada", **fields: Any
) -> IncomingEvent:
    return IncomingEvent(
        message_id=message_id,
        kind=EventKind.TRACK,
        user_id=user,
        name=name,
        properties=msgspec.json.encode(properties),
        **fields,
    )


def identify(
    message_id: str, *, user: str = "ada", email: str | None = "ada@example.com", **traits: Any
) -> IncomingEvent:
    """An identify call; traits TraitsUpdate names are its own, others are extra."""
    known = {name: traits.pop(name) for name in list(traits) if name in TraitsUpdate.__struct_fields__}
    return IncomingEvent(
        message_id=message_id,
        kind=EventKind.IDENTIFY,
        user_id=user,
        traits=TraitsUpdate(email=email, **known, extra=traits),
    )


def content_pipeline(
    rig: IngestRig,
    templates: Templates,
    *,
    products: Sequence[Product] = (),
    upstreams: Sequence[MemoryUpstream] = (),
    loop_lag: Callable[[], float] | None = None,
    observer: ContentObserver | None = None,
) -> tuple[ContentPipeline, CacheFetcher]:
    """A ContentPipeline over the rig's profiles and the real block cache, on
    the rig's clock; the rig's commits drop its cached blocks, as in the server.
    Close the fetcher (``aclose``) after."""
    fetcher = CacheFetcher(MemoryCache[Any](max_bytes=1 << 24, clock=rig.clock.monotonic))
    pipeline = ContentPipeline(
        profiles=rig.profiles,
        catalog=Catalog(products),
        recommender=Recommender(),
        cache=fetcher,
        upstreams={upstream.name: upstream for upstream in upstreams},
        templates=templates,
        policy=ContentPolicy(
            block_ttl_s=30,
            block_stale_ttl_s=300,
            min_fetch_s=0.005,
            cache_results=True,
            recommendations_size=4,
            recently_viewed_size=4,
            drop_out_of_stock=False,
        ),
        max_concurrent=8,
        clock=rig.clock.monotonic,
        observer=observer,
        loop_lag=loop_lag,
    )
    rig.invalidate_user = pipeline.invalidate_user
    return pipeline, fetcher
