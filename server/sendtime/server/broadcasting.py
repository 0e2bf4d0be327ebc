"""Segments and broadcasts, as services over the ports.

``Segments`` keeps the named segments (``[[segments]]`` in the settings and
those made through the API), counts and samples them, and resolves a
broadcast's audience. A walk through the audience streams the stored
profiles from the store in pages (keyset order), and evaluates each page in a
worker process (``SegmentEvaluator``): the event loop only passes bytes
along, so ingest and content calls go on while a 100,000-user segment is
evaluated, and the GIL is not shared with a thread doing CPU work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

import msgspec

from sendtime.server import segment_worker
from sendtime.server.dispatch import CampaignSend
from sendtime.server.domain.broadcasts import (
    ACTIVE_STATES,
    FLOW_PREFIX,
    PARKED,
    Broadcast,
    BroadcastState,
    PlannedRecipient,
    Progress,
    SendAtKind,
    broadcast_id,
    ledger_rows,
    paced,
    planning_held,
    progress,
    replanned,
)
from sendtime.server.domain.errors import InvalidInput, NotFound
from sendtime.server.domain.events import is_known_timezone
from sendtime.server.domain.ports import BroadcastStore, ProfileStore
from sendtime.server.domain.profiles import ProfileBook
from sendtime.server.domain.segments import (
    Matches,
    Recipient,
    Segment,
    check_name,
    compile_segment,
    evaluate_batch,
)
from sendtime.server.domain.sends import SendRecord, SendStatus

log = logging.getLogger(__name__)

MAX_SAMPLE: Final = 100
#: Planning a broadcast is background work: it keeps the store's writer (its
#: ledger rows) and the page reader (its segment walk) busy at most this share
#: of the time, resting three times as long as each step took. Ingest commits
#: go through the same writer, and the steps' CPU work shares the cores with
#: ingest; 100,000 recipients are planned in 25-35 s on this machine kind,
#: well ahead of the sends that begin with the first rows (400-450 a second).
PLAN_SHARE: Final = 0.25


async def rest_after(began: float) -> None:
    """Wait so that the step that began at ``began`` (perf_counter) took
    PLAN_SHARE of the time up to the next one."""
    busy = time.perf_counter() - began
    await asyncio.sleep(busy * (1 - PLAN_SHARE) / PLAN_SHARE)


class SegmentEvaluator:
    """Evaluates a segment over pages of stored profiles: in worker processes
    (``processes`` > 0), else in a thread of this process."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None

    async def evaluate(
        self, expression: str, rows: Sequence[tuple[str, bytes]], now: datetime, keep: bool
    ) -> Matches:
        if self.processes <= 0:
            return await asyncio.to_thread(evaluate_batch, expression, rows, now, keep)
        loop = asyncio.get_running_loop()
        for _ in range(2):
            if self._pool is None:
                # spawned, not forked: a fork of a process running an event
                # loop and threads copies their locks in whatever state they are
                self._pool = ProcessPoolExecutor(
                    self.processes,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=segment_worker.started,
                    initargs=(os.getpid(),),
                )
            try:
                return await loop.run_in_executor(self._pool, evaluate_batch, expression, rows, now, keep)
            except BrokenProcessPool:
                log.warning("a segment worker process died; starting new ones")
                self._pool = None
        return await asyncio.to_thread(evaluate_batch, expression, rows, now, keep)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await asyncio.to_thread(pool.shutdown, True, cancel_futures=True)


@dataclass(slots=True)
class SegmentScan:
    """What a walk through the stored profiles found."""

    scanned: int = 0
    matched: int = 0
    recipients: list[Recipient] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    elapsed_s: float = 0.0

    def add(self, matches: Matches) -> None:
        self.scanned += matches.scanned
        self.matched += matches.matched
        if matches.recipients:
            self.recipients.extend(matches.recipients)
        self.errors += matches.errors
        if matches.first_error and not self.first_error:
            self.first_error = matches.first_error


@dataclass(frozen=True, slots=True)
class SampledUser:
    user_id: str
    anonymous_id: str
    email: str
    timezone: str


class Segments:
    def __init__(
        self,
        *,
        store: BroadcastStore,
        profiles: ProfileStore,
        book: ProfileBook,
        configured: Sequence[Segment],
        evaluator: SegmentEvaluator,
        batch: int,
        clock: Callable[[], datetime],
    ) -> None:
        self._store = store
        self._profiles = profiles
        self._book = book
        self._configured = {s.name: s for s in configured}
        self._evaluator = evaluator
        self._batch = batch
        self._clock = clock
        # a walk at a time: two at once would only share the same cores
        self._walking = asyncio.Lock()

    @staticmethod
    def check_configured(configured: Sequence[Segment]) -> None:
        """At start: every [[segments]] expression compiles (else the server does not start)."""
        for index, segment in enumerate(configured):
            compile_segment(segment.expression, field=f"segments[{index}].expression")

    async def save(self, name: str, expression: str, description: str = "") -> Segment:
        """Make or replace a segment made through the API."""
        check_name(name, field="segment.name")
        if name in self._configured:
            raise InvalidInput.field(
                "segment.name", f"{name!r} is defined in the settings ([[segments]]); change it there"
            )
        compile_segment(expression, field="segment.expression")
        segment = Segment(name=name, expression=expression.strip(), description=description, source="api")
        await self._store.save_segment(segment)
        return segment

    async def get(self, name: str) -> Segment:
        segment = self._configured.get(name) or await self._store.get_segment(name)
        if segment is None:
            raise NotFound(f"no segment named {name!r}")
        return segment

    async def all(self) -> list[Segment]:
        stored = [s for s in await self._store.list_segments() if s.name not in self._configured]
        return sorted([*self._configured.values(), *stored], key=lambda s: s.name)

    async def expression_of(self, segment: str, expression: str) -> str:
        """The expression a request means: a segment's by name, or one given
        as it is (exactly one of the two), checked."""
        if bool(segment) == bool(expression):
            raise InvalidInput.field("segment", "give either a segment name or an expression, not both")
        if segment:
            return (await self.get(segment)).expression
        return compile_segment(expression).expression

    async def count(self, segment: str, expression: str) -> SegmentScan:
        source = await self.expression_of(segment, expression)
        return await self.walk(source, self._clock(), keep=False)

    async def sample(
        self, segment: str, expression: str, limit: int
    ) -> tuple[SegmentScan, list[SampledUser]]:
        if not 0 < limit <= MAX_SAMPLE:
            raise InvalidInput.field("limit", f"must be between 1 and {MAX_SAMPLE}")
        source = await self.expression_of(segment, expression)
        scan = await self.walk(source, self._clock(), keep=True, enough=limit)
        users = []
        for recipient in scan.recipients[:limit]:
            profile = await self._book.get(recipient.profile_key)
            email = profile.traits.get("email") if profile is not None else None
            users.append(
                SampledUser(
                    recipient.user_id,
                    recipient.anonymous_id,
                    str(email.value) if email is not None else "",
                    recipient.timezone,
                )
            )
        return scan, users

    async def walk(
        self,
        expression: str,
        now: datetime,
        *,
        keep: bool,
        enough: int | None = None,
        background: bool = False,
    ) -> SegmentScan:
        """Evaluate ``expression`` over every stored profile (or until
        ``enough`` matched), a page at a time, several pages in flight; in the
        ``background`` (a broadcast's planning, nobody waiting for it), one
        page at a time and resting between pages (PLAN_SHARE)."""
        async with self._walking:
            # what the book folded but has not saved yet is part of "now"
            await self._book.save_now()
            started = time.perf_counter()
            scan = SegmentScan()
            window = 1 if background else max(2, 2 * self._evaluator.processes)
            pending: set[asyncio.Future[Matches]] = set()
            after = ""
            try:
                while True:
                    began = time.perf_counter()
                    rows = await self._profiles.scan_profiles(after, self._batch)
                    if rows:
                        after = rows[-1][0]
                        pending.add(
                            asyncio.ensure_future(self._evaluator.evaluate(expression, rows, now, keep))
                        )
                    if pending and (len(pending) >= window or not rows):
                        done, pending = await asyncio.wait(
                            pending,
                            return_when=asyncio.FIRST_COMPLETED if rows else asyncio.ALL_COMPLETED,
                        )
                        for finished in done:
                            scan.add(finished.result())
                    if not rows or (enough is not None and scan.matched >= enough):
                        break
                    if background:
                        await rest_after(began)
            finally:
                for future in pending:
                    future.cancel()
                for future in pending:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await future
            scan.elapsed_s = time.perf_counter() - started
            return scan


# -- broadcasts ------------------------------------------------------------------

#: How long a broadcast's state read from the store is trusted by the
#: dispatcher's check of each send (another replica may pause it).
_STATE_TTL_S: Final = 0.5
#: A broadcast's progress counts its ledger rows, tens of milliseconds of a
#: core at 100,000: everyone asking (a status page, CLIs watching, the API)
#: shares one count at a time, and its answer while it is this young.
PROGRESS_FRESH_S: Final = 0.5
#: Sends made and written per step while planning: the loop is free between
#: steps (making 1,000 holds it about 2 ms).
_PLAN_STEP: Final = 256
MAX_KEY_CHARS: Final = 100


@dataclass(frozen=True, slots=True)
class BroadcastRequest:
    idempotency_key: str
    template_id: str
    segment: str = ""
    expression: str = ""
    name: str = ""
    transactional: bool = False
    subscription_group: str = ""
    sender: str = ""
    #: A UTC instant (None: now, unless ``local_time``).
    send_at: datetime | None = None
    #: A wall-clock time in each user's zone, ISO without a zone ("2026-12-04T19:00").
    local_time: str = ""
    fallback_zone: str = ""
    rate_per_s: float = 0.0
    end_at: datetime | None = None
    require_blocks: tuple[str, ...] = ()


class Broadcasts:
    """Creates broadcasts, starts each at its time (resolving its audience and
    writing its ledger rows), pauses, resumes and cancels them, and answers
    the dispatcher's question about each of their sends (``Campaigns``)."""

    def __init__(
        self,
        *,
        store: BroadcastStore,
        segments: Segments,
        templates: Callable[[str], object],
        clock: Callable[[], datetime],
        default_sender: str,
        poll_interval_s: float = 1.0,
        plan_hold_s: float = 0.0,
    ) -> None:
        """``plan_hold_s``: how long a replica holds a broadcast it plans
        unless it renews the hold (a third of that apart); 0 for a server
        alone on its store, which after a restart plans again at once."""
        self._store = store
        self._segments = segments
        self._check_template = templates
        self._clock = clock
        self._default_sender = default_sender
        self._poll_s = poll_interval_s
        self._plan_hold_s = plan_hold_s
        #: This server among replicas, as a broadcast's planner.
        self.replica = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._planning: dict[str, asyncio.Task[None]] = {}
        self._states: dict[str, tuple[Broadcast, float]] = {}
        #: The last progress read of each running broadcast (for the status page).
        self.progress: dict[str, Progress] = {}
        #: Per broadcast: when its last count of ledger rows began, and the count.
        self._counts: dict[str, tuple[float, asyncio.Future[dict[tuple[str, str], int]]]] = {}

    async def start(self) -> None:
        """After a restart: a paused broadcast's rows parked, a running one's
        parked rows (a resume cut short) planned again, and a rate-limited
        one's rows paced again from now; then the loop."""
        now = self._clock()
        for broadcast in await self._store.list_broadcasts(active_only=True, limit=1000):
            if broadcast.state is BroadcastState.PAUSED:
                await self._store.park_sends(broadcast.flow_id, PARKED)
            elif broadcast.state is BroadcastState.SENDING:
                if broadcast.rate_per_s > 0:
                    # what fell due while the server was down must not all go at once
                    await self._store.park_sends(broadcast.flow_id, PARKED)
                await self._unpark(broadcast, now)
        self._task = asyncio.create_task(self._run(), name="sendtime-broadcasts")

    def wake(self) -> None:
        self._wake.set()

    async def close(self) -> None:
        self._stopping = True
        self._wake.set()
        tasks = [t for t in (self._task, *self._planning.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- the API ------------------------------------------------------------

    async def create(self, request: BroadcastRequest) -> tuple[Broadcast, bool]:
        """Make a broadcast once per idempotency key (the second time returns the first)."""
        key = request.idempotency_key
        if not key:
            raise InvalidInput.field("idempotency_key", "is required: the same key is the same broadcast")
        if len(key) > MAX_KEY_CHARS:
            raise InvalidInput.field("idempotency_key", f"is longer than {MAX_KEY_CHARS} characters")
        known = await self._store.get_broadcast(broadcast_id(key))
        if known is not None:
            return known, False
        broadcast = self._checked(request, await self._expression(request), self._clock())
        return await self._store.create_broadcast(broadcast)

    async def _expression(self, request: BroadcastRequest) -> str:
        if bool(request.segment) == bool(request.expression):
            raise InvalidInput.field("segment", "give either a segment name or an expression, not both")
        if request.segment:
            return (await self._segments.get(request.segment)).expression
        return compile_segment(request.expression).expression

    def _checked(self, request: BroadcastRequest, expression: str, now: datetime) -> Broadcast:
        if not request.template_id:
            raise InvalidInput.field("template_id", "is required")
        self._check_template(request.template_id)
        if request.transactional and request.subscription_group:
            raise InvalidInput.field(
                "subscription_group", "a transactional broadcast has no subscription group"
            )
        if request.rate_per_s < 0:
            raise InvalidInput.field("rate_limit", "must be 0 (no limit) or more")
        if request.send_at is not None and request.local_time:
            raise InvalidInput.field("local_time", "give either send_time or local_time, not both")
        kind = SendAtKind.NOW
        send_at: datetime | None = now
        local = ""
        if request.send_at is not None:
            kind, send_at = SendAtKind.INSTANT, request.send_at
        elif request.local_time:
            kind, send_at = SendAtKind.LOCAL, None
            try:
                local = datetime.fromisoformat(request.local_time).replace(tzinfo=None).isoformat()
            except ValueError:
                raise InvalidInput.field(
                    "local_time", "must be a date and time like 2026-12-04T19:00"
                ) from None
            if datetime.fromisoformat(request.local_time).tzinfo is not None:
                raise InvalidInput.field(
                    "local_time", "is a wall-clock time in each user's zone: give no offset"
                )
        fallback = request.fallback_zone or "UTC"
        if not is_known_timezone(fallback):
            raise InvalidInput.field("fallback_time_zone", f"{fallback!r} is not an IANA time zone name")
        if request.end_at is not None and send_at is not None and request.end_at <= send_at:
            raise InvalidInput.field("end_time", "must be after the send time")
        return Broadcast(
            id=broadcast_id(request.idempotency_key),
            idempotency_key=request.idempotency_key,
            name=request.name or request.idempotency_key,
            template_id=request.template_id,
            segment=request.segment,
            expression=expression,
            subscription_group="" if request.transactional else request.subscription_group or "marketing",
            sender=request.sender or self._default_sender,
            send_at_kind=kind,
            send_at=send_at,
            local_time=local,
            fallback_zone=fallback,
            rate_per_s=request.rate_per_s,
            end_at=request.end_at,
            require_blocks=request.require_blocks,
            created_at=now,
        )

    async def get(self, broadcast_id_: str) -> tuple[Broadcast, Progress]:
        broadcast = await self._store.get_broadcast(broadcast_id_)
        if broadcast is None:
            raise NotFound(f"no broadcast {broadcast_id_!r}")
        return broadcast, await self.progress_of(broadcast)

    async def list_broadcasts(self, *, active_only: bool = False, limit: int = 50) -> list[Broadcast]:
        return await self._store.list_broadcasts(active_only=active_only, limit=limit)

    async def running(self) -> list[tuple[Broadcast, Progress]]:
        """The broadcasts not done or cancelled, with their progress (as the
        loop last read it, at most a poll interval old, else read now)."""
        found = []
        for broadcast in await self._store.list_broadcasts(active_only=True, limit=50):
            known = self.progress.get(broadcast.id)
            found.append((broadcast, known if known is not None else await self.progress_of(broadcast)))
        return found

    async def progress_of(self, broadcast: Broadcast, *, fresh: bool = False) -> Progress:
        """The broadcast's progress: from a count under way or at most
        PROGRESS_FRESH_S old, unless ``fresh`` (a count begun now)."""
        known = self._counts.get(broadcast.id)
        if known is not None and not fresh:
            began, counting = known
            young = time.monotonic() - began < PROGRESS_FRESH_S
            if not counting.done() or (young and not counting.cancelled() and counting.exception() is None):
                return progress(broadcast.audience, await asyncio.shield(counting))
        counting = asyncio.ensure_future(self._store.send_counts(broadcast.flow_id))
        self._counts[broadcast.id] = (time.monotonic(), counting)
        return progress(broadcast.audience, await asyncio.shield(counting))

    def _forget_counts(self, broadcast_id_: str) -> None:
        """This server changed the broadcast or its rows: a count begun before says nothing of it."""
        self._counts.pop(broadcast_id_, None)

    async def pause(self, broadcast_id_: str) -> Broadcast:
        broadcast, _ = await self.get(broadcast_id_)
        if broadcast.state is BroadcastState.PAUSED:
            return broadcast
        paused = self._changed(broadcast, {BroadcastState.PLANNING, BroadcastState.SENDING}, "paused")
        paused = msgspec.structs.replace(paused, state=BroadcastState.PAUSED, paused_at=self._clock())
        await self._write(paused, broadcast.state)
        await self._store.park_sends(broadcast.flow_id, PARKED)
        self._forget_counts(broadcast.id)
        return paused

    async def resume(self, broadcast_id_: str) -> Broadcast:
        broadcast, _ = await self.get(broadcast_id_)
        if broadcast.state is BroadcastState.SENDING:
            return broadcast
        self._changed(broadcast, {BroadcastState.PAUSED}, "resumed")
        resumed = msgspec.structs.replace(broadcast, state=BroadcastState.SENDING, paused_at=None)
        await self._write(resumed, BroadcastState.PAUSED)
        await self._unpark(resumed, self._clock())
        self._forget_counts(broadcast.id)
        return resumed

    async def cancel(self, broadcast_id_: str) -> Broadcast:
        broadcast, _ = await self.get(broadcast_id_)
        if broadcast.state is BroadcastState.CANCELLED:
            return broadcast
        self._changed(broadcast, set(ACTIVE_STATES), "cancelled")
        cancelled = msgspec.structs.replace(
            broadcast, state=BroadcastState.CANCELLED, finished_at=self._clock(), reason="cancelled"
        )
        await self._write(cancelled, broadcast.state)
        await self._store.settle_remaining(broadcast.flow_id, SendStatus.CANCELLED, "broadcast cancelled")
        self._forget_counts(broadcast.id)
        return cancelled

    @staticmethod
    def _changed(broadcast: Broadcast, allowed: set[BroadcastState], verb: str) -> Broadcast:
        if broadcast.state not in allowed:
            raise InvalidInput.field(
                "id",
                f"broadcast {broadcast.id} is {broadcast.state.value}: it cannot be {verb}",
                reason="FAILED_PRECONDITION",
            )
        return broadcast

    async def _write(self, broadcast: Broadcast, expect: BroadcastState) -> None:
        if not await self._store.update_broadcast(broadcast, expect=[expect]):
            raise InvalidInput.field(
                "id", f"broadcast {broadcast.id} changed meanwhile; ask again", reason="ABORTED"
            )
        self._states[broadcast.id] = (broadcast, time.monotonic())

    async def _unpark(self, broadcast: Broadcast, now: datetime) -> None:
        parked = await self._store.parked_sends(broadcast.flow_id, PARKED)
        if parked:
            await self._store.reschedule_sends(replanned(broadcast, parked, now))

    # -- what the dispatcher asks ----------------------------------------------

    async def campaign_send(self, record: SendRecord, now: datetime) -> CampaignSend | None:
        if not record.flow_id.startswith(FLOW_PREFIX):
            return None
        broadcast = await self._state(record.flow_id.removeprefix(FLOW_PREFIX))
        if broadcast is None:
            return CampaignSend(stop=(SendStatus.CANCELLED, "broadcast not found", "cancelled"))
        rules = CampaignSend(sender=broadcast.sender, require_blocks=broadcast.require_blocks)
        if broadcast.state is BroadcastState.CANCELLED:
            return CampaignSend(stop=(SendStatus.CANCELLED, "broadcast cancelled", "cancelled"))
        if broadcast.state is BroadcastState.PAUSED:
            return CampaignSend(hold_until=PARKED)
        if broadcast.end_at is not None and now >= broadcast.end_at:
            return CampaignSend(stop=(SendStatus.SKIPPED, "past the broadcast's end time", "ended"))
        return rules

    async def _state(self, broadcast_id_: str) -> Broadcast | None:
        known = self._states.get(broadcast_id_)
        if known is not None and time.monotonic() - known[1] < _STATE_TTL_S:
            return known[0]
        broadcast = await self._store.get_broadcast(broadcast_id_)
        if broadcast is not None:
            self._states[broadcast_id_] = (broadcast, time.monotonic())
        return broadcast

    # -- the loop ------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            timeout = self._poll_s
            try:
                timeout = min(timeout, await self._look())
            except Exception:
                log.exception("looking at the broadcasts failed; again shortly")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(timeout, 0.01))

    async def _look(self) -> float:
        """Start what is due, finish what is done; returns when to look again."""
        now = self._clock()
        again = self._poll_s
        for broadcast in await self._store.list_broadcasts(active_only=True, limit=1000):
            state = broadcast.state
            if state in (BroadcastState.SCHEDULED, BroadcastState.PLANNING):
                if broadcast.id in self._planning:
                    continue
                # due to start, or planned by nobody now (its planner's hold ran
                # out), or this replica's planning that failed: again now
                begins = (
                    broadcast.start_at() if state is BroadcastState.SCHEDULED else broadcast.plan_held_until
                )
                if begins is None or begins <= now or broadcast.planner == self.replica:
                    task = asyncio.create_task(self._plan(broadcast), name=f"plan-{broadcast.id}")
                    self._planning[broadcast.id] = task
                    task.add_done_callback(self._planned)
                else:
                    again = min(again, (begins - now).total_seconds())
            elif state is BroadcastState.SENDING:
                if broadcast.end_at is not None and now >= broadcast.end_at:
                    await self._store.settle_remaining(
                        broadcast.flow_id, SendStatus.SKIPPED, "past the broadcast's end time"
                    )
                # counted now: a count shared from before planning ended could
                # find nothing left to send among the rows planned by then
                current = await self.progress_of(broadcast, fresh=True)
                self.progress[broadcast.id] = current
                if current.finished:
                    done = msgspec.structs.replace(broadcast, state=BroadcastState.DONE, finished_at=now)
                    if await self._store.update_broadcast(done, expect=[BroadcastState.SENDING]):
                        self.progress.pop(broadcast.id, None)
                        self._forget_counts(broadcast.id)
                        log.info("broadcast %s done: %s", broadcast.id, current)
            elif state is BroadcastState.PAUSED:
                self.progress[broadcast.id] = await self.progress_of(broadcast)
        return again

    def _planned(self, task: asyncio.Task[None]) -> None:
        for key, running in list(self._planning.items()):
            if running is task:
                del self._planning[key]

    async def _hold(self, broadcast_id_: str) -> Broadcast | None:
        """This replica's hold on planning the broadcast, taken or renewed (None: another has it)."""
        return await self._store.change_broadcast(
            broadcast_id_,
            lambda stored: planning_held(
                stored, holder=self.replica, now=self._clock(), hold_s=self._plan_hold_s
            ),
        )

    async def _keep_holding(self, broadcast_id_: str) -> None:
        """Renews the hold a third of its time apart; returns when another
        replica holds it (this one stalled longer than the hold)."""
        while True:
            await asyncio.sleep(self._plan_hold_s / 3)
            if await self._hold(broadcast_id_) is None:
                current = await self._store.get_broadcast(broadcast_id_)
                if current is None or current.planner != self.replica:
                    return
                # still this replica's (planned by now): nothing to renew

    async def _plan(self, broadcast: Broadcast) -> None:
        """Hold the broadcast for planning (one replica plans it), then plan
        it; stop if the hold is lost (taken over after a stall)."""
        planning = await self._hold(broadcast.id)
        if planning is None:
            return  # another replica plans it, or it was cancelled
        if self._plan_hold_s <= 0:
            await self._plan_held(planning)
            return
        keeping = asyncio.create_task(self._keep_holding(broadcast.id), name=f"hold-{broadcast.id}")
        work = asyncio.ensure_future(self._plan_held(planning))
        try:
            await asyncio.wait({keeping, work}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (keeping, work):
                task.cancel()
            await asyncio.gather(keeping, return_exceptions=True)
        if not work.done() or work.cancelled():
            log.warning("broadcast %s: another replica holds its planning now; this one stops", broadcast.id)
            await asyncio.gather(work, return_exceptions=True)
            return
        work.result()

    async def _plan_held(self, planning: Broadcast) -> None:
        """Resolve the audience once and write one ledger row per recipient."""
        broadcast, now = planning, self._clock()
        try:
            scan = await self._segments.walk(broadcast.expression, now, keep=True, background=True)
            ordered = await _by_moment(planning, scan.recipients, now)
            due = paced([base for base, _ in ordered], broadcast.rate_per_s)
            for start in range(0, len(ordered), _PLAN_STEP):
                began = time.perf_counter()
                step = [
                    PlannedRecipient(r.profile_key, r.user_id, r.anonymous_id, base)
                    for base, r in ordered[start : start + _PLAN_STEP]
                ]
                await self._store.add_recipients(
                    ledger_rows(planning, step, due[start : start + _PLAN_STEP], now)
                )
                if start + _PLAN_STEP < len(ordered):
                    await rest_after(began)
        except Exception:
            log.exception("planning broadcast %s failed; it is planned again at the next look", broadcast.id)
            await asyncio.sleep(self._poll_s)
            raise
        current = await self._store.get_broadcast(broadcast.id)
        if current is None:
            return
        planned = msgspec.structs.replace(
            current, audience=scan.matched, segment_errors=scan.errors, planned_at=self._clock()
        )
        if current.state is BroadcastState.PLANNING:
            planned = msgspec.structs.replace(planned, state=BroadcastState.SENDING)
        await self._store.update_broadcast(planned, expect=[current.state])
        self._forget_counts(broadcast.id)
        # paused or cancelled while it was planned: the rows written since follow
        if current.state is BroadcastState.PAUSED:
            await self._store.park_sends(broadcast.flow_id, PARKED)
        elif current.state is BroadcastState.CANCELLED:
            await self._store.settle_remaining(broadcast.flow_id, SendStatus.CANCELLED, "broadcast cancelled")
        log.info(
            "broadcast %s planned: %d recipients of %d profiles in %.1f s",
            broadcast.id,
            scan.matched,
            scan.scanned,
            scan.elapsed_s,
        )


async def _by_moment(
    broadcast: Broadcast, recipients: Sequence[Recipient], now: datetime
) -> list[tuple[datetime, Recipient]]:
    """The recipients in order of their moment (each with it). Few distinct
    moments (one per time zone), so grouping orders them without sorting the
    audience, and the moment is worked out once per zone; a slice at a time,
    with the loop free between slices."""
    moments: dict[str, datetime] = {}
    buckets: dict[datetime, list[tuple[datetime, Recipient]]] = {}
    for start in range(0, len(recipients), _PLAN_STEP):
        for r in recipients[start : start + _PLAN_STEP]:
            base = moments.get(r.timezone)
            if base is None:
                base = moments[r.timezone] = broadcast.base_time(r.timezone, now)
            buckets.setdefault(base, []).append((base, r))
        await asyncio.sleep(0)
    return [item for base in sorted(buckets) for item in buckets[base]]
