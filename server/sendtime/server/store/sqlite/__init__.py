"""The embedded backend: every port on one SQLite file (WAL, one writer thread
with group commit). The default, and the one ``make run`` uses.

    storage = await SqliteBackend.open(path, ...)
    events = storage.event_store(planner, listener)   # once the domain exists

Modules: _db (schema, writer thread, reader), _events (append, dedupe, the
round's flow plan, the links events carry), _ledger (sends and their state
machine), _records (profiles, identity links, catalog, suppressions, exits),
_broadcasts (segments, broadcasts and their sends), _rows (value conversions).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sendtime.server.domain.ports import CommitListener, SendPlanner, StoreStats
from sendtime.server.store.sqlite._broadcasts import SqliteBroadcasts
from sendtime.server.store.sqlite._db import FILE_MODE, SCHEMA_VERSION, SqliteDatabase, Synchronous
from sendtime.server.store.sqlite._events import SqliteEventStore
from sendtime.server.store.sqlite._ledger import Plans, SqliteLedger
from sendtime.server.store.sqlite._records import (
    SqliteCatalog,
    SqliteExits,
    SqliteLinks,
    SqliteProfiles,
    SqliteSuppressions,
)

__all__ = ["FILE_MODE", "SCHEMA_VERSION", "SqliteBackend"]


class SqliteBackend:
    """Implements domain.ports.Storage. Create with ``await SqliteBackend.open(...)``."""

    def __init__(self, db: SqliteDatabase, *, max_queued_events: int) -> None:
        self._db = db
        self._plans = Plans()
        self._max_queued = max_queued_events
        self._events: SqliteEventStore | None = None
        self.profiles = SqliteProfiles(db)
        self.links = SqliteLinks(db)
        self.catalog = SqliteCatalog(db)
        self.ledger = SqliteLedger(db, self._plans)
        self.suppressions = SqliteSuppressions(db)
        self.exits = SqliteExits(db)
        self.broadcasts = SqliteBroadcasts(db, self._plans)

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        synchronous: Synchronous = "full",
        dedupe_retention: timedelta = timedelta(days=7),
        max_queued_events: int = 100_000,
        cache_mib: int = 128,
    ) -> SqliteBackend:
        db = await SqliteDatabase.open(
            path, synchronous=synchronous, dedupe_retention=dedupe_retention, cache_mib=cache_mib
        )
        return cls(db, max_queued_events=max_queued_events)

    @property
    def path(self) -> Path:
        return self._db.path

    def event_store(self, planner: SendPlanner, listener: CommitListener) -> SqliteEventStore:
        if self._events is not None:
            raise RuntimeError("this backend already has its event store")
        self._events = SqliteEventStore(
            self._db, self._plans, planner=planner, listener=listener, max_queued_events=self._max_queued
        )
        return self._events

    def stats(self) -> StoreStats:
        events = self._events
        return StoreStats(
            commits=0 if events is None else events.commits,
            events=0 if events is None else events.events_written,
            queued_events=0 if events is None else events.queued_events,
            scheduled=dict(self._plans.scheduled),
            cancelled=dict(self._plans.cancelled),
        )

    async def close(self) -> None:
        await self._db.close()
