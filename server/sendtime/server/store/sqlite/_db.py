"""One SQLite database in WAL mode: its schema, one writer thread with group
commit, and one reader connection.

Why one writer thread: SQLite allows one writer at a time anyway, and a thread
that owns the write connection can take every batch that queued up while the
previous commit was running and make them durable in one transaction (group
commit). Many concurrent streams then cost one fsync per round, not one per
event, and blocking I/O never runs on the event loop.

The writer takes two kinds of work from one queue, in the order the loop asked:
appended events (consecutive ones are handed together to the event store's
``commit_round``, see _events.py) and any other write (``submit``: consecutive
ones share one transaction, each in a savepoint of its own).

Checkpoints (copying the WAL's pages into the database file) run in a thread
of their own, not in the commit that crossed SQLite's threshold: a checkpoint
of a big write (a broadcast's ledger rows) writes and syncs megabytes, and an
event's commit queued behind it in the writer thread would wait for that.

The database files hold personal data: they are created readable by their
owner only (0600); SQLite gives the -wal and -shm files the same mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal, Protocol, TypeVar

from sendtime.server.domain.errors import Unavailable
from sendtime.server.domain.events import Event
from sendtime.server.domain.ports import Appended

log = logging.getLogger("sendtime.server.store.sqlite")

SCHEMA_VERSION: Final = 3
#: Older versions this one opens, upgrading them (0: a new file).
UPGRADES_FROM: Final = (0, 2)
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
-- Profiles written ahead of a save that has not committed yet (see
-- SqliteProfiles.stage_profiles); emptied by each save and at start.
CREATE TABLE IF NOT EXISTS profiles_staged (
    profile_key TEXT PRIMARY KEY,
    doc         BLOB NOT NULL
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
-- Ids that are one person (domain.identity.IdLink): from "a:<anonymous id>"
-- or "u:<user id>" (alias) to "u:<user id>", written in the transaction of
-- the event that says so.
CREATE TABLE IF NOT EXISTS identity_links (
    from_key   TEXT NOT NULL,
    to_key     TEXT NOT NULL,
    message_id TEXT NOT NULL,
    at         INTEGER NOT NULL,  -- the event's time, microseconds since the epoch
    PRIMARY KEY (from_key, to_key, message_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS identity_links_to ON identity_links (to_key, from_key);
-- Who gets no more marketing: subject is "u:<id>", "a:<id>" or "email:<address>".
CREATE TABLE IF NOT EXISTS suppressions (
    subject     TEXT NOT NULL,
    grp         TEXT NOT NULL,  -- a subscription group, or '*' for every one
    reason      TEXT NOT NULL,
    source      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (subject, grp)
) WITHOUT ROWID;
-- Segments made through the API ([[segments]] in the settings are not stored).
CREATE TABLE IF NOT EXISTS segments (
    name TEXT PRIMARY KEY,
    doc  BLOB NOT NULL      -- JSON of domain.segments.Segment
) WITHOUT ROWID;
-- Broadcasts; their sends are rows of the ledger (flow_id 'broadcast:<id>').
CREATE TABLE IF NOT EXISTS broadcasts (
    id              TEXT PRIMARY KEY,
    idempotency_key TEXT NOT NULL UNIQUE,
    state           TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    doc             BLOB NOT NULL  -- JSON of domain.broadcasts.Broadcast
) WITHOUT ROWID;
"""
#: Version 3 added identity_links: the links the events a version-2 file
#: still holds carry (those older than the dedupe retention are gone).
_LINKS_FROM_EVENTS: Final = (
    "INSERT OR IGNORE INTO identity_links SELECT 'a:' || anonymous_id, 'u:' || user_id, message_id,"
    " event_time FROM events WHERE user_id != '' AND anonymous_id != '' AND kind IN ('identify', 'track')",
    "INSERT OR IGNORE INTO identity_links SELECT prefix || ref_id, 'u:' || user_id, message_id, event_time"
    " FROM events, (SELECT 'a:' AS prefix UNION ALL SELECT 'u:')"
    " WHERE kind = 'alias' AND user_id != '' AND ref_id != '' AND ref_id != user_id",
)
PROFILES_POSITION: Final = "profiles_position"
#: How often the checkpointer copies what was committed into the database file
#: (when something was): a few times a second keeps the WAL small.
CHECKPOINT_EVERY_S: Final = 0.25
#: WAL frames (pages, 64 MiB) past which the checkpointer has SQLite start the
#: WAL over (see SqliteDatabase._run_checkpointer).
_RESTART_WAL_FRAMES: Final = 16384
FILE_MODE: Final = 0o600

Synchronous = Literal["full", "normal"]
_T = TypeVar("_T")


@dataclass(slots=True)
class Append:
    events: Sequence[Event]
    done: asyncio.Future[Appended]
    writer: RoundWriter


class RoundWriter(Protocol):
    def commit_round(self, conn: sqlite3.Connection, appends: list[Append]) -> None:
        """In the writer thread: make ``appends`` durable and answer each
        (through ``SqliteDatabase.call_soon``). Must not raise."""
        ...


@dataclass(slots=True)
class _Work:
    """Any other write, run in the writer thread between rounds. ``run`` must
    not open a transaction: consecutive works share one (group commit), each
    in a savepoint of its own so one failing does not undo the others."""

    run: Callable[[sqlite3.Connection], Any]
    done: asyncio.Future[Any]


_STOP: Final = object()


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def select_meta(conn: sqlite3.Connection, key: str) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return int(row[0]) if row else 0


class SqliteDatabase:
    """Create with ``await SqliteDatabase.open(...)``."""

    def __init__(
        self, path: Path, *, synchronous: Synchronous, dedupe_retention: timedelta, cache_mib: int
    ) -> None:
        self.path = path
        self._synchronous = synchronous
        self._retention = dedupe_retention
        self._cache_mib = cache_mib
        self._queue: queue.SimpleQueue[Append | _Work | object] = queue.SimpleQueue()
        self.closed = False
        self._writer = threading.Thread(target=self._run_writer, name="sendtime-sqlite-writer", daemon=True)
        self._writer_ready = threading.Event()
        self._checkpointer = threading.Thread(
            target=self._run_checkpointer, name="sendtime-sqlite-checkpointer", daemon=True
        )
        #: Set by the writer after a commit; the checkpointer's cue.
        self._committed = threading.Event()
        self._stop_checkpoints = threading.Event()
        self._writer_error: BaseException | None = None
        self._reader: sqlite3.Connection | None = None
        self._reader_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_purge = time.monotonic()
        #: The last event position when the writer started.
        self.start_position = 0

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        synchronous: Synchronous = "full",
        dedupe_retention: timedelta = timedelta(days=7),
        cache_mib: int = 128,
    ) -> SqliteDatabase:
        db = cls(path, synchronous=synchronous, dedupe_retention=dedupe_retention, cache_mib=cache_mib)
        db._loop = asyncio.get_running_loop()
        await asyncio.to_thread(db._start)
        return db

    # -- the event loop side -------------------------------------------------

    def append(self, item: Append) -> None:
        if self.closed:
            raise Unavailable("the store is closing")
        self._queue.put(item)

    async def submit(self, run: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``run`` in the writer thread, in a transaction; returns once committed."""
        if self.closed:
            raise Unavailable("the store is closed")
        done: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
        self._queue.put(_Work(run, done))
        return await done

    async def read(self, work: Callable[[sqlite3.Connection, Any], _T], arg: Any) -> _T:
        """Run ``work`` on the reader connection, in a worker thread."""
        return await asyncio.to_thread(self._with_reader, work, arg)

    async def scan(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """A long read on a connection of its own (it must not hold the reader)."""

        def run() -> _T:
            conn = self.connect()
            try:
                return work(conn)
            finally:
                conn.close()

        return await asyncio.to_thread(run)

    def call_soon(self, callback: Callable[..., None], *args: Any) -> None:
        """From the writer thread: run ``callback`` on the event loop."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(callback, *args)

    async def close(self) -> None:
        """Commit everything queued so far, then close."""
        if self.closed:
            return
        self.closed = True
        self._queue.put(_STOP)
        await asyncio.to_thread(self._writer.join)
        self._stop_checkpoints.set()
        self._committed.set()
        if self._checkpointer.is_alive():
            await asyncio.to_thread(self._checkpointer.join)
        with self._reader_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    # -- threads ---------------------------------------------------------------

    def connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute(f"PRAGMA cache_size = -{self._cache_mib * 1024}")
        return conn

    def _with_reader(self, work: Callable[[sqlite3.Connection, Any], _T], arg: Any) -> _T:
        with self._reader_lock:
            if self._reader is None:
                raise Unavailable("the store is closed")
            return work(self._reader, arg)

    def _start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Created 0600 before SQLite opens it; the -wal and -shm files take its mode.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE))
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(f"{self.path}{suffix}", FILE_MODE)
        self._writer.start()
        self._writer_ready.wait()
        if self._writer_error is not None:
            raise self._writer_error
        self._reader = self.connect()
        self._checkpointer.start()

    def _run_writer(self) -> None:
        try:
            conn = self.connect()
            conn.execute("PRAGMA journal_mode = WAL")
            # the checkpointer thread does it (see the module's docstring)
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            # FULL: an acked event survives power loss, not only a crash of
            # this process; group commit keeps the fsync cost per round.
            conn.execute(f"PRAGMA synchronous = {self._synchronous.upper()}")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (*UPGRADES_FROM, SCHEMA_VERSION):
                raise Unavailable(
                    f"{self.path} has schema version {version}; this sendtime opens versions"
                    f" {', '.join(map(str, UPGRADES_FROM))} and {SCHEMA_VERSION}"
                )
            conn.executescript(SCHEMA)
            if version != SCHEMA_VERSION:
                with transaction(conn):
                    linked = sum(conn.execute(sql).rowcount for sql in _LINKS_FROM_EVENTS)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                if version:
                    log.info(
                        "upgraded %s from schema version %d to %d (%d identity links from stored events)",
                        self.path,
                        version,
                        SCHEMA_VERSION,
                        linked,
                    )
            # staged by a save that never committed: the events they hold are replayed
            conn.execute("DELETE FROM profiles_staged")
            self.start_position = conn.execute("SELECT coalesce(max(position), 0) FROM events").fetchone()[0]
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
            appends: list[Append] = []
            works: list[_Work] = []
            for item in self._drain(first):
                if item is _STOP:
                    stopping = True  # finish this round first
                elif isinstance(item, Append):
                    if works:  # keep the order the loop asked in
                        self._run_works(conn, works)
                        works = []
                    if appends and appends[0].writer is not item.writer:
                        appends[0].writer.commit_round(conn, appends)
                        appends = []
                    appends.append(item)
                elif isinstance(item, _Work):
                    if appends:
                        appends[0].writer.commit_round(conn, appends)
                        appends = []
                    works.append(item)
            if appends:
                appends[0].writer.commit_round(conn, appends)
            if works:
                self._run_works(conn, works)
            self._committed.set()
            self._maybe_purge(conn)

    def _drain(self, first: Append | _Work | object) -> list[Append | _Work | object]:
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
            with transaction(conn):
                for work in works:
                    conn.execute("SAVEPOINT work")
                    try:
                        result = work.run(conn)
                    except Exception as exc:
                        conn.execute("ROLLBACK TO work")
                        conn.execute("RELEASE work")
                        log.exception("a store write failed")
                        outcomes.append((work, None, exc))
                    else:
                        conn.execute("RELEASE work")
                        outcomes.append((work, result, None))
        except BaseException as exc:
            log.exception("committing %d store writes failed", len(works))
            for work in works:
                self.call_soon(fail, work.done, exc)
            return
        for work, result, error in outcomes:
            if error is not None:
                self.call_soon(fail, work.done, error)
            else:
                self.call_soon(resolve, work.done, result)

    def _run_checkpointer(self) -> None:
        """Copy committed pages into the database file while the writer goes
        on (a PASSIVE checkpoint takes no lock a writer or reader waits on)."""
        conn = self.connect()
        try:
            while not self._stop_checkpoints.is_set():
                self._committed.wait()
                if self._stop_checkpoints.wait(CHECKPOINT_EVERY_S):
                    break
                self._committed.clear()
                try:
                    busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    if not busy and frames >= _RESTART_WAL_FRAMES and copied == frames:
                        # Beside a writer that never stops, the checkpointer is
                        # always a commit behind, so the WAL is never all copied
                        # when a write begins, which is when SQLite would start
                        # it over. RESTART holds the writers back until every
                        # reader has moved past it (a few milliseconds, once per
                        # 64 MiB written), and the next write starts it over.
                        conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
                except sqlite3.Error:
                    log.exception("a checkpoint failed; again after the next commit")
        finally:
            conn.close()

    def _maybe_purge(self, conn: sqlite3.Connection) -> None:
        """Forget events older than the dedupe retention, once a minute. Never
        those the saved profiles do not include yet: a restart replays them."""
        if time.monotonic() - self._last_purge < 60.0:
            return
        self._last_purge = time.monotonic()
        cutoff_minute = int((datetime.now(UTC) - self._retention).timestamp()) // 60
        with transaction(conn):
            row = conn.execute(
                "SELECT max(max_position) FROM received_marks WHERE minute < ?", (cutoff_minute,)
            ).fetchone()
            saved = select_meta(conn, PROFILES_POSITION)
            if row[0] is None:
                return
            through = min(row[0], saved)
            deleted = conn.execute("DELETE FROM events WHERE position <= ?", (through,)).rowcount
            conn.execute("DELETE FROM received_marks WHERE minute < ?", (cutoff_minute,))
        if deleted:
            log.info("forgot %d events older than the dedupe retention", deleted)


def resolve(done: asyncio.Future[_T], value: _T) -> None:
    if not done.done():
        done.set_result(value)


def fail(done: asyncio.Future[Any], exc: BaseException) -> None:
    if not done.done():
        done.set_exception(exc)
