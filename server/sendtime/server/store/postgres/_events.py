"""Events on PostgreSQL: group commit, de-duplication by a unique constraint,
profiles folded under a row lock in the events' transaction, the flow plan in
the same transaction, and a NOTIFY that tells the other replicas.

One round at a time per replica (commit order is the order its listener is
told): while a round commits, the appends that arrive queue, and the next
round takes them all, so ingest is a few round trips per round, not per event.

A round, in one transaction of four round trips (BEGIN, two statements,
COMMIT; one statement more when it schedules sends whose keys are new):
1. first statement: ``message_ids`` INSERT ... ON CONFLICT DO NOTHING
   RETURNING (the ids it returns are new, across every replica: the
   constraint decides, not a cache); the new events, one multi-row INSERT
   (arrays through unnest); their users' profile rows that exist, locked in
   key order and read (FOR UPDATE: two replicas folding one user wait for
   each other, never lose an update; key order: no deadlock);
2. in Python: the profiles folded (domain.profile.fold, by event time: the
   same profile whatever order events arrive in) and the SendPlanner's plan;
3. the sends whose keys are new (send_keys, then sends, one statement);
4. last statement: the exits recorded and the sends they end cancelled; the
   folded profiles written back, the rows of users not seen before inserted;
   the identity links the events carry (domain.identity.links_of);
   pg_notify (delivered at commit): the touched users (and the ids the
   round linked) and the earliest due send, for the other replicas.

A user not seen before has no row to lock. If another replica inserts that
user's row while this round folds, this round's insert of it returns nothing:
the round is rolled back and written again, and then finds the row to lock
(``_ProfileRace``; it folds onto the other's profile, never over it).

A round whose transaction fails on an event's data is written again append by
append, then event by event, as on SQLite: only the bad event is refused. A
deadlock (it should not happen; rows are locked in key order) retries the round.

Waits between replicas: only on the same message id (a retried event sent to
two replicas at once) or the same user's row; unique-index checks on distinct
keys never wait. (A measurement that saw each writer waiting a quarter of its
time in the first statement was the load generator sending every id twice.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Final

import asyncpg
import msgspec

from sendtime.server.domain.errors import Overloaded, Unavailable
from sendtime.server.domain.events import Event, EventKind, IncomingEvent, TraitsUpdate, validate
from sendtime.server.domain.identity import links_of
from sendtime.server.domain.ports import Appended, CommitListener, CommittedRound, SendPlanner
from sendtime.server.domain.profile import Profile, fold
from sendtime.server.store.postgres._ledger import PlanCounts, Plans, exit_columns, exits_sql

log = logging.getLogger("sendtime.server.store.postgres")

COMMITS_CHANNEL: Final = "sendtime_commits"
#: NOTIFY payloads must stay under 8,000 bytes.
_MAX_NOTIFY_BYTES: Final = 7000
_MAX_ROUND_EVENTS: Final = 5000
#: Rounds one replica has in flight at once. One keeps the commit order the
#: listener is told plain. Four (each on its own connection) measured no better
#: on this 2-core machine (171 vs 175 batches/s with one process, 142 vs 209
#: with two: more lock waits and database CPU, 86% against 77%).
_ROUNDS_IN_FLIGHT: Final = 1
_DEADLOCK_RETRIES: Final = 3

_encode = msgspec.msgpack.Encoder().encode
_decode_profile = msgspec.msgpack.Decoder(Profile).decode
_encode_json = msgspec.json.Encoder().encode
_decode_traits = msgspec.json.Decoder(TraitsUpdate).decode

# A round's first statement: the new ids (in id order: concurrent rounds take
# the same locks in the same order), their events, and their users' profile
# rows that exist, locked (in key order: no deadlock) and read. The rows are
# locked after the events are written (they read ``ev``). Rows of users not
# seen before are inserted by the last statement.
_INSERT_AND_LOCK: Final = (
    "WITH v AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],"
    " $7::timestamptz[], $8::timestamptz[], $9::text[], $10::bytea[])"
    " AS v(profile_key, message_id, user_id, anonymous_id, kind, name, event_time, received_at, ref_id, body)),"
    " new AS (INSERT INTO message_ids SELECT message_id, received_at FROM v ORDER BY message_id"
    " ON CONFLICT DO NOTHING RETURNING message_id),"
    " ev AS (INSERT INTO events (profile_key, message_id, user_id, anonymous_id, kind, name, event_time,"
    " received_at, ref_id, body) SELECT v.* FROM v JOIN new USING (message_id) RETURNING profile_key, message_id),"
    " locked AS (SELECT profile_key, doc FROM profiles WHERE profile_key IN (SELECT profile_key FROM ev)"
    " ORDER BY profile_key FOR UPDATE OF profiles)"
    " SELECT message_id, NULL::text AS profile_key, NULL::bytea AS doc FROM ev"
    " UNION ALL SELECT NULL, profile_key, doc FROM locked"
)
_EXITED, _CANCELLED = exits_sql(5)
# A round's last statement: its exits (recorded; the scheduled sends they end
# cancelled), the folded profiles written (the new users' rows inserted; one
# that another replica inserted meanwhile returns nothing, and the round is
# written again), the identity links its events carry, and the NOTIFY for the
# other replicas, sent at commit.
_FINISH: Final = (
    f"WITH {_EXITED}, {_CANCELLED},"  # noqa: S608 (only $n marks)
    " linked AS (INSERT INTO identity_links SELECT * FROM"
    " unnest($13::text[], $14::text[], $15::text[], $16::timestamptz[]) ON CONFLICT DO NOTHING),"
    " added AS (INSERT INTO profiles SELECT * FROM unnest($1::text[], $2::bytea[]) ORDER BY 1"
    " ON CONFLICT DO NOTHING RETURNING 1),"
    " written AS (UPDATE profiles SET doc = v.doc FROM unnest($3::text[], $4::bytea[]) AS v(k, doc)"
    " WHERE profile_key = v.k RETURNING 1),"
    " notified AS (SELECT pg_notify($11, payload) FROM unnest($12::text[]) AS payload)"
    " SELECT 'cancelled', flow_id FROM cancelled UNION ALL SELECT 'notified', NULL FROM notified"
    " UNION ALL SELECT 'added', NULL FROM added"
)


class _ProfileRace(Exception):
    """A user this round took for new got a row from another replica meanwhile."""


@dataclass(slots=True)
class _Append:
    events: Sequence[Event]
    done: asyncio.Future[Appended]


@dataclass(slots=True)
class _Written:
    is_new: list[bool]
    counts: PlanCounts | None
    earliest_due: datetime | None
    profiles: dict[str, Profile]


class PostgresEventStore:
    def __init__(
        self,
        pool: asyncpg.Pool,
        plans: Plans,
        *,
        planner: SendPlanner,
        listener: CommitListener,
        max_queued_events: int,
        replica: str,
    ) -> None:
        self._pool = pool
        self._plans = plans
        self._planner = planner
        self._listener = listener
        self._max_queued = max_queued_events
        self._replica = replica
        self._pending: list[_Append] = []
        self._writers: set[asyncio.Task[None]] = set()
        #: The writer's own connection, kept between rounds (a pool round trip saved each).
        self._conn: asyncpg.Connection | None = None
        self.closed = False
        self.queued_events = 0
        self.commits = 0
        self.events_written = 0
        #: The Appended.position of this replica's rounds: how many of them stored
        #: new events (a local count that its acks wait for; not the events
        #: table's ``position`` column, which every replica's rounds share).
        self._rounds_told = 0

    async def append(self, events: Sequence[Event]) -> Appended:
        if self.closed:
            raise Unavailable("the store is closing")
        if self.queued_events + len(events) > self._max_queued and self.queued_events:
            raise Overloaded(f"{self.queued_events} events are waiting to be stored; retry shortly")
        done: asyncio.Future[Appended] = asyncio.get_running_loop().create_future()
        self._pending.append(_Append(events, done))
        self.queued_events += len(events)
        if len(self._writers) < _ROUNDS_IN_FLIGHT:
            writer = asyncio.create_task(self._write_rounds(), name="sendtime-pg-writer")
            self._writers.add(writer)
            writer.add_done_callback(self._writers.discard)
        try:
            return await asyncio.shield(done)
        finally:
            self.queued_events -= len(events)

    async def replay_track_events(
        self, names: Sequence[str], consume: Callable[[str, str, bytes], None]
    ) -> int:
        count = 0
        async with self._pool.acquire() as conn, conn.transaction():
            async for row in conn.cursor(
                "SELECT profile_key, name, body FROM events WHERE kind = 'track' AND name = ANY($1::text[])"
                " ORDER BY position",
                list(names),
                prefetch=2000,
            ):
                consume(row[0], row[1], bytes(row[2]))
                count += 1
        return count

    async def close(self) -> None:
        """Commit what was handed over, then refuse more."""
        self.closed = True
        if self._writers:
            await asyncio.shield(asyncio.gather(*self._writers))
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await self._pool.release(conn)

    # -- rounds ----------------------------------------------------------------

    async def _write_rounds(self) -> None:
        """One of up to _ROUNDS_IN_FLIGHT loops, each taking whatever queued
        while it committed. Rounds of one replica are told to the listener in
        the order their commits returned (their positions); two rounds for
        one user are ordered by that user's row lock in the database."""
        while self._pending:
            take, size = 0, 0
            while take < len(self._pending) and (take == 0 or size < _MAX_ROUND_EVENTS):
                size += len(self._pending[take].events)
                take += 1
            appends, self._pending = self._pending[:take], self._pending[take:]
            await self._commit_round(appends)

    async def _commit_round(self, appends: list[_Append]) -> None:
        events = [event for item in appends for event in item.events]
        try:
            written = await self._write(events)
        except Exception as exc:
            if len(events) > 1 and _events_fault(exc):
                log.warning("commit of %d events failed (%r); writing each append alone", len(events), exc)
                await self._commit_apart(appends)
            else:
                log.error("commit of %d events failed", len(events), exc_info=exc)
                for item in appends:
                    _fail(item.done, exc if isinstance(exc, Exception) else Unavailable(str(exc)))
            return
        if any(written.is_new):  # a position that nobody is told of would never settle
            self._rounds_told += 1
        self.commits += 1
        self.events_written += len(events)
        results = []
        start = 0
        for item in appends:
            end = start + len(item.events)
            results.append((item.done, Appended(written.is_new[start:end], self._rounds_told)))
            start = end
        new_events = [e for e, new in zip(events, written.is_new, strict=True) if new]
        counts = [] if written.counts is None else [written.counts]
        self._round_done(new_events, results, written.earliest_due, counts, written.profiles)

    async def _commit_apart(self, appends: list[_Append]) -> None:
        results: list[tuple[asyncio.Future[Appended], Appended]] = []
        new_events: list[Event] = []
        counts: list[PlanCounts] = []
        profiles: dict[str, Profile] = {}
        earliest: datetime | None = None
        for item in appends:
            failed: dict[int, str] = {}
            broken: Exception | None = None
            parts: list[tuple[int, _Written]] = []
            try:
                parts.append((0, await self._write(list(item.events))))
            except Exception as exc:
                if not _events_fault(exc):
                    broken = exc
                else:
                    for index, event in enumerate(item.events):
                        try:
                            parts.append((index, await self._write([event])))
                        except Exception as alone:
                            if not _events_fault(alone):
                                broken = alone
                                break
                            log.warning("event %r could not be stored: %r", event.message_id, alone)
                            failed[index] = f"{type(alone).__name__}: {alone}"
                            parts.append((index, _Written([False], None, None, {})))
            is_new: list[bool] = []
            for first, written in parts:
                is_new += written.is_new
                new_events += [e for e, new in zip(item.events[first:], written.is_new, strict=False) if new]
                profiles.update(written.profiles)
                if written.counts is not None:
                    counts.append(written.counts)
                if written.earliest_due is not None and (earliest is None or written.earliest_due < earliest):
                    earliest = written.earliest_due
            self.commits += len(parts)
            self.events_written += len(is_new)
            if broken is not None:
                _fail(item.done, broken)
            else:
                results.append((item.done, Appended(is_new, 0, failed)))
        if new_events:
            self._rounds_told += 1
        results = [(done, replace(appended, position=self._rounds_told)) for done, appended in results]
        self._round_done(new_events, results, earliest, counts, profiles)

    def _round_done(
        self,
        new_events: list[Event],
        results: list[tuple[asyncio.Future[Appended], Appended]],
        earliest_due: datetime | None,
        counts: list[PlanCounts],
        profiles: dict[str, Profile],
    ) -> None:
        self._plans.count(counts)
        if new_events or earliest_due is not None:
            try:
                self._listener.committed(
                    CommittedRound(new_events, self._rounds_told, earliest_due, profiles)
                )
            except Exception:
                log.exception("the commit listener failed")
        for done, appended in results:
            if not done.done():
                done.set_result(appended)

    async def _write(self, events: list[Event]) -> _Written:
        for attempt in range(_DEADLOCK_RETRIES):
            try:
                return await self._write_once(events)
            except (asyncpg.DeadlockDetectedError, _ProfileRace) as exc:
                if attempt == _DEADLOCK_RETRIES - 1:
                    raise
                log.warning("writing a round again: %s", exc)
        raise AssertionError("unreachable")

    async def _write_once(self, events: list[Event]) -> _Written:
        """One transaction in four round trips (five when it schedules sends
        not seen before): BEGIN; the new ids, their events and their users'
        rows locked and read; the new sends; the exits, the folded profiles
        and the NOTIFY; COMMIT."""
        firsts: dict[str, Event] = {}
        for event in events:
            firsts.setdefault(event.message_id, event)
        unique = list(firsts.values())
        if self._conn is None:
            self._conn = await self._pool.acquire()
        conn = self._conn
        try:
            async with conn.transaction():
                inserted: set[str] = set()
                docs: dict[str, bytes] = {}
                for message_id, key, doc in await conn.fetch(_INSERT_AND_LOCK, *_event_columns(unique)):
                    if message_id is None:
                        docs[key] = doc
                    else:
                        inserted.add(message_id)
                is_new = []
                for event in events:  # the first occurrence in the round is the new one
                    new = event.message_id in inserted
                    inserted.discard(event.message_id)
                    is_new.append(new)
                new_events = [e for e, new in zip(events, is_new, strict=True) if new]
                if not new_events:
                    return _Written(is_new, None, None, {})
                keys = sorted({e.profile_key for e in new_events})
                profiles = {key: _decode_profile(docs[key]) if docs.get(key) else Profile() for key in keys}
                for event in new_events:
                    fold(profiles[event.profile_key], event)
                sends, exits = self._planner.plan(new_events, self._plans.known_keys)
                now = datetime.now(UTC)
                scheduled, earliest = await self._plans.insert_sends(conn, self._plans.fresh(sends), now)
                links = _link_columns(new_events)
                added = [key for key in keys if key not in docs]
                kept = [key for key in keys if key in docs]
                cancelled: dict[str, int] = {}
                rows_added = 0
                for what, flow_id in await conn.fetch(
                    _FINISH,
                    added,
                    [_encode(profiles[key]) for key in added],
                    kept,
                    [_encode(profiles[key]) for key in kept],
                    *exit_columns(exits, now),
                    COMMITS_CHANNEL,
                    # the newly linked ids too: what another replica holds of their person is stale
                    _notices(self._replica, sorted({*keys, *links[0]}), earliest),
                    *links,
                ):
                    if what == "added":
                        rows_added += 1
                    elif what == "cancelled":
                        cancelled[flow_id] = cancelled.get(flow_id, 0) + 1
                if rows_added != len(added):
                    raise _ProfileRace(
                        f"{len(added) - rows_added} new users' profiles were written elsewhere"
                    )
        except (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError):
            # a broken connection goes back to the pool (which drops it); the next round takes another
            self._conn = None
            await self._pool.release(conn)
            raise
        self._plans.committed(sends)
        return _Written(is_new, (scheduled, cancelled), earliest, profiles)


def _notices(replica: str, keys: list[str], due: datetime | None) -> list[str]:
    """What the other replicas are told (delivered when the transaction
    commits), in payloads under PostgreSQL's limit: "replica|due micros or
    empty|key<RS>key..." (RS: the record separator, 0x1e)."""
    head = f"{replica}|{'' if due is None else int(due.timestamp() * 1_000_000)}|"
    payloads: list[str] = []
    batch: list[str] = []
    size = len(head)
    for key in keys:
        if batch and size + len(key.encode()) + 1 > _MAX_NOTIFY_BYTES:
            payloads.append(head + "\x1e".join(batch))
            batch, size = [], len(head)
        batch.append(key)
        size += len(key.encode()) + 1
    if batch:
        payloads.append(head + "\x1e".join(batch))
    return payloads


def _link_columns(events: list[Event]) -> list[list[Any]]:
    """The links the events carry, as columns: from, to, message id, time."""
    links = [link for e in events if e.identity.user_id for link in links_of(e)]
    return [
        [link.from_key for link in links],
        [link.to_key for link in links],
        [link.message_id for link in links],
        [link.at for link in links],
    ]


def _event_columns(events: list[Event]) -> list[list[Any]]:
    return [
        [e.profile_key for e in events],
        [e.message_id for e in events],
        [e.identity.user_id for e in events],
        [e.identity.anonymous_id for e in events],
        [e.kind.value for e in events],
        [e.name for e in events],
        [e.timestamp for e in events],
        [e.received_at for e in events],
        [e.previous_id or e.group_id for e in events],
        [_encode_json(e.payload) if isinstance(e.payload, TraitsUpdate) else e.properties for e in events],
    ]


def _events_fault(exc: BaseException) -> bool:
    """The event's data broke the write (not the database or the connection)."""
    if isinstance(exc, asyncpg.PostgresError):
        return isinstance(exc, asyncpg.DataError | asyncpg.IntegrityConstraintViolationError)
    return not isinstance(exc, OSError | asyncpg.InterfaceError | asyncio.TimeoutError) and isinstance(
        exc, Exception
    )


def _fail(done: asyncio.Future[Appended], exc: Exception) -> None:
    if not done.done():
        done.set_exception(exc)


async def replay(pool: asyncpg.Pool, after: int) -> tuple[list[Event], int]:
    """Every stored event past ``after`` (a global position), rebuilt."""
    events: list[Event] = []
    last = after
    async with pool.acquire() as conn:
        for row in await conn.fetch(
            "SELECT position, message_id, user_id, anonymous_id, kind, name, event_time, received_at, ref_id,"
            " body FROM events WHERE position > $1 ORDER BY position",
            after,
        ):
            last = row[0]
            events.append(_rebuild(row))
    return events, last


def _rebuild(row: Any) -> Event:
    _position, message_id, user_id, anonymous_id, kind, name, event_time, received_at, ref_id, body = row
    event_kind = EventKind(kind)
    body = bytes(body)
    incoming = IncomingEvent(
        message_id=message_id,
        kind=event_kind,
        user_id=user_id,
        anonymous_id=anonymous_id,
        name=name,
        timestamp=event_time,
        properties=b"" if event_kind is EventKind.IDENTIFY else body,
        traits=_decode_traits(body) if event_kind is EventKind.IDENTIFY else None,
        previous_id=ref_id if event_kind is EventKind.ALIAS else "",
        group_id=ref_id if event_kind is EventKind.GROUP else "",
    )
    return validate(incoming, received_at)
