"""Events on SQLite: appended in group commits, de-duplicated by message id.

Events are the source of truth. Each gets a rowid that only grows (its
"position"). Within a round the writer does as little Python as it can: one
multi-row INSERT per chunk (each releases the GIL once, not once per row), then
one range read of the rowids it assigned. The round's flow plan (the
SendPlanner, a pure domain step) is written in the same transaction, so a
planned send or cancellation is exactly as durable as its entry event.

One bad event never fails a round: when a round's transaction fails, each
append is written again in a transaction of its own, and an append that still
fails is written event by event, so only the event that cannot be stored is
refused (``Appended.failed``). A failure of the database itself (disk full or
broken, locked) is no event's fault: the appends it hits fail whole, for their
callers to retry.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any, Final

import msgspec

from sendtime.server.domain.errors import Overloaded, Unavailable
from sendtime.server.domain.events import Event, EventKind, IncomingEvent, TraitsUpdate, validate
from sendtime.server.domain.identity import links_of
from sendtime.server.domain.ports import Appended, CommitListener, CommittedRound, SendPlanner
from sendtime.server.store.sqlite._db import Append, SqliteDatabase, fail, resolve, transaction
from sendtime.server.store.sqlite._ledger import PlanCounts, Plans
from sendtime.server.store.sqlite._rows import chunks, encode_json, from_micros, insert_rows, micros

log = logging.getLogger("sendtime.server.store.sqlite")

EVENT_COLUMNS: Final = (
    "message_id, profile_key, user_id, anonymous_id, kind, name, event_time, received_at, ref_id, body"
)
_decode_traits = msgspec.json.Decoder(TraitsUpdate).decode


@cache
def _insert_sql(rows: int) -> str:
    marks = ",".join(["(?,?,?,?,?,?,?,?,?,?)"] * rows)
    return f"INSERT OR IGNORE INTO events ({EVENT_COLUMNS}) VALUES {marks}"  # noqa: S608 (only "?" marks)


@dataclass(slots=True)
class _Written:
    """One transaction's outcome."""

    is_new: list[bool]
    counts: PlanCounts | None
    earliest_due: datetime | None


class SqliteEventStore:
    def __init__(
        self,
        db: SqliteDatabase,
        plans: Plans,
        *,
        planner: SendPlanner,
        listener: CommitListener,
        max_queued_events: int,
    ) -> None:
        self._db = db
        self._plans = plans
        self._planner = planner
        self._listener = listener
        self._max_queued = max_queued_events
        self.queued_events = 0  # touched only on the event loop
        self.commits = 0  # the writer's
        self.events_written = 0
        self._position = db.start_position  # the writer's: last position assigned

    async def append(self, events: Sequence[Event]) -> Appended:
        if self._db.closed:
            raise Unavailable("the store is closing")
        if self.queued_events + len(events) > self._max_queued and self.queued_events:
            raise Overloaded(f"{self.queued_events} events are waiting to be stored; retry shortly")
        done: asyncio.Future[Appended] = asyncio.get_running_loop().create_future()
        self._db.append(Append(events, done, self))
        self.queued_events += len(events)
        try:
            # shield: a caller that goes away must not cancel the commit's outcome
            return await asyncio.shield(done)
        finally:
            self.queued_events -= len(events)

    async def replay_track_events(
        self, names: Sequence[str], consume: Callable[[str, str, bytes], None]
    ) -> int:
        wanted = list(names)
        return await self._db.scan(lambda conn: _replay_track(conn, wanted, consume))

    # -- the writer thread ---------------------------------------------------

    def commit_round(self, conn: sqlite3.Connection, appends: list[Append]) -> None:
        events = [event for item in appends for event in item.events]
        try:
            written = self._write(conn, events)
        except BaseException as exc:
            if isinstance(exc, Exception) and not _not_the_events_fault(exc):
                log.warning("commit of %d events failed (%r); writing each append alone", len(events), exc)
                self._commit_apart(conn, appends)
            else:
                self._fail(appends, exc, len(events))
            return
        self.commits += 1
        self.events_written += len(events)
        results = []
        start = 0
        for item in appends:
            end = start + len(item.events)
            results.append((item.done, Appended(written.is_new[start:end], self._position)))
            start = end
        new_events = [event for event, new in zip(events, written.is_new, strict=True) if new]
        counts = [] if written.counts is None else [written.counts]
        self._db.call_soon(
            self._round_done, new_events, self._position, results, written.earliest_due, counts
        )

    def _fail(self, appends: list[Append], exc: BaseException, events: int) -> None:
        log.error("commit of %d events failed", events, exc_info=exc)
        for item in appends:
            self._db.call_soon(fail, item.done, exc)

    def _commit_apart(self, conn: sqlite3.Connection, appends: list[Append]) -> None:
        """The slow path, after a round failed: each append in a transaction of
        its own, and event by event for one that fails again."""
        results: list[tuple[asyncio.Future[Appended], Appended]] = []
        new_events: list[Event] = []
        counts: list[PlanCounts] = []
        earliest: datetime | None = None
        for item in appends:
            failed: dict[int, str] = {}
            broken: BaseException | None = None  # the database itself failed
            try:
                parts = [(0, self._write(conn, list(item.events)))]
            except Exception as exc:
                parts = []
                if _not_the_events_fault(exc):
                    broken = exc
                else:
                    for index, event in enumerate(item.events):
                        try:
                            parts.append((index, self._write(conn, [event])))
                        except Exception as alone:
                            if _not_the_events_fault(alone):
                                broken = alone
                                break
                            log.warning("event %r could not be stored: %r", event.message_id, alone)
                            failed[index] = f"{type(alone).__name__}: {alone}"
                            parts.append((index, _Written([False], None, None)))
            is_new: list[bool] = []
            for first, written in parts:
                is_new += written.is_new
                # what was committed is told on, even when the append fails
                new_events += [e for e, new in zip(item.events[first:], written.is_new, strict=False) if new]
                if written.counts is not None:
                    counts.append(written.counts)
                if written.earliest_due is not None and (earliest is None or written.earliest_due < earliest):
                    earliest = written.earliest_due
            self.commits += len(parts)
            self.events_written += len(is_new)
            if broken is not None:
                self._fail([item], broken, len(item.events))
            else:
                results.append((item.done, Appended(is_new, self._position, failed)))
        self._db.call_soon(self._round_done, new_events, self._position, results, earliest, counts)

    def _round_done(
        self,
        new_events: list[Event],
        position: int,
        results: list[tuple[asyncio.Future[Appended], Appended]],
        earliest_due: datetime | None,
        counts: list[PlanCounts],
    ) -> None:
        """On the loop, in commit order: tell the listener, then answer the appends."""
        self._plans.count(counts)
        if new_events or earliest_due is not None:
            try:
                self._listener.committed(CommittedRound(new_events, position, earliest_due))
            except Exception:  # the appends below must be answered whatever happens
                log.exception("the commit listener failed")
        for done, appended in results:
            resolve(done, appended)

    def _write(self, conn: sqlite3.Connection, events: list[Event]) -> _Written:
        """One transaction: the events, then the plan for the new ones."""
        rows: list[Any] = []
        # The events of one ingest call share their arrival time.
        received_at: datetime | None = None
        received_micros = 0
        for event in events:
            payload = event.payload
            if event.received_at is not received_at:
                received_at = event.received_at
                received_micros = micros(received_at)
            rows += (
                event.message_id,
                event.profile_key,
                event.identity.user_id,
                event.identity.anonymous_id,
                event.kind.value,
                event.name,
                micros(event.timestamp),
                received_micros,
                event.previous_id or event.group_id,
                encode_json(payload) if isinstance(payload, TraitsUpdate) else event.properties,
            )
        before = self._position
        minute = int(time.time()) // 60
        counts: PlanCounts | None = None
        earliest: datetime | None = None
        try:
            with transaction(conn):
                for chunk in chunks(rows, 10):
                    conn.execute(_insert_sql(len(chunk) // 10), chunk)
                # INSERT OR IGNORE skipped the message ids seen before (and repeats
                # within the round); the positions past `before` are exactly the new ones.
                inserted = dict(
                    conn.execute("SELECT message_id, position FROM events WHERE position > ?", (before,))
                )
                last = max(inserted.values(), default=before)
                # the first occurrence in the round is the one that was inserted
                unclaimed = set(inserted)
                is_new = []
                for event in events:
                    new = event.message_id in unclaimed
                    unclaimed.discard(event.message_id)
                    is_new.append(new)
                if inserted:
                    conn.execute(
                        "INSERT INTO received_marks VALUES (?, ?)"
                        " ON CONFLICT (minute) DO UPDATE SET max_position = excluded.max_position",
                        (minute, last),
                    )
                    new_events = [e for e, new in zip(events, is_new, strict=True) if new]
                    _write_links(conn, new_events)
                    sends, exits = self._planner.plan(new_events, self._plans.known_keys)
                    counts, earliest = self._plans.apply(conn, sends, exits)
        except BaseException:
            self._plans.rolled_back()
            raise
        self._plans.committed()
        self._position = last
        return _Written(is_new, counts, earliest)


def _write_links(conn: sqlite3.Connection, events: list[Event]) -> None:
    """The links the new events carry, in their transaction."""
    rows: list[Any] = []
    for event in events:
        if event.identity.user_id:  # the common anonymous-only event carries none
            for link in links_of(event):
                rows += (link.from_key, link.to_key, link.message_id, micros(link.at))
    if rows:
        insert_rows(conn, "INSERT OR IGNORE INTO identity_links VALUES", "(?,?,?,?)", rows)


def _not_the_events_fault(exc: BaseException) -> bool:
    """Errors of the database itself (I/O, full, locked, closed): writing the
    events apart would fail the same way."""
    return isinstance(exc, sqlite3.OperationalError | sqlite3.DatabaseError) and not isinstance(
        exc, sqlite3.IntegrityError | sqlite3.DataError
    )


def replay(conn: sqlite3.Connection, after: int) -> tuple[list[Event], int]:
    """Every stored event past position ``after``, rebuilt, and the last position."""
    events = []
    last = after
    for row in conn.execute(
        f"SELECT position, {EVENT_COLUMNS} FROM events WHERE position > ? ORDER BY position",  # noqa: S608
        (after,),
    ):
        last = row[0]
        events.append(_rebuild(row[1:]))
    return events, last


def _replay_track(
    conn: sqlite3.Connection, names: list[str], consume: Callable[[str, str, bytes], None]
) -> int:
    marks = ",".join("?" * len(names))
    sql = (
        "SELECT profile_key, name, body FROM events"  # noqa: S608 (only "?" marks)
        f" WHERE kind = 'track' AND name IN ({marks}) ORDER BY position"
    )
    count = 0
    for profile_key, name, body in conn.execute(sql, names):
        consume(profile_key, name, body)
        count += 1
    return count


def _rebuild(row: tuple[Any, ...]) -> Event:
    """A stored row back into the Event it was (validated again: same rules)."""
    message_id, _key, user_id, anonymous_id, kind, name, event_time, received_at, ref_id, body = row
    event_kind = EventKind(kind)
    incoming = IncomingEvent(
        message_id=message_id,
        kind=event_kind,
        user_id=user_id,
        anonymous_id=anonymous_id,
        name=name,
        timestamp=from_micros(event_time),
        properties=b"" if event_kind is EventKind.IDENTIFY else body,
        traits=_decode_traits(body) if event_kind is EventKind.IDENTIFY else None,
        previous_id=ref_id if event_kind is EventKind.ALIAS else "",
        group_id=ref_id if event_kind is EventKind.GROUP else "",
    )
    return validate(incoming, from_micros(received_at))
