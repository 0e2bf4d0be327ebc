"""The embedded store: SQLite in WAL mode, written by one thread with group commit.

Why one writer thread: SQLite allows one writer at a time anyway, and a thread
that owns the write connection can take every batch that queued up while the
previous commit was running and make them durable in one transaction (group
commit). Many concurrent streams then cost one fsync per round, not one per
event, and blocking I/O never runs on the event loop.

The writer also keeps the profiles it touched recently in memory (it is their
only writer, so its copy is always the committed one), which saves a read and a
decode per event on hot users. Readers use their own connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import msgspec

from sendtime.server.domain.catalog import Product
from sendtime.server.domain.errors import Overloaded, Unavailable
from sendtime.server.domain.events import Event, TraitsUpdate
from sendtime.server.domain.profile import Profile, fold

log = logging.getLogger(__name__)

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS events (
    message_id   TEXT PRIMARY KEY,
    profile_key  TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    anonymous_id TEXT NOT NULL,
    kind         TEXT NOT NULL,
    name         TEXT NOT NULL,
    event_time   INTEGER NOT NULL,  -- microseconds since the epoch, UTC
    received_at  INTEGER NOT NULL,
    ref_id       TEXT NOT NULL,     -- alias: previous_id; group: group_id
    body         BLOB NOT NULL      -- properties JSON; for identify, the traits JSON
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS events_by_received_at ON events (received_at);
CREATE TABLE IF NOT EXISTS catalog (
    product_id  TEXT PRIMARY KEY,
    doc         BLOB NOT NULL       -- JSON of domain.catalog.Product
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS profiles (
    profile_key TEXT PRIMARY KEY,
    doc         BLOB NOT NULL,      -- msgpack of domain.profile.Profile
    updated_at  INTEGER NOT NULL
) WITHOUT ROWID;
"""

Synchronous = Literal["full", "normal"]

_encode_profile = msgspec.msgpack.Encoder().encode
_decode_profile = msgspec.msgpack.Decoder(Profile).decode
_encode_json = msgspec.json.Encoder().encode
_decode_product = msgspec.json.Decoder(Product).decode
_T = TypeVar("_T")
_SQL_VARS: Final = 500  # ids per "IN (...)" lookup, well under SQLite's limit


def _micros(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


@dataclass(slots=True)
class _Append:
    events: Sequence[Event]
    done: asyncio.Future[list[bool]]
    loop: asyncio.AbstractEventLoop


@dataclass(slots=True)
class _Stats:
    commits: int = 0
    events: int = 0
    last_purge: float = field(default_factory=time.monotonic)


_STOP: Final = object()


class SqliteStore:
    """EventStore on SQLite. Create with ``await SqliteStore.open(...)``."""

    def __init__(
        self,
        path: Path,
        *,
        synchronous: Synchronous,
        dedupe_retention: timedelta,
        max_queued_events: int,
        profile_cache_size: int,
    ) -> None:
        self.path = path
        self._synchronous = synchronous
        self._retention = dedupe_retention
        self._max_queued = max_queued_events
        self._profile_cache: OrderedDict[str, Profile] = OrderedDict()
        self._profile_cache_size = profile_cache_size
        self._queue: queue.SimpleQueue[_Append | object] = queue.SimpleQueue()
        self._queued_events = 0  # touched only on the event loop
        self._closed = False
        self._stats = _Stats()
        self._writer = threading.Thread(target=self._run_writer, name="sendtime-sqlite-writer", daemon=True)
        self._writer_ready = threading.Event()
        self._writer_error: BaseException | None = None
        self._reader: sqlite3.Connection | None = None
        self._reader_lock = threading.Lock()

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        synchronous: Synchronous = "full",
        dedupe_retention: timedelta = timedelta(days=7),
        max_queued_events: int = 100_000,
        profile_cache_size: int = 50_000,
    ) -> SqliteStore:
        store = cls(
            path,
            synchronous=synchronous,
            dedupe_retention=dedupe_retention,
            max_queued_events=max_queued_events,
            profile_cache_size=profile_cache_size,
        )
        await asyncio.to_thread(store._start)
        return store

    # -- the event loop side -------------------------------------------------

    async def append(self, events: Sequence[Event]) -> list[bool]:
        if self._closed:
            raise Unavailable("the store is closing")
        if self._queued_events + len(events) > self._max_queued and self._queued_events:
            raise Overloaded(f"{self._queued_events} events are waiting to be stored; retry shortly")
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[bool]] = loop.create_future()
        self._queued_events += len(events)
        self._queue.put(_Append(events, done, loop))
        try:
            # shield: a caller that goes away must not cancel the commit's outcome
            return await asyncio.shield(done)
        finally:
            self._queued_events -= len(events)

    async def get_profile(self, profile_key: str) -> Profile | None:
        return await asyncio.to_thread(self._read_profile, profile_key)

    async def save_products(self, products: Sequence[Product]) -> None:
        """Keep catalog updates across restarts (rare writes: no group commit needed)."""
        rows = [(p.id, _encode_json(p)) for p in products]
        await asyncio.to_thread(self._with_reader, self._save_products, rows)

    async def load_products(self) -> list[Product]:
        rows = await asyncio.to_thread(self._with_reader, _select_catalog)
        return [_decode_product(doc) for (doc,) in rows]

    async def replay_track_events(
        self, names: Sequence[str], consume: Callable[[str, str, bytes], None]
    ) -> int:
        """Call ``consume(profile_key, name, properties)`` for every stored track
        event with one of ``names``, oldest first, in a worker thread. Only for
        start-up, before anything else uses what ``consume`` feeds."""
        return await asyncio.to_thread(self._replay, list(names), consume)

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
            conn.executescript(SCHEMA)
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
            round_: list[_Append] = []
            for item in self._drain(first):
                if item is _STOP:
                    stopping = True  # finish this round first
                elif isinstance(item, _Append):
                    round_.append(item)
            if round_:
                self._commit_round(conn, round_)
            self._maybe_purge(conn)

    def _drain(self, first: _Append | object) -> list[_Append | object]:
        items = [first]
        with contextlib.suppress(queue.Empty):
            while len(items) < 1000:
                items.append(self._queue.get_nowait())
        return items

    def _commit_round(self, conn: sqlite3.Connection, round_: list[_Append]) -> None:
        events = [event for item in round_ for event in item.events]
        touched: set[str] = set()
        try:
            is_new = self._write(conn, events, touched)
        except BaseException as exc:
            # The fold mutated cached profiles that were never committed.
            for key in touched:
                self._profile_cache.pop(key, None)
            log.exception("commit of %d events failed", len(events))
            for item in round_:
                item.loop.call_soon_threadsafe(_fail, item.done, exc)
            return
        self._stats.commits += 1
        self._stats.events += len(events)
        start = 0
        for item in round_:
            end = start + len(item.events)
            item.loop.call_soon_threadsafe(_resolve, item.done, is_new[start:end])
            start = end

    def _write(self, conn: sqlite3.Connection, events: list[Event], touched: set[str]) -> list[bool]:
        seen = self._known_ids(conn, [e.message_id for e in events])
        is_new: list[bool] = []
        rows = []
        by_profile: dict[str, list[Event]] = {}
        for event in events:
            new = event.message_id not in seen
            is_new.append(new)
            if not new:
                continue
            seen.add(event.message_id)  # a repeat within this round is a duplicate too
            key = event.identity.key
            by_profile.setdefault(key, []).append(event)
            body = (
                _encode_json(event.payload) if isinstance(event.payload, TraitsUpdate) else event.properties
            )
            rows.append(
                (
                    event.message_id,
                    key,
                    event.identity.user_id,
                    event.identity.anonymous_id,
                    event.kind.value,
                    event.name,
                    _micros(event.timestamp),
                    _micros(event.received_at),
                    event.previous_id or event.group_id,
                    body,
                )
            )
        if not rows:
            return is_new
        now = _micros(datetime.now(UTC))
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            profile_rows = []
            for key, profile_events in by_profile.items():
                profile = self._load_for_write(conn, key)
                touched.add(key)
                for event in profile_events:
                    fold(profile, event)
                profile_rows.append((key, _encode_profile(profile), now))
            conn.executemany(
                "INSERT INTO profiles VALUES (?, ?, ?) ON CONFLICT (profile_key)"
                " DO UPDATE SET doc = excluded.doc, updated_at = excluded.updated_at",
                profile_rows,
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return is_new

    def _known_ids(self, conn: sqlite3.Connection, ids: list[str]) -> set[str]:
        seen: set[str] = set()
        for start in range(0, len(ids), _SQL_VARS):
            chunk = ids[start : start + _SQL_VARS]
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT message_id FROM events WHERE message_id IN ({marks})"  # noqa: S608 (only "?" marks)
            seen.update(row[0] for row in conn.execute(sql, chunk))
        return seen

    def _load_for_write(self, conn: sqlite3.Connection, key: str) -> Profile:
        cache = self._profile_cache
        profile = cache.get(key)
        if profile is not None:
            cache.move_to_end(key)
            return profile
        row = conn.execute("SELECT doc FROM profiles WHERE profile_key = ?", (key,)).fetchone()
        profile = _decode_profile(row[0]) if row else Profile()
        cache[key] = profile
        if len(cache) > self._profile_cache_size:
            cache.popitem(last=False)
        return profile

    def _maybe_purge(self, conn: sqlite3.Connection) -> None:
        """Forget message ids older than the dedupe retention, once a minute."""
        if time.monotonic() - self._stats.last_purge < 60.0:
            return
        self._stats.last_purge = time.monotonic()
        cutoff = _micros(datetime.now(UTC) - self._retention)
        deleted = conn.execute("DELETE FROM events WHERE received_at < ?", (cutoff,)).rowcount
        if deleted:
            log.info("forgot %d events older than the dedupe retention", deleted)

    def _with_reader(self, work: Callable[[sqlite3.Connection, Any], _T], arg: Any = None) -> _T:
        with self._reader_lock:
            if self._reader is None:
                raise Unavailable("the store is closed")
            return work(self._reader, arg)

    @staticmethod
    def _save_products(conn: sqlite3.Connection, rows: list[tuple[str, bytes]]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(
                "INSERT INTO catalog VALUES (?, ?) ON CONFLICT (product_id) DO UPDATE SET doc = excluded.doc",
                rows,
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _replay(self, names: list[str], consume: Callable[[str, str, bytes], None]) -> int:
        conn = self._connect()  # its own connection: a long read must not hold the reader lock
        try:
            marks = ",".join("?" * len(names))
            sql = (
                "SELECT profile_key, name, body FROM events"  # noqa: S608 (only "?" marks)
                f" WHERE kind = 'track' AND name IN ({marks}) ORDER BY event_time"
            )
            count = 0
            for profile_key, name, body in conn.execute(sql, names):
                consume(profile_key, name, body)
                count += 1
            return count
        finally:
            conn.close()

    def _read_profile(self, key: str) -> Profile | None:
        with self._reader_lock:
            if self._reader is None:
                raise Unavailable("the store is closed")
            row = self._reader.execute("SELECT doc FROM profiles WHERE profile_key = ?", (key,)).fetchone()
        return _decode_profile(row[0]) if row else None


def _select_catalog(conn: sqlite3.Connection, _arg: object) -> list[tuple[bytes]]:
    return conn.execute("SELECT doc FROM catalog").fetchall()


def _resolve(done: asyncio.Future[list[bool]], value: list[bool]) -> None:
    if not done.done():
        done.set_result(value)


def _fail(done: asyncio.Future[list[bool]], exc: BaseException) -> None:
    if not done.done():
        done.set_exception(exc)
