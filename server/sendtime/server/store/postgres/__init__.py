"""The PostgreSQL backend: every port on one database that any number of
sendtime replicas share (``[storage] backend = "postgres"``).

    storage = await PostgresBackend.open(dsn, ...)    # applies the migrations first
    events = storage.event_store(planner, listener)

Each replica keeps a pool of connections, and one more that LISTENs for the
others' commits: the users they touched (this replica drops what it cached of
them) and the earliest send they scheduled (its dispatcher wakes). See
_events.py (group commit, dedupe, folding), _ledger.py (claims, leases,
hand-over), _migrations.py (schema versions; which table is keyed how).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import asyncpg

from sendtime.server.domain.errors import Unavailable
from sendtime.server.domain.ports import CommitListener, SendPlanner, StoreStats
from sendtime.server.store.postgres._broadcasts import PostgresBroadcasts
from sendtime.server.store.postgres._events import COMMITS_CHANNEL, PostgresEventStore
from sendtime.server.store.postgres._ledger import Plans, PostgresLedger
from sendtime.server.store.postgres._migrations import LATEST, migrate
from sendtime.server.store.postgres._records import (
    PostgresCatalog,
    PostgresLinks,
    PostgresProfiles,
    PostgresSuppressions,
)

__all__ = ["LATEST", "PostgresBackend", "migrate", "migrate_database"]

log = logging.getLogger("sendtime.server.store.postgres")

#: Rows deleted per statement when pruning: short transactions, no long locks.
_PRUNE_BATCH: Final = 5000
_PRUNE_EVERY_S: Final = 60.0


async def migrate_database(dsn: str) -> list[int]:
    """``sendtime migrate``: apply what is missing; returns the versions applied."""
    conn = await asyncpg.connect(dsn)
    try:
        return await migrate(conn)
    finally:
        await conn.close()


class PostgresBackend:
    """Implements domain.ports.Storage. Create with ``await PostgresBackend.open(...)``."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        listen: asyncpg.Connection,
        *,
        lease: timedelta,
        dedupe_retention: timedelta,
        max_queued_events: int,
    ) -> None:
        self._pool = pool
        self._listen = listen
        self._plans = Plans()
        self._retention = dedupe_retention
        self._max_queued = max_queued_events
        self.replica = uuid.uuid4().hex[:12]
        self._events: PostgresEventStore | None = None
        self._listener: CommitListener | None = None
        self._pruner: asyncio.Task[None] | None = None
        self.profiles = PostgresProfiles(pool)
        self.links = PostgresLinks(pool)
        self.catalog = PostgresCatalog(pool)
        self.ledger = PostgresLedger(pool, self._plans, lease=lease)
        self.suppressions = PostgresSuppressions(pool)
        self.exits = self.ledger
        self.broadcasts = PostgresBroadcasts(pool, self._plans)

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        pool_size: int = 8,
        lease: timedelta = timedelta(minutes=5),
        dedupe_retention: timedelta = timedelta(days=7),
        max_queued_events: int = 100_000,
    ) -> PostgresBackend:
        try:
            listen = await asyncpg.connect(dsn)
        except (OSError, asyncpg.PostgresError) as exc:
            raise Unavailable(f"cannot connect to PostgreSQL at storage.postgres_dsn: {exc}") from exc
        try:
            await migrate(listen)
            pool = await asyncpg.create_pool(dsn, min_size=2, max_size=pool_size)
        except BaseException:
            await listen.close()
            raise
        backend = cls(
            pool, listen, lease=lease, dedupe_retention=dedupe_retention, max_queued_events=max_queued_events
        )
        await listen.add_listener(COMMITS_CHANNEL, backend._heard)
        backend._pruner = asyncio.create_task(backend._prune_forever(), name="sendtime-pg-pruner")
        return backend

    def event_store(self, planner: SendPlanner, listener: CommitListener) -> PostgresEventStore:
        if self._events is not None:
            raise RuntimeError("this backend already has its event store")
        self._listener = listener
        self._events = PostgresEventStore(
            self._pool,
            self._plans,
            planner=planner,
            listener=listener,
            max_queued_events=self._max_queued,
            replica=self.replica,
        )
        return self._events

    def _heard(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        """Another replica's commit (our own come back too: skipped)."""
        replica, due, keys = payload.split("|", 2)
        if replica == self.replica or self._listener is None:
            return
        earliest = None if not due else datetime.fromtimestamp(int(due) / 1_000_000, UTC)
        try:
            self._listener.committed_elsewhere(keys.split("\x1e") if keys else [], earliest)
        except Exception:
            log.exception("handling another replica's commit failed")

    def stats(self) -> StoreStats:
        events = self._events
        return StoreStats(
            commits=0 if events is None else events.commits,
            events=0 if events is None else events.events_written,
            queued_events=0 if events is None else events.queued_events,
            scheduled=dict(self._plans.scheduled),
            cancelled=dict(self._plans.cancelled),
        )

    async def prune(self, now: datetime | None = None) -> int:
        """Forget message ids and events older than the dedupe retention, in
        batches (each its own short transaction); returns how many rows went."""
        cutoff = (now or datetime.now(UTC)) - self._retention
        removed = 0
        for table in ("message_ids", "events"):
            while True:
                async with self._pool.acquire() as conn:
                    status = await conn.execute(
                        f"DELETE FROM {table} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {table}"  # noqa: S608
                        " WHERE received_at < $1 LIMIT $2))",
                        cutoff,
                        _PRUNE_BATCH,
                    )
                deleted = int(status.rsplit(" ", 1)[-1])
                removed += deleted
                if deleted < _PRUNE_BATCH:
                    break
        return removed

    async def _prune_forever(self) -> None:
        while True:
            await asyncio.sleep(_PRUNE_EVERY_S)
            try:
                removed = await self.prune()
            except Exception:
                log.exception("pruning old events failed; will retry")
            else:
                if removed:
                    log.info("forgot %d message ids and events older than the dedupe retention", removed)

    async def close(self) -> None:
        if self._pruner is not None:
            self._pruner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pruner
        if self._events is not None:
            await self._events.close()
        with contextlib.suppress(Exception):
            await self._listen.close()
        await self._pool.close()
