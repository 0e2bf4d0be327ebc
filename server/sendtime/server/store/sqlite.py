"""The embedded store: SQLite in WAL mode, written by one thread with group commit.

Why one writer thread: SQLite allows one writer at a time anyway, and a thread
that owns the write connection can take every batch that queued up while the
previous commit was running and make them durable in one transaction (group
commit). Many concurrent streams then cost one fsync per round, not one per
event, and blocking I/O never runs on the event loop.

Events are the source of truth. Each gets a rowid that only grows (its
"position"); profiles are folded from events in memory (domain.profiles) and
written back here in batches together with the position they include, so a
restart replays only the events after it. Within a round the writer does as
little Python as it can: one multi-row INSERT per chunk (each releases the
GIL once, not once per row), then one range read of the rowids it assigned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import msgspec

from sendtime.server.domain.catalog import Product
from sendtime.server.domain.errors import Overloaded, Unavailable
from sendtime.server.domain.events import Event, EventKind, IncomingEvent, TraitsUpdate, validate
from sendtime.server.domain.flows import FlowPlanner, PlannedExit, PlannedSend
from sendtime.server.domain.ports import Appended
from sendtime.server.domain.profile import Profile
from sendtime.server.domain.sends import SendRecord, SendStatus

log = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 2
SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS events (
    position     INTEGER PRIMARY KEY AUTOINCREMENT,  -- only grows, even after purges
    message_id   TEXT NOT NULL UNIQUE,
    profile_key  TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    anonymous_id TEXT NOT NULL,
    kind         TEXT NOT NULL,
    name         TEXT NOT NULL,
    event_time   INTEGER NOT NULL,  -- microseconds since the epoch, UTC
    received_at  INTEGER NOT NULL,
    ref_id       TEXT NOT NULL,     -- alias: previous_id; group: group_id
    body         BLOB NOT NULL      -- properties JSON; for identify, the traits JSON
);
-- The last position received in each minute, so purging old events needs no
-- index on received_at (an index would cost every insert).
CREATE TABLE IF NOT EXISTS received_marks (
    minute       INTEGER PRIMARY KEY,
    max_position INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS profiles (
    profile_key TEXT PRIMARY KEY,
    doc         BLOB NOT NULL       -- msgpack of domain.profile.Profile
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS catalog (
    product_id TEXT PRIMARY KEY,
    doc        BLOB NOT NULL        -- JSON of domain.catalog.Product
) WITHOUT ROWID;
-- The delivery ledger: one row per send, keyed by its idempotency key.
CREATE TABLE IF NOT EXISTS sends (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    send_key           TEXT NOT NULL UNIQUE,
    flow_id            TEXT NOT NULL,
    template_id        TEXT NOT NULL,
    profile_key        TEXT NOT NULL,
    user_id            TEXT NOT NULL,
    anonymous_id       TEXT NOT NULL,
    entry_key          TEXT NOT NULL,
    entry_message_id   TEXT NOT NULL,
    entry_time         INTEGER NOT NULL,
    received_at        INTEGER NOT NULL,
    due_at             INTEGER NOT NULL,
    status             TEXT NOT NULL,
    reason             TEXT NOT NULL DEFAULT '',
    attempts           INTEGER NOT NULL DEFAULT 0,
    relay              TEXT NOT NULL DEFAULT '',
    esp_message_id     TEXT NOT NULL DEFAULT '',
    template_version   TEXT NOT NULL DEFAULT '',
    subscription_group TEXT NOT NULL,
    created_at         INTEGER NOT NULL,
    updated_at         INTEGER NOT NULL,
    accepted_at        INTEGER
);
CREATE INDEX IF NOT EXISTS sends_due ON sends (status, due_at);
CREATE INDEX IF NOT EXISTS sends_by_profile ON sends (profile_key, flow_id);
CREATE INDEX IF NOT EXISTS sends_by_flow ON sends (flow_id, id);
-- Every relay attempt, as it happened.
CREATE TABLE IF NOT EXISTS send_attempts (
    send_id     INTEGER NOT NULL,
    attempt     INTEGER NOT NULL,
    at          INTEGER NOT NULL,
    outcome     TEXT NOT NULL,
    detail      TEXT NOT NULL,
    PRIMARY KEY (send_id, attempt, outcome)
) WITHOUT ROWID;
-- Exit events, for the last check before relay.
CREATE TABLE IF NOT EXISTS flow_exits (
    profile_key TEXT NOT NULL,
    flow_id     TEXT NOT NULL,
    entry_key   TEXT NOT NULL,  -- '*': every entry of the flow
    event_time  INTEGER NOT NULL,
    event_name  TEXT NOT NULL,
    PRIMARY KEY (profile_key, flow_id, entry_key, event_time)
) WITHOUT ROWID;
-- Who gets no more marketing: subject is "u:<id>", "a:<id>" or "email:<address>".
CREATE TABLE IF NOT EXISTS suppressions (
    subject     TEXT NOT NULL,
    grp         TEXT NOT NULL,  -- a subscription group, or '*' for every one
    reason      TEXT NOT NULL,
    source      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (subject, grp)
) WITHOUT ROWID;
"""
_EVENT_COLUMNS: Final = (
    "message_id, profile_key, user_id, anonymous_id, kind, name, event_time, received_at, ref_id, body"
)
#: Rows per multi-row statement: at most 14 variables a row (sends), under SQLite's 32,766.
_ROWS_PER_INSERT: Final = 1000
_PROFILES_POSITION: Final = "profiles_position"
_MAX_KNOWN_SEND_KEYS: Final = 500_000

Synchronous = Literal["full", "normal"]

_encode_json = msgspec.json.Encoder().encode
_decode_product = msgspec.json.Decoder(Product).decode
_decode_profile = msgspec.msgpack.Decoder(Profile).decode
_decode_traits = msgspec.json.Decoder(TraitsUpdate).decode
_T = TypeVar("_T")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def _micros(moment: datetime) -> int:
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _from_micros(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


@cache
def _insert_sql(rows: int) -> str:
    marks = ",".join(["(?,?,?,?,?,?,?,?,?,?)"] * rows)
    return f"INSERT OR IGNORE INTO events ({_EVENT_COLUMNS}) VALUES {marks}"  # noqa: S608 (only "?" marks)


@dataclass(slots=True)
class _Append:
    events: Sequence[Event]
    done: asyncio.Future[Appended]


@dataclass(slots=True)
class _Work:
    """Any other write, run in the writer thread between rounds. ``run`` must
    not open a transaction: consecutive works share one (group commit), each
    in a savepoint of its own so one failing does not undo the others."""

    run: Callable[[sqlite3.Connection], Any]
    done: asyncio.Future[Any]


@dataclass(slots=True)
class _Stats:
    commits: int = 0
    events: int = 0
    last_purge: float = field(default_factory=time.monotonic)


class StoreStats(msgspec.Struct, frozen=True):
    commits: int
    """Rounds of appended events committed."""
    events: int
    """Events written (duplicates included: the INSERT skips them)."""
    queued_events: int
    """Events handed to the writer and not yet durable."""
    scheduled: dict[str, int]
    """Sends scheduled, by flow id ("" for sends asked for through the API)."""
    cancelled: dict[str, int]
    """Scheduled sends cancelled by an exit event as it was stored, by flow id."""


#: Sends scheduled and cancelled by flow id, in one transaction.
_PlanCounts = tuple[dict[str, int], dict[str, int]]


_STOP: Final = object()

#: Told, on the event loop and in commit order, of each round's new events and
#: the position they reach, before any of the round's appends return.
CommitListener = Callable[[list[Event], int], None]


class SqliteStore:
    """Events, profiles and catalog on SQLite. Create with ``await SqliteStore.open(...)``."""

    def __init__(
        self,
        path: Path,
        *,
        synchronous: Synchronous,
        dedupe_retention: timedelta,
        max_queued_events: int,
        cache_mib: int,
    ) -> None:
        self.path = path
        self._synchronous = synchronous
        self._retention = dedupe_retention
        self._max_queued = max_queued_events
        self._cache_mib = cache_mib
        self._queue: queue.SimpleQueue[_Append | _Work | object] = queue.SimpleQueue()
        self._queued_events = 0  # touched only on the event loop
        self._closed = False
        self._stats = _Stats()
        self._writer = threading.Thread(target=self._run_writer, name="sendtime-sqlite-writer", daemon=True)
        self._writer_ready = threading.Event()
        self._writer_error: BaseException | None = None
        self._reader: sqlite3.Connection | None = None
        self._reader_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._position = 0  # the writer's: last position assigned
        self.on_commit: CommitListener | None = None
        #: Plans flow sends and exits for each round's new events, in its transaction.
        self.planner: FlowPlanner | None = None
        #: Told (on the loop) of the earliest due time a round scheduled.
        self.on_scheduled: Callable[[datetime], None] | None = None
        self._earliest_due: datetime | None = None  # the writer's, per round
        # The writer's: send keys known to be in the ledger, and those the
        # transaction in progress adds (they count only once it commits).
        self._known_send_keys: set[str] = set()
        self._pending_send_keys: set[str] = set()
        # Counted on the loop, from what committed rounds and writes report.
        self._scheduled: dict[str, int] = {}
        self._cancelled: dict[str, int] = {}

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        synchronous: Synchronous = "full",
        dedupe_retention: timedelta = timedelta(days=7),
        max_queued_events: int = 100_000,
        cache_mib: int = 128,
    ) -> SqliteStore:
        store = cls(
            path,
            synchronous=synchronous,
            dedupe_retention=dedupe_retention,
            max_queued_events=max_queued_events,
            cache_mib=cache_mib,
        )
        store._loop = asyncio.get_running_loop()
        await asyncio.to_thread(store._start)
        return store

    # -- the event loop side -------------------------------------------------

    async def append(self, events: Sequence[Event]) -> Appended:
        if self._closed:
            raise Unavailable("the store is closing")
        if self._queued_events + len(events) > self._max_queued and self._queued_events:
            raise Overloaded(f"{self._queued_events} events are waiting to be stored; retry shortly")
        done: asyncio.Future[Appended] = asyncio.get_running_loop().create_future()
        self._queued_events += len(events)
        self._queue.put(_Append(events, done))
        try:
            # shield: a caller that goes away must not cancel the commit's outcome
            return await asyncio.shield(done)
        finally:
            self._queued_events -= len(events)

    def stats(self) -> StoreStats:
        return StoreStats(
            commits=self._stats.commits,
            events=self._stats.events,
            queued_events=self._queued_events,
            scheduled=dict(self._scheduled),
            cancelled=dict(self._cancelled),
        )

    def _count_plan(self, counts: _PlanCounts) -> None:
        """On the loop, once the transaction that made them committed."""
        for totals, added in zip((self._scheduled, self._cancelled), counts, strict=True):
            for flow_id, count in added.items():
                if count:
                    totals[flow_id] = totals.get(flow_id, 0) + count

    async def _submit(self, run: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._closed:
            raise Unavailable("the store is closed")
        done: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
        self._queue.put(_Work(run, done))
        return await done

    async def save_profiles(self, rows: Sequence[tuple[str, bytes]], position: int) -> None:
        """Write folded profiles and the position they include, in one transaction."""

        flat = [value for row in rows for value in row]

        def save(conn: sqlite3.Connection) -> None:
            # Multi-row statements, not executemany: that lets go of the GIL for
            # every row, and each time a busy loop may keep the writer waiting.
            _insert_rows(
                conn,
                "INSERT INTO profiles VALUES",
                "(?,?)",
                flat,
                tail=" ON CONFLICT (profile_key) DO UPDATE SET doc = excluded.doc",
            )
            conn.execute(
                "INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (_PROFILES_POSITION, position),
            )

        await self._submit(save)

    async def load_profiles(self, keys: Sequence[str]) -> dict[str, Profile]:
        return await asyncio.to_thread(self._with_reader, _select_profiles, list(keys))

    async def profiles_position(self) -> int:
        return await asyncio.to_thread(self._with_reader, _select_meta, _PROFILES_POSITION)

    async def replay(self, after: int) -> tuple[list[Event], int]:
        """Every stored event past position ``after``, rebuilt, and the last position."""
        return await asyncio.to_thread(self._replay, after)

    async def save_products(self, products: Sequence[Product]) -> None:
        """Keep catalog updates across restarts."""
        rows = [(p.id, _encode_json(p)) for p in products]

        def save(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO catalog VALUES (?, ?) ON CONFLICT (product_id) DO UPDATE SET doc = excluded.doc",
                rows,
            )

        await self._submit(save)

    async def load_products(self) -> list[Product]:
        rows = await asyncio.to_thread(self._with_reader, _select_catalog, None)
        return [_decode_product(doc) for (doc,) in rows]

    async def replay_track_events(
        self, names: Sequence[str], consume: Callable[[str, str, bytes], None]
    ) -> int:
        """Call ``consume(profile_key, name, properties)`` for every stored track
        event with one of ``names``, oldest first, in a worker thread. Only for
        start-up, before anything else uses what ``consume`` feeds."""
        return await asyncio.to_thread(self._replay_track, list(names), consume)

    # -- the delivery ledger ---------------------------------------------------

    async def claim_due(self, now: datetime, limit: int) -> DueSends:
        """Mark up to ``limit`` due sends as being sent (durably) and return
        them, with the earliest due time of those still scheduled: one trip
        through the writer tells the dispatcher both what to send and when to look again."""
        at = _micros(now)

        def claim(conn: sqlite3.Connection) -> DueSends:
            rows = conn.execute(
                f"UPDATE sends SET status = 'sending', attempts = attempts + 1, updated_at = ?"  # noqa: S608
                f" WHERE id IN (SELECT id FROM sends WHERE status = 'scheduled' AND due_at <= ?"
                f" ORDER BY due_at LIMIT ?) RETURNING {_SEND_COLUMNS}",
                (at, at, limit),
            ).fetchall()
            return DueSends([_send(row) for row in rows], _select_next_due(conn, None))

        return await self._submit(claim)

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
        """Move a send from ``expect`` to ``status`` (False if it was not in
        ``expect`` any more, e.g. an exit cancelled it), with an attempt row."""
        now = _micros(datetime.now(UTC))
        sets = ["status = ?", "reason = ?", "updated_at = ?"]
        values: list[Any] = [status.value, reason, now]
        for column, value in (
            ("due_at", None if due_at is None else _micros(due_at)),
            ("relay", relay),
            ("esp_message_id", esp_message_id),
            ("template_version", template_version),
            ("accepted_at", None if accepted_at is None else _micros(accepted_at)),
        ):
            if value is not None:
                sets.append(f"{column} = ?")
                values.append(value)

        def update(conn: sqlite3.Connection) -> bool:
            changed = conn.execute(
                f"UPDATE sends SET {', '.join(sets)} WHERE id = ? AND status = ?",  # noqa: S608 (fixed names)
                (*values, send_id, expect.value),
            ).rowcount
            if changed and attempt is not None:
                conn.execute(
                    "INSERT OR REPLACE INTO send_attempts VALUES (?, ?, ?, ?, ?)",
                    (send_id, *attempt[:1], now, *attempt[1:]),
                )
            return bool(changed)

        return await self._submit(update)

    async def hand_over(
        self, send_id: int, *, relay: str, template_version: str, checks: LastChecks
    ) -> HandOver:
        """The last step before the ESP gets the message, in one transaction:
        run ``checks`` and, when none stops the send, move it from "sending"
        to "relaying". The writer stores exit events and suppressions too, so
        none committed before this is missed, and one committed after it
        comes too late to matter. The checks are conditions of the UPDATE
        itself (one statement: the writer thread takes the GIL back once);
        only a send they stop is looked at again, to say why."""
        now = _micros(datetime.now(UTC))
        exit_args = (checks.profile_key, checks.flow_id, checks.entry_key, _micros(checks.entry_time))
        subjects = list(checks.subjects) if checks.group else []
        cap_since = None if checks.cap_since is None else _micros(checks.cap_since)
        conditions = ["id = ?", "status = 'sending'"]
        values: list[Any] = [relay, template_version, now, send_id]
        if checks.flow_id:
            conditions.append(f"NOT EXISTS ({_EXIT_SQL})")
            values += (checks.profile_key, checks.flow_id, exit_args[3], checks.entry_key)
        if subjects:
            conditions.append(f"NOT EXISTS ({_suppressed_sql(len(subjects))})")
            values += (*subjects, checks.group)
        if cap_since is not None:
            conditions.append(f"({_SENT_SINCE_SQL}) < ?")
            values += (checks.profile_key, cap_since, checks.cap_count)
        sql = (
            "UPDATE sends SET status = 'relaying', reason = '', relay = ?, template_version = ?,"  # noqa: S608
            f" updated_at = ? WHERE {' AND '.join(conditions)}"
        )

        def hand(conn: sqlite3.Connection) -> HandOver:
            if conn.execute(sql, values).rowcount:
                return HandOver(True)
            exit_event = _select_exit(conn, exit_args) if checks.flow_id else None
            suppressed = bool(subjects) and _select_suppressed(conn, (subjects, checks.group))
            sent = _select_sent_since(conn, (checks.profile_key, cap_since)) if cap_since is not None else 0
            capped = cap_since is not None and sent >= checks.cap_count
            return HandOver(False, exit_event=exit_event, suppressed=suppressed, capped=capped, sent=sent)

        return await self._submit(hand)

    async def recover_interrupted(self, *, relay_idempotent: bool) -> tuple[int, int]:
        """After a crash: sends claimed but never handed to the ESP go back to
        scheduled; those that may have reached it are retried only when the ESP
        de-duplicates by our key, else marked uncertain. Returns (rescheduled, uncertain)."""
        now = _micros(datetime.now(UTC))

        def recover(conn: sqlite3.Connection) -> tuple[int, int]:
            again = conn.execute(
                "UPDATE sends SET status = 'scheduled', reason = 'interrupted before relay', updated_at = ?"
                " WHERE status = 'sending'",
                (now,),
            ).rowcount
            if relay_idempotent:
                again += conn.execute(
                    "UPDATE sends SET status = 'scheduled', reason = 'interrupted during relay; the ESP"
                    " de-duplicates by key', updated_at = ? WHERE status = 'relaying'",
                    (now,),
                ).rowcount
                unsure = 0
            else:
                unsure = conn.execute(
                    "UPDATE sends SET status = 'uncertain', reason = 'interrupted while the ESP had it;"
                    " not resent, to never send twice', updated_at = ? WHERE status = 'relaying'",
                    (now,),
                ).rowcount
            return again, unsure

        return await self._submit(recover)

    async def schedule_send(self, planned: PlannedSend) -> SendRecord:
        """A send asked for through the API: scheduled once per key."""

        def schedule(conn: sqlite3.Connection) -> tuple[SendRecord, _PlanCounts]:
            counts = self._apply_plan(conn, [planned], [])
            row = conn.execute(
                f"SELECT {_SEND_COLUMNS} FROM sends WHERE send_key = ?",  # noqa: S608
                (planned.send_key,),
            ).fetchone()
            return _send(row), counts

        record, counts = await self._submit(schedule)
        self._count_plan(counts)
        if self.on_scheduled is not None:
            self.on_scheduled(planned.due_at)
        return record

    async def suppress(self, subject: str, group: str, reason: str, source: str) -> bool:
        """Add a suppression; False when it was already there."""

        def add(conn: sqlite3.Connection) -> bool:
            return bool(
                conn.execute(
                    "INSERT OR IGNORE INTO suppressions VALUES (?, ?, ?, ?, ?)",
                    (subject, group, reason, source, _micros(datetime.now(UTC))),
                ).rowcount
            )

        return await self._submit(add)

    async def unsuppress(self, subject: str, group: str, reason: str) -> bool:
        """Lift a suppression given for ``reason`` (a resubscribe lifts an
        unsubscribe, never a bounce); False when there was none."""

        def lift(conn: sqlite3.Connection) -> bool:
            return bool(
                conn.execute(
                    "DELETE FROM suppressions WHERE subject = ? AND grp = ? AND reason = ?",
                    (subject, group, reason),
                ).rowcount
            )

        return await self._submit(lift)

    async def is_suppressed(self, subjects: Sequence[str], group: str) -> bool:
        return await asyncio.to_thread(self._with_reader, _select_suppressed, (list(subjects), group))

    async def sent_since(self, profile_key: str, since: datetime) -> int:
        """Marketing sends to this user since ``since`` that count against
        frequency caps: accepted, or handed to the ESP and not yet answered."""
        return await asyncio.to_thread(self._with_reader, _select_sent_since, (profile_key, _micros(since)))

    async def get_send(self, *, send_id: int | None = None, send_key: str | None = None) -> SendRecord | None:
        return await asyncio.to_thread(self._with_reader, _select_send, (send_id, send_key))

    async def list_sends(
        self,
        *,
        profile_key: str | None = None,
        flow_id: str | None = None,
        limit: int = 50,
        before_id: int | None = None,
    ) -> list[SendRecord]:
        return await asyncio.to_thread(
            self._with_reader, _select_sends, (profile_key, flow_id, limit, before_id)
        )

    async def flow_counts(self) -> dict[str, dict[str, int]]:
        return await asyncio.to_thread(self._with_reader, _select_flow_counts, None)

    async def close(self) -> None:
        """Commit everything queued so far, then close."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        await asyncio.to_thread(self._writer.join)
        with self._reader_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    # -- threads ---------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute(f"PRAGMA cache_size = -{self._cache_mib * 1024}")
        return conn

    def _start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer.start()
        self._writer_ready.wait()
        if self._writer_error is not None:
            raise self._writer_error
        self._reader = self._connect()

    def _run_writer(self) -> None:
        try:
            conn = self._connect()
            conn.execute("PRAGMA journal_mode = WAL")
            # FULL: an acked event survives power loss, not only a crash of
            # this process; group commit keeps the fsync cost per round.
            conn.execute(f"PRAGMA synchronous = {self._synchronous.upper()}")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise Unavailable(
                    f"{self.path} has schema version {version}; this sendtime needs {SCHEMA_VERSION}"
                )
            conn.executescript(SCHEMA)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._position = conn.execute("SELECT coalesce(max(position), 0) FROM events").fetchone()[0]
        except BaseException as exc:  # reported to open()
            self._writer_error = exc
            self._writer_ready.set()
            return
        self._writer_ready.set()
        try:
            self._writer_loop(conn)
        finally:
            conn.close()

    def _writer_loop(self, conn: sqlite3.Connection) -> None:
        stopping = False
        while not stopping:
            try:
                first = self._queue.get(timeout=30.0)
            except queue.Empty:
                self._maybe_purge(conn)
                continue
            appends: list[_Append] = []
            works: list[_Work] = []
            for item in self._drain(first):
                if item is _STOP:
                    stopping = True  # finish this round first
                elif isinstance(item, _Append):
                    if works:  # keep the order the loop asked in
                        self._run_works(conn, works)
                        works = []
                    appends.append(item)
                elif isinstance(item, _Work):
                    if appends:
                        self._commit_round(conn, appends)
                        appends = []
                    works.append(item)
            if appends:
                self._commit_round(conn, appends)
            if works:
                self._run_works(conn, works)
            self._maybe_purge(conn)

    def _drain(self, first: _Append | _Work | object) -> list[_Append | _Work | object]:
        items = [first]
        with contextlib.suppress(queue.Empty):
            while len(items) < 1000:
                items.append(self._queue.get_nowait())
        return items

    def _run_works(self, conn: sqlite3.Connection, works: list[_Work]) -> None:
        """Consecutive writes in one transaction (one fsync), each in a savepoint;
        their callers hear back only after the commit."""
        outcomes: list[tuple[_Work, Any, BaseException | None]] = []
        try:
            with _transaction(conn):
                for work in works:
                    conn.execute("SAVEPOINT work")
                    try:
                        result = work.run(conn)
                    except Exception as exc:
                        conn.execute("ROLLBACK TO work")
                        conn.execute("RELEASE work")
                        self._pending_send_keys.clear()  # forgetting is always safe
                        log.exception("a store write failed")
                        outcomes.append((work, None, exc))
                    else:
                        conn.execute("RELEASE work")
                        outcomes.append((work, result, None))
        except BaseException as exc:
            self._pending_send_keys.clear()
            log.exception("committing %d store writes failed", len(works))
            for work in works:
                self._call_soon(_fail, work.done, exc)
            return
        self._remember_send_keys()
        for work, result, error in outcomes:
            if error is not None:
                self._call_soon(_fail, work.done, error)
            else:
                self._call_soon(_resolve, work.done, result)

    def _call_soon(self, callback: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(callback, *args)

    def _commit_round(self, conn: sqlite3.Connection, appends: list[_Append]) -> None:
        events = [event for item in appends for event in item.events]
        try:
            is_new, counts = self._write(conn, events)
        except BaseException as exc:
            self._earliest_due = None
            self._pending_send_keys.clear()
            log.exception("commit of %d events failed", len(events))
            for item in appends:
                self._call_soon(_fail, item.done, exc)
            return
        self._stats.commits += 1
        self._stats.events += len(events)
        new_events = [event for event, new in zip(events, is_new, strict=True) if new]
        earliest_due, self._earliest_due = self._earliest_due, None
        results = []
        start = 0
        for item in appends:
            end = start + len(item.events)
            results.append((item.done, Appended(is_new[start:end], self._position)))
            start = end
        self._call_soon(self._round_done, new_events, self._position, results, earliest_due, counts)

    def _round_done(
        self,
        new_events: list[Event],
        position: int,
        results: list[tuple[asyncio.Future[Appended], Appended]],
        earliest_due: datetime | None,
        counts: _PlanCounts | None,
    ) -> None:
        """On the loop, in commit order: tell the listeners, then answer the appends."""
        if counts is not None:
            self._count_plan(counts)
        if new_events and self.on_commit is not None:
            try:
                self.on_commit(new_events, position)
            except Exception:
                log.exception("the commit listener failed")
        if earliest_due is not None and self.on_scheduled is not None:
            try:
                self.on_scheduled(earliest_due)
            except Exception:  # the appends below must be answered whatever happens
                log.exception("the schedule listener failed")
        for done, appended in results:
            _resolve(done, appended)

    def _write(self, conn: sqlite3.Connection, events: list[Event]) -> tuple[list[bool], _PlanCounts | None]:
        rows: list[Any] = []
        # The events of one ingest call share their arrival time.
        received_at: datetime | None = None
        received_micros = 0
        for event in events:
            payload = event.payload
            if event.received_at is not received_at:
                received_at = event.received_at
                received_micros = _micros(received_at)
            rows += (
                event.message_id,
                event.profile_key,
                event.identity.user_id,
                event.identity.anonymous_id,
                event.kind.value,
                event.name,
                _micros(event.timestamp),
                received_micros,
                event.previous_id or event.group_id,
                _encode_json(payload) if isinstance(payload, TraitsUpdate) else event.properties,
            )
        before = self._position
        minute = int(time.time()) // 60
        counts: _PlanCounts | None = None
        with _transaction(conn):
            for start in range(0, len(events), _ROWS_PER_INSERT):
                chunk = rows[start * 10 : (start + _ROWS_PER_INSERT) * 10]
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
                if self.planner is not None:
                    new_events = [e for e, new in zip(events, is_new, strict=True) if new]
                    counts = self._apply_plan(conn, *self.planner.plan(new_events, self._known_send_keys))
        self._remember_send_keys()
        self._position = last
        return is_new, counts

    def _remember_send_keys(self) -> None:
        """After a commit: the keys it scheduled exist now (bounded memory)."""
        if len(self._known_send_keys) + len(self._pending_send_keys) > _MAX_KNOWN_SEND_KEYS:
            self._known_send_keys.clear()
        self._known_send_keys.update(self._pending_send_keys)
        self._pending_send_keys.clear()

    def _apply_plan(
        self, conn: sqlite3.Connection, sends: list[PlannedSend], exits: list[PlannedExit]
    ) -> _PlanCounts:
        """Schedule and cancel in the transaction of the events that caused it;
        returns how many were scheduled and cancelled, by flow.

        Set-based, a few statements per flow and round rather than one or two
        per event: each statement lets go of the GIL, and a busy event loop can
        then keep the writer waiting for it (up to the switch interval)."""
        now = _micros(datetime.now(UTC))
        scheduled: dict[str, int] = {}
        cancelled: dict[str, int] = {}
        # Most entries repeat a key that is already scheduled (every view of a
        # browse-abandonment week, every add to one cart): skip those without
        # touching SQLite. A send row is never deleted, so a key known to exist
        # stays true; keys become "known" only once their transaction commits.
        fresh: dict[str, PlannedSend] = {}
        for planned in sends:
            if planned.send_key not in self._known_send_keys:
                fresh.setdefault(planned.send_key, planned)
        sends = list(fresh.values())
        self._pending_send_keys.update(fresh)
        if sends:
            for flow_id, rows in _by_flow(sends, _send_row, now).items():
                scheduled[flow_id] = _insert_rows(conn, _SCHEDULE_SQL, _SCHEDULE_MARKS, rows)
            earliest = min(p.due_at for p in sends)
            if self._earliest_due is None or earliest < self._earliest_due:
                self._earliest_due = earliest
        if exits:
            _insert_rows(conn, "INSERT OR IGNORE INTO flow_exits VALUES", "(?,?,?,?,?)", _exit_rows(exits))
            for flow_id, rows in _by_flow(exits, _cancel_row, 0).items():
                cancelled[flow_id] = sum(
                    conn.execute(_cancel_sql(len(chunk) // 4), (now, *chunk, flow_id)).rowcount
                    for chunk in _chunks(rows, 4, _ROWS_PER_INSERT)
                )
        return scheduled, cancelled

    def _maybe_purge(self, conn: sqlite3.Connection) -> None:
        """Forget events older than the dedupe retention, once a minute. Never
        those the saved profiles do not include yet: a restart replays them."""
        if time.monotonic() - self._stats.last_purge < 60.0:
            return
        self._stats.last_purge = time.monotonic()
        cutoff_minute = int((datetime.now(UTC) - self._retention).timestamp()) // 60
        with _transaction(conn):
            row = conn.execute(
                "SELECT max(max_position) FROM received_marks WHERE minute < ?", (cutoff_minute,)
            ).fetchone()
            saved = _select_meta(conn, _PROFILES_POSITION)
            if row[0] is None:
                return
            through = min(row[0], saved)
            deleted = conn.execute("DELETE FROM events WHERE position <= ?", (through,)).rowcount
            conn.execute("DELETE FROM received_marks WHERE minute < ?", (cutoff_minute,))
        if deleted:
            log.info("forgot %d events older than the dedupe retention", deleted)

    def _with_reader(self, work: Callable[[sqlite3.Connection, Any], _T], arg: Any) -> _T:
        with self._reader_lock:
            if self._reader is None:
                raise Unavailable("the store is closed")
            return work(self._reader, arg)

    def _replay(self, after: int) -> tuple[list[Event], int]:
        conn = self._connect()  # its own connection: a long read must not hold the reader lock
        try:
            events = []
            last = after
            for row in conn.execute(
                f"SELECT position, {_EVENT_COLUMNS} FROM events WHERE position > ? ORDER BY position",  # noqa: S608
                (after,),
            ):
                last = row[0]
                events.append(_rebuild(row[1:]))
            return events, last
        finally:
            conn.close()

    def _replay_track(self, names: list[str], consume: Callable[[str, str, bytes], None]) -> int:
        conn = self._connect()
        try:
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
        finally:
            conn.close()


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Any:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


_SCHEDULE_SQL: Final = (
    "INSERT OR IGNORE INTO sends (send_key, flow_id, template_id, profile_key, user_id, anonymous_id,"
    " entry_key, entry_message_id, entry_time, received_at, due_at, status, subscription_group,"
    " created_at, updated_at) VALUES"
)
_SCHEDULE_MARKS: Final = "(?,?,?,?,?,?,?,?,?,?,?,'scheduled',?,?,?)"
_Planned = TypeVar("_Planned", PlannedSend, PlannedExit)


def _send_row(p: PlannedSend, now: int) -> tuple[Any, ...]:
    return (
        p.send_key,
        p.flow_id,
        p.template_id,
        p.profile_key,
        p.user_id,
        p.anonymous_id,
        p.entry_key,
        p.entry_message_id,
        _micros(p.entry_time),
        _micros(p.received_at),
        _micros(p.due_at),
        p.subscription_group,
        now,
        now,
    )


def _cancel_row(exit_: PlannedExit, _now: int) -> tuple[Any, ...]:
    return (exit_.profile_key, exit_.entry_key, _micros(exit_.event_time), exit_.event_name)


def _exit_rows(exits: list[PlannedExit]) -> list[Any]:
    rows: list[Any] = []
    for e in exits:
        rows += (e.profile_key, e.flow_id, e.entry_key, _micros(e.event_time), e.event_name)
    return rows


def _by_flow(
    planned: list[_Planned], row: Callable[[_Planned, int], tuple[Any, ...]], now: int
) -> dict[str, list[Any]]:
    """Flat statement parameters per flow, in the order planned."""
    flat: dict[str, list[Any]] = {}
    for item in planned:
        flat.setdefault(item.flow_id, []).extend(row(item, now))
    return flat


def _chunks(flat: list[Any], width: int, rows: int) -> Iterator[list[Any]]:
    step = width * rows
    for start in range(0, len(flat), step):
        yield flat[start : start + step]


def _insert_rows(conn: sqlite3.Connection, head: str, marks: str, flat: list[Any], tail: str = "") -> int:
    """One multi-row INSERT per chunk of ``flat`` (a row's values one after
    another); returns how many rows it inserted."""
    width = marks.count("?")
    inserted = 0
    for chunk in _chunks(flat, width, _ROWS_PER_INSERT):
        sql = f"{head} {','.join([marks] * (len(chunk) // width))}{tail}"
        inserted += conn.execute(sql, chunk).rowcount
    return inserted


@cache
def _cancel_sql(rows: int) -> str:
    """Cancel the scheduled sends of one flow that any of ``rows`` exits ends:
    same profile, entered no later than the exit, same entry key or any. Named
    after the first such exit of the round, as one statement per exit would
    (SQLite takes a bare column beside min() from the row with the minimum).
    Driven from the exits (CROSS JOIN fixes that order: SQLite would rather
    scan the flow's sends), each looking up its profile's sends by index.
    Exits are (seq, profile_key, entry_key, event_time, event_name) rows; no
    WITH clause, for Python's sqlite3 reports no rowcount for one."""
    values = ",".join(f"({n},?,?,?,?)" for n in range(rows))
    return (
        "UPDATE sends SET status = 'cancelled', updated_at = ?, reason = 'exit: ' || first.event_name"  # noqa: S608
        " FROM (SELECT sends.id AS id, min(exits.column1), exits.column5 AS event_name"
        f" FROM (VALUES {values}) AS exits CROSS JOIN sends"  # only numbers and "?" marks
        " ON sends.profile_key = exits.column2 AND sends.flow_id = ?"
        " WHERE sends.status = 'scheduled' AND sends.entry_time <= exits.column4"
        " AND exits.column3 IN ('*', sends.entry_key) GROUP BY sends.id) AS first"
        " WHERE sends.id = first.id"
    )


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
        timestamp=_from_micros(event_time),
        properties=b"" if event_kind is EventKind.IDENTIFY else body,
        traits=_decode_traits(body) if event_kind is EventKind.IDENTIFY else None,
        previous_id=ref_id if event_kind is EventKind.ALIAS else "",
        group_id=ref_id if event_kind is EventKind.GROUP else "",
    )
    return validate(incoming, _from_micros(received_at))


def _select_profiles(conn: sqlite3.Connection, keys: list[str]) -> dict[str, Profile]:
    found: dict[str, Profile] = {}
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        marks = ",".join("?" * len(chunk))
        sql = f"SELECT profile_key, doc FROM profiles WHERE profile_key IN ({marks})"  # noqa: S608
        found.update((key, _decode_profile(doc)) for key, doc in conn.execute(sql, chunk))
    return found


def _select_meta(conn: sqlite3.Connection, key: str) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return int(row[0]) if row else 0


@dataclass(frozen=True, slots=True)
class DueSends:
    #: Claimed: now "sending", attempts counted.
    records: list[SendRecord]
    #: The earliest due time of the sends still scheduled (None: there are none).
    next_due: datetime | None


@dataclass(frozen=True, slots=True)
class LastChecks:
    """What must still hold when a send is handed to the ESP."""

    profile_key: str
    #: No exit event of this flow entry since its entry time (flow_id "": none to look for).
    flow_id: str
    entry_key: str
    entry_time: datetime
    #: None of ``subjects`` suppressed for ``group`` (no subjects: not checked).
    group: str
    subjects: Sequence[str]
    #: Fewer than ``cap_count`` marketing sends since ``cap_since`` (None: no cap).
    cap_since: datetime | None
    cap_count: int


@dataclass(frozen=True, slots=True)
class HandOver:
    #: The send is "relaying" now: the message may go to the ESP. When False
    #: and no check failed, the send was not "sending" any more: something
    #: else settled it (nothing in sendtime does while it renders).
    handed_over: bool
    exit_event: str | None = None
    suppressed: bool = False
    capped: bool = False
    #: Marketing sends since ``cap_since`` (counted for a send the cap stopped).
    sent: int = 0


_SEND_COLUMNS: Final = (
    "id, send_key, flow_id, template_id, profile_key, user_id, anonymous_id, entry_key, entry_message_id,"
    " entry_time, received_at, due_at, status, reason, attempts, relay, esp_message_id, template_version,"
    " subscription_group, created_at, updated_at, accepted_at"
)


def _send(row: tuple[Any, ...]) -> SendRecord:
    (
        id_,
        key,
        flow_id,
        template_id,
        profile_key,
        user_id,
        anonymous_id,
        entry_key,
        entry_message_id,
        entry_time,
        received_at,
        due_at,
        status,
        reason,
        attempts,
        relay,
        esp_message_id,
        template_version,
        group,
        created_at,
        updated_at,
        accepted_at,
    ) = row
    return SendRecord(
        id=id_,
        send_key=key,
        flow_id=flow_id,
        template_id=template_id,
        profile_key=profile_key,
        user_id=user_id,
        anonymous_id=anonymous_id,
        entry_key=entry_key,
        entry_message_id=entry_message_id,
        entry_time=_from_micros(entry_time),
        received_at=_from_micros(received_at),
        due_at=_from_micros(due_at),
        status=SendStatus(status),
        reason=reason,
        attempts=attempts,
        relay=relay,
        esp_message_id=esp_message_id,
        template_version=template_version,
        subscription_group=group,
        created_at=_from_micros(created_at),
        updated_at=_from_micros(updated_at),
        accepted_at=None if accepted_at is None else _from_micros(accepted_at),
    )


_EXIT_SQL: Final = (
    "SELECT event_name FROM flow_exits WHERE profile_key = ? AND flow_id = ? AND event_time >= ?"
    " AND entry_key IN (?, '*') LIMIT 1"
)
# Counts what may have reached the user: sent (accepted), and also relaying
# (handed to the ESP, answer pending) and uncertain (the ESP may have taken it),
# timed by acceptance or else by the hand-over. Without the in-flight ones, two
# sends for one user handed over while the other was at the ESP would both pass
# a cap of one.
_SENT_SINCE_SQL: Final = (
    "SELECT count(*) FROM sends WHERE profile_key = ? AND subscription_group != ''"
    " AND status IN ('sent', 'relaying', 'uncertain') AND coalesce(accepted_at, updated_at) >= ?"
)


@cache
def _suppressed_sql(subjects: int) -> str:
    marks = ",".join("?" * subjects)
    return f"SELECT 1 FROM suppressions WHERE subject IN ({marks}) AND grp IN (?, '*') LIMIT 1"  # noqa: S608


def _select_exit(conn: sqlite3.Connection, args: tuple[str, str, str, int]) -> str | None:
    profile_key, flow_id, entry_key, since = args
    row = conn.execute(_EXIT_SQL, (profile_key, flow_id, since, entry_key)).fetchone()
    return row[0] if row else None


def _select_suppressed(conn: sqlite3.Connection, args: tuple[list[str], str]) -> bool:
    subjects, group = args
    return conn.execute(_suppressed_sql(len(subjects)), (*subjects, group)).fetchone() is not None


def _select_sent_since(conn: sqlite3.Connection, args: tuple[str, int]) -> int:
    return int(conn.execute(_SENT_SINCE_SQL, args).fetchone()[0])


def _select_send(conn: sqlite3.Connection, args: tuple[int | None, str | None]) -> SendRecord | None:
    send_id, send_key = args
    column, value = ("id", send_id) if send_id is not None else ("send_key", send_key)
    row = conn.execute(f"SELECT {_SEND_COLUMNS} FROM sends WHERE {column} = ?", (value,)).fetchone()  # noqa: S608
    return _send(row) if row else None


def _select_sends(
    conn: sqlite3.Connection, args: tuple[str | None, str | None, int, int | None]
) -> list[SendRecord]:
    profile_key, flow_id, limit, before_id = args
    where: list[str] = ["1 = 1"]
    values: list[Any] = []
    for column, value in (("profile_key", profile_key), ("flow_id", flow_id)):
        if value is not None:
            where.append(f"{column} = ?")
            values.append(value)
    if before_id is not None:
        where.append("id < ?")
        values.append(before_id)
    sql = f"SELECT {_SEND_COLUMNS} FROM sends WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?"  # noqa: S608
    return [_send(row) for row in conn.execute(sql, (*values, limit))]


def _select_flow_counts(conn: sqlite3.Connection, _arg: object) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for flow_id, status, count in conn.execute("SELECT flow_id, status, count(*) FROM sends GROUP BY 1, 2"):
        counts.setdefault(flow_id, {})[status] = count
    return counts


def _select_next_due(conn: sqlite3.Connection, _arg: object) -> datetime | None:
    row = conn.execute("SELECT min(due_at) FROM sends WHERE status = 'scheduled'").fetchone()
    return None if row[0] is None else _from_micros(row[0])


def _select_catalog(conn: sqlite3.Connection, _arg: object) -> list[tuple[bytes]]:
    return conn.execute("SELECT doc FROM catalog").fetchall()


def _resolve(done: asyncio.Future[_T], value: _T) -> None:
    if not done.done():
        done.set_result(value)


def _fail(done: asyncio.Future[Any], exc: BaseException) -> None:
    if not done.done():
        done.set_exception(exc)
