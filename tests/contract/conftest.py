"""The contract suite: every port test runs against every storage backend.

A test takes the ``backend`` fixture (a ``Backend``: an opened
domain.ports.Storage, and how to make its event store) and must pass on each
parametrised backend, so a behaviour can never differ by backend unnoticed.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from sendtime.server.domain.events import Event, EventKind, Identity, IncomingEvent, validate
from sendtime.server.domain.flows import ExitOn, Flow, FlowPlanner, Reentry
from sendtime.server.domain.ports import CommittedRound, EventStore, SendPlanner, Storage
from sendtime.server.store.postgres import PostgresBackend
from sendtime.server.store.sqlite import SqliteBackend

#: The PostgreSQL this machine kind runs (trust auth); SENDTIME_TEST_POSTGRES_DSN overrides.
POSTGRES_DSN = os.environ.get("SENDTIME_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")

NOW = datetime.now(UTC)

ABANDONED_CART = Flow(
    id="abandoned_cart",
    template="abandoned_cart",
    entry_event="Product Added",
    entry_filter={},
    entry_key="cart_id",
    delay=timedelta(hours=1),
    exit_events=("Order Completed",),
    exit_on=ExitOn.ANY,
    reentry=Reentry.ONCE_PER_KEY,
    reentry_period=timedelta(0),
    subscription_group="marketing",
    sender="shop@example.com",
)


@dataclass
class Listener:
    """A CommitListener that keeps what it was told."""

    rounds: list[CommittedRound] = field(default_factory=list)

    elsewhere: list[tuple[list[str], datetime | None]] = field(default_factory=list)

    def committed(self, round_: CommittedRound) -> None:
        self.rounds.append(round_)

    def committed_elsewhere(self, profile_keys: Sequence[str], earliest_due: datetime | None) -> None:
        self.elsewhere.append((list(profile_keys), earliest_due))


@dataclass
class Backend:
    name: str
    storage: Storage
    listener: Listener = field(default_factory=Listener)
    _events: EventStore | None = None

    def events(self, planner: SendPlanner | None = None) -> EventStore:
        """The backend's event store (made once), planning ABANDONED_CART by default."""
        if self._events is None:
            self._events = self.storage.event_store(planner or FlowPlanner([ABANDONED_CART]), self.listener)
        return self._events


@asynccontextmanager
async def postgres_schema() -> AsyncIterator[str]:
    """A DSN whose connections work in a schema of their own, dropped after.
    Skips the test, saying why, when no PostgreSQL answers."""
    try:
        admin = await asyncpg.connect(POSTGRES_DSN, timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        pytest.skip(f"no PostgreSQL answers at {POSTGRES_DSN} ({exc}); .ci/run starts it")
    schema = f"t_{uuid.uuid4().hex[:16]}"
    await admin.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{POSTGRES_DSN}?search_path={schema}"
    finally:
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    storage: Storage
    if request.param == "sqlite":
        storage = await SqliteBackend.open(tmp_path / "sendtime.sqlite3")
        try:
            yield Backend(request.param, storage)
        finally:
            await storage.close()
        return
    async with postgres_schema() as dsn:
        storage = await PostgresBackend.open(dsn, pool_size=4)
        try:
            yield Backend(request.param, storage)
        finally:
            await storage.close()


def track(
    message_id: str,
    name: str,
    properties: bytes = b"{}",
    *,
    user: str = "ada",
    at: datetime | None = None,
) -> Event:
    return validate(
        IncomingEvent(
            message_id=message_id,
            kind=EventKind.TRACK,
            user_id=user,
            name=name,
            timestamp=at or NOW - timedelta(minutes=1),
            properties=properties,
        ),
        NOW,
    )


def far_future_add(message_id: str, *, user: str = "mallory") -> Event:
    """A ``Product Added`` stamped at the end of year 9999, built past
    validation (as a bug at the edge would let it through): its send's due
    time, an hour later, overflows while the round is being planned."""
    return Event(
        message_id=message_id,
        identity=Identity(user, ""),
        profile_key=f"u:{user}",
        kind=EventKind.TRACK,
        name="Product Added",
        timestamp=datetime(9999, 12, 31, 23, 30, tzinfo=UTC),
        received_at=NOW,
        properties=b'{"cart_id": "c-9999", "product_id": "p1"}',
    )


def ids(events: Sequence[Event]) -> list[str]:
    return [e.message_id for e in events]
