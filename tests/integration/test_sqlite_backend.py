"""What only the SQLite backend has: its files (personal data, owner-only),
checkpoints beside the writer, and the few statement sizes its connections
prepare."""

from __future__ import annotations

import asyncio
import functools
import os
import sqlite3
import stat
from pathlib import Path
from typing import Any

import msgspec
import pytest

from sendtime.server.domain.broadcasts import PARKED, PlannedRecipient, plan_sends
from sendtime.server.domain.flows import FlowPlanner
from sendtime.server.domain.profile import Profile
from sendtime.server.domain.sends import SendStatus
from sendtime.server.store.sqlite import FILE_MODE, SqliteBackend
from sendtime.server.store.sqlite import _broadcasts as sqlite_broadcasts
from tests.contract.conftest import ABANDONED_CART, Listener, track
from tests.contract.test_broadcasts import NOW, broadcast


async def test_database_files_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "data" / "sendtime.sqlite3"
    old_umask = os.umask(0o022)  # what most shells give: files 0644 unless asked otherwise
    try:
        storage = await SqliteBackend.open(path)
        try:
            await storage.event_store(FlowPlanner([]), Listener()).append([track("m1", "Product Viewed")])
            files = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
            assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == dict.fromkeys(
                (f.name for f in files), FILE_MODE
            )
        finally:
            await storage.close()
        # a file left readable by an older version is closed up at start
        path.chmod(0o644)
        storage = await SqliteBackend.open(path)
        await storage.close()
        assert stat.S_IMODE(path.stat().st_mode) == FILE_MODE
    finally:
        os.umask(old_umask)


async def test_committed_pages_reach_the_database_file_while_it_runs(tmp_path: Path) -> None:
    # The writer thread does not checkpoint (an event's commit would wait behind
    # it): a thread of its own copies the WAL into the database file after commits.
    path = tmp_path / "sendtime.sqlite3"
    storage = await SqliteBackend.open(path)
    try:
        before = path.stat().st_size
        await storage.profiles.save_profiles([(f"u:user{n}", os.urandom(2000)) for n in range(1000)], 1)
        for _ in range(200):  # a fraction of a second after the commit: waited for, not timed
            if path.stat().st_size >= before + 2_000_000:
                break
            await asyncio.sleep(0.05)
        assert path.stat().st_size >= before + 2_000_000
    finally:
        await storage.close()


async def test_pausing_and_cancelling_change_a_broadcasts_rows_a_slice_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # each slice a transaction of its own (an event's commit waits behind one,
    # not behind a 100,000-row statement): every scheduled row is reached, the
    # other broadcast's rows are not
    monkeypatch.setattr(sqlite_broadcasts, "_ROWS_PER_CHANGE", 2)
    storage = await SqliteBackend.open(tmp_path / "sendtime.sqlite3")
    try:
        store = storage.broadcasts
        sale, other = broadcast("winter-sale"), broadcast("other")
        for b, users in ((sale, 5), (other, 3)):
            recipients = [PlannedRecipient(f"u:user{i}", f"user{i}", "", NOW) for i in range(users)]
            assert await store.add_recipients(plan_sends(b, recipients, NOW)) == users
        assert await store.park_sends(sale.flow_id, PARKED) == 5
        assert len(await store.parked_sends(sale.flow_id, PARKED)) == 5
        assert await store.parked_sends(other.flow_id, PARKED) == []
        assert await store.settle_remaining(sale.flow_id, SendStatus.CANCELLED, "broadcast cancelled") == 5
        assert await store.send_counts(sale.flow_id) == {("cancelled", "broadcast cancelled"): 5}
        assert await store.send_counts(other.flow_id) == {("scheduled", ""): 3}
    finally:
        await storage.close()


class _Recording(sqlite3.Connection):
    """A real connection that notes each statement text it is asked to run."""

    texts: set[str]

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        type(self).texts.add(sql)
        return super().execute(sql, *args)


@pytest.fixture
def statement_texts(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    texts: set[str] = set()
    monkeypatch.setattr(_Recording, "texts", texts, raising=False)
    monkeypatch.setattr(sqlite3, "connect", functools.partial(sqlite3.connect, factory=_Recording))
    return texts


async def test_rounds_of_every_size_prepare_a_few_statements(
    tmp_path: Path, statement_texts: set[str]
) -> None:
    # sqlite3 keeps each connection's last 128 prepared statements, and a
    # multi-row statement per size met (up to 512 rows each) made them hold
    # tens of megabytes that grew through a long run.
    storage = await SqliteBackend.open(tmp_path / "sendtime.sqlite3")
    try:
        events = storage.event_store(FlowPlanner([ABANDONED_CART]), Listener())
        serial = 0
        for size in range(1, 101):
            batch = []
            for _ in range(size):
                serial += 1
                cart = f'{{"cart_id": "c{serial}", "product_id": "p1", "order_id": "o{serial}"}}'.encode()
                batch.append(track(f"m{serial}", "Product Added", cart, user=f"u{serial % 37}"))
                batch.append(track(f"o{serial}", "Order Completed", cart, user=f"u{serial % 37}"))
            appended = await events.append(batch[:size])  # adds and orders by turns
            assert len(appended.is_new) == size
        doc = msgspec.msgpack.encode(Profile())
        for size in range(1, 101):
            await storage.profiles.save_profiles([(f"u:{n}", doc) for n in range(size)], size)
            found = await storage.profiles.load_profiles([f"u:{n}" for n in range(size + 3)])
            assert sorted(found) == sorted(f"u:{n}" for n in range(size))
    finally:
        await storage.close()

    def sizes(prefix: str) -> set[int]:
        return {text.count("?") for text in statement_texts if text.startswith(prefix)}

    powers = {1 << n for n in range(8)}  # 1 ... 128
    per_row = {
        "INSERT OR IGNORE INTO events": (10, 0),
        "INSERT OR IGNORE INTO sends": (14, 0),
        "INSERT OR IGNORE INTO flow_exits": (5, 0),
        "UPDATE sends SET status = 'cancelled'": (4, 2),
        "INSERT INTO profiles VALUES": (2, 0),
        "SELECT profile_key, doc FROM profiles": (1, 0),
    }
    for prefix, (width, extra) in per_row.items():
        assert sizes(prefix), prefix  # it ran
        assert sizes(prefix) <= {width * p + extra for p in powers}, prefix
    assert len(sizes("INSERT OR IGNORE INTO events")) >= 5  # the batches were written as asked
