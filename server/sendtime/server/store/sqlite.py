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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import msgspec

from sendtime.server.domain.catalog import Product
from sendtime.server.domain.errors import Overloaded, Unavailable
from sendtime.server.domain.events import Event, EventKind, IncomingEvent, TraitsUpdate, validate
from sendtime.server.domain.ports import Appended
from sendtime.server.domain.profile import Profile

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
"""
_EVENT_COLUMNS: Final = (
    "message_id, profile_key, user_id, anonymous_id, kind, name, event_time, received_at, ref_id, body"
)
_ROWS_PER_INSERT: Final = 1000  # 10 columns: 10,000 variables, under SQLite's 32,766
_PROFILES_POSITION: Final = "profiles_position"

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
    """Any other write, run in the writer thread between rounds."""

    run: Callable[[sqlite3.Connection], Any]
    done: asyncio.Future[Any]


@dataclass(slots=True)
class _Stats:
    commits: int = 0
    events: int = 0
    last_purge: float = field(default_factory=time.monotonic)


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

    async def _submit(self, run: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._closed:
            raise Unavailable("the store is closed")
        done: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
        self._queue.put(_Work(run, done))
        return await done

    async def save_profiles(self, rows: Sequence[tuple[str, bytes]], position: int) -> None:
        """Write folded profiles and the position they include, in one transaction."""

        def save(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.executemany(
                    "INSERT INTO profiles VALUES (?, ?) ON CONFLICT (profile_key) DO UPDATE SET doc = excluded.doc",
                    rows,
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
            with _transaction(conn):
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
            for item in self._drain(first):
                if item is _STOP:
                    stopping = True  # finish this round first
                elif isinstance(item, _Append):
                    appends.append(item)
                elif isinstance(item, _Work):
                    if appends:  # keep the order the loop asked in
                        self._commit_round(conn, appends)
                        appends = []
                    self._run_work(conn, item)
            if appends:
                self._commit_round(conn, appends)
            self._maybe_purge(conn)

    def _drain(self, first: _Append | _Work | object) -> list[_Append | _Work | object]:
        items = [first]
        with contextlib.suppress(queue.Empty):
            while len(items) < 1000:
                items.append(self._queue.get_nowait())
        return items

    def _run_work(self, conn: sqlite3.Connection, work: _Work) -> None:
        try:
            result = work.run(conn)
        except BaseException as exc:
            log.exception("a store write failed")
            self._call_soon(_fail, work.done, exc)
        else:
            self._call_soon(_resolve, work.done, result)

    def _call_soon(self, callback: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(callback, *args)

    def _commit_round(self, conn: sqlite3.Connection, appends: list[_Append]) -> None:
        events = [event for item in appends for event in item.events]
        try:
            is_new = self._write(conn, events)
        except BaseException as exc:
            log.exception("commit of %d events failed", len(events))
            for item in appends:
                self._call_soon(_fail, item.done, exc)
            return
        self._stats.commits += 1
        self._stats.events += len(events)
        new_events = [event for event, new in zip(events, is_new, strict=True) if new]
        results = []
        start = 0
        for item in appends:
            end = start + len(item.events)
            results.append((item.done, Appended(is_new[start:end], self._position)))
            start = end
        self._call_soon(self._round_done, new_events, self._position, results)

    def _round_done(
        self, new_events: list[Event], position: int, results: list[tuple[asyncio.Future[Appended], Appended]]
    ) -> None:
        """On the loop, in commit order: tell the listener, then answer the appends."""
        if new_events and self.on_commit is not None:
            try:
                self.on_commit(new_events, position)
            except Exception:
                log.exception("the commit listener failed")
        for done, appended in results:
            _resolve(done, appended)

    def _write(self, conn: sqlite3.Connection, events: list[Event]) -> list[bool]:
        rows: list[Any] = []
        for event in events:
            payload = event.payload
            rows += (
                event.message_id,
                event.identity.key,
                event.identity.user_id,
                event.identity.anonymous_id,
                event.kind.value,
                event.name,
                _micros(event.timestamp),
                _micros(event.received_at),
                event.previous_id or event.group_id,
                _encode_json(payload) if isinstance(payload, TraitsUpdate) else event.properties,
            )
        before = self._position
        minute = int(time.time()) // 60
        with _transaction(conn):
            for start in range(0, len(events), _ROWS_PER_INSERT):
                chunk = rows[start * 10 : (start + _ROWS_PER_INSERT) * 10]
                conn.execute(_insert_sql(len(chunk) // 10), chunk)
            # INSERT OR IGNORE skipped the message ids seen before (and repeats
            # within the round); the positions past `before` are exactly the new ones.
            inserted = dict(
                conn.execute("SELECT message_id, position FROM events WHERE position > ?", (before,))
            )
            if inserted:
                last = max(inserted.values())
                conn.execute(
                    "INSERT INTO received_marks VALUES (?, ?)"
                    " ON CONFLICT (minute) DO UPDATE SET max_position = excluded.max_position",
                    (minute, last),
                )
        if inserted:
            self._position = max(inserted.values())
        # the first occurrence in the round is the one that was inserted
        return [inserted.pop(event.message_id, None) is not None for event in events]

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


def _select_catalog(conn: sqlite3.Connection, _arg: object) -> list[tuple[bytes]]:
    return conn.execute("SELECT doc FROM catalog").fetchall()


def _resolve(done: asyncio.Future[_T], value: _T) -> None:
    if not done.done():
        done.set_result(value)


def _fail(done: asyncio.Future[Any], exc: BaseException) -> None:
    if not done.done():
        done.set_exception(exc)
