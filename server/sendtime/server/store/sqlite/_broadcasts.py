"""Segments, broadcasts and a broadcast's rows of the ledger, on SQLite."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec

from sendtime.server.domain.broadcasts import ACTIVE_STATES, Broadcast, BroadcastState
from sendtime.server.domain.flows import PlannedSend
from sendtime.server.domain.segments import Segment
from sendtime.server.domain.sends import SendStatus
from sendtime.server.store.sqlite._db import SqliteDatabase
from sendtime.server.store.sqlite._ledger import PlanCounts, Plans
from sendtime.server.store.sqlite._rows import chunks, encode_json, from_micros, micros

_decode_segment = msgspec.json.Decoder(Segment).decode
_decode_broadcast = msgspec.json.Decoder(Broadcast).decode
#: Sends per transaction when writing a broadcast's rows: the writer thread
#: also commits the events, and an ingest call waits behind the transaction
#: in progress. In the broadcast benchmark's server (100,000 profiles, ingest
#: beside it) 250 rows held it about 8 ms and 1,000 rows 20-50 ms.
_ROWS_PER_WRITE = 64
#: Scheduled rows changed per transaction when a broadcast is paused, cancelled
#: or ended: one statement over 100,000 rows held the writer 0.25-0.7 s.
_ROWS_PER_CHANGE = 2000


class SqliteBroadcasts:
    def __init__(self, db: SqliteDatabase, plans: Plans) -> None:
        self._db = db
        self._plans = plans

    async def save_segment(self, segment: Segment) -> None:
        doc = encode_json(segment)

        def save(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO segments VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET doc = excluded.doc",
                (segment.name, doc),
            )

        await self._db.submit(save)

    async def get_segment(self, name: str) -> Segment | None:
        rows = await self._db.read(_select, ("SELECT doc FROM segments WHERE name = ?", (name,)))
        return _decode_segment(rows[0][0]) if rows else None

    async def list_segments(self) -> list[Segment]:
        rows = await self._db.read(_select, ("SELECT doc FROM segments ORDER BY name", ()))
        return [_decode_segment(doc) for (doc,) in rows]

    async def create_broadcast(self, broadcast: Broadcast) -> tuple[Broadcast, bool]:
        doc = encode_json(broadcast)

        def create(conn: sqlite3.Connection) -> tuple[bytes, bool]:
            made = conn.execute(
                "INSERT OR IGNORE INTO broadcasts VALUES (?, ?, ?, ?, ?)",
                (
                    broadcast.id,
                    broadcast.idempotency_key,
                    broadcast.state.value,
                    micros(broadcast.created_at),
                    doc,
                ),
            ).rowcount
            row = conn.execute(
                "SELECT doc FROM broadcasts WHERE idempotency_key = ?", (broadcast.idempotency_key,)
            ).fetchone()
            return row[0], bool(made)

        stored, made = await self._db.submit(create)
        return _decode_broadcast(stored), made

    async def get_broadcast(self, broadcast_id: str) -> Broadcast | None:
        rows = await self._db.read(_select, ("SELECT doc FROM broadcasts WHERE id = ?", (broadcast_id,)))
        return _decode_broadcast(rows[0][0]) if rows else None

    async def list_broadcasts(self, *, active_only: bool = False, limit: int = 100) -> list[Broadcast]:
        if active_only:
            marks = ",".join("?" * len(ACTIVE_STATES))
            sql = f"SELECT doc FROM broadcasts WHERE state IN ({marks}) ORDER BY created_at DESC, id LIMIT ?"  # noqa: S608
            args: tuple[object, ...] = (*sorted(ACTIVE_STATES), limit)
        else:
            sql, args = "SELECT doc FROM broadcasts ORDER BY created_at DESC, id LIMIT ?", (limit,)
        rows = await self._db.read(_select, (sql, args))
        return [_decode_broadcast(doc) for (doc,) in rows]

    async def update_broadcast(self, broadcast: Broadcast, *, expect: Sequence[BroadcastState]) -> bool:
        doc = encode_json(broadcast)
        marks = ",".join("?" * len(expect))

        def update(conn: sqlite3.Connection) -> bool:
            return bool(
                conn.execute(
                    f"UPDATE broadcasts SET state = ?, doc = ? WHERE id = ? AND state IN ({marks})",  # noqa: S608
                    (broadcast.state.value, doc, broadcast.id, *(s.value for s in expect)),
                ).rowcount
            )

        return await self._db.submit(update)

    async def change_broadcast(
        self, broadcast_id: str, change: Callable[[Broadcast], Broadcast | None]
    ) -> Broadcast | None:
        def read_and_write(conn: sqlite3.Connection) -> Broadcast | None:
            # in the writer thread: no other write comes between the read and the write
            row = conn.execute("SELECT doc FROM broadcasts WHERE id = ?", (broadcast_id,)).fetchone()
            changed = change(_decode_broadcast(row[0])) if row is not None else None
            if changed is not None:
                conn.execute(
                    "UPDATE broadcasts SET state = ?, doc = ? WHERE id = ?",
                    (changed.state.value, encode_json(changed), broadcast_id),
                )
            return changed

        return await self._db.submit(read_and_write)

    async def add_recipients(self, sends: Sequence[PlannedSend]) -> int:
        added = 0
        for start in range(0, len(sends), _ROWS_PER_WRITE):
            batch = list(sends[start : start + _ROWS_PER_WRITE])

            def add(conn: sqlite3.Connection, batch: list[PlannedSend] = batch) -> PlanCounts:
                counts, _ = self._plans.apply(conn, batch, [], memo=False)
                return counts

            counts = await self._db.submit(add)
            self._plans.count([counts])
            added += sum(counts[0].values())
        return added

    async def park_sends(self, flow_id: str, parked_at: datetime) -> int:
        at, now = micros(parked_at), micros(datetime.now(UTC))
        return await self._change_scheduled(flow_id, "due_at = ?, updated_at = ?", (at, now))

    async def _change_scheduled(self, flow_id: str, assignments: str, values: tuple[object, ...]) -> int:
        """Set ``assignments`` on every scheduled row of ``flow_id``, in
        transactions of _ROWS_PER_CHANGE rows in id order (an event's commit
        waits behind one of them, not behind all); returns how many changed.
        The broadcast's state was written first, so the dispatcher treats a
        row not reached yet as the state says."""
        changed, after = 0, 0
        while True:

            def change(conn: sqlite3.Connection, after: int = after) -> tuple[int, int | None]:
                (last,) = conn.execute(
                    "SELECT max(id) FROM (SELECT id FROM sends WHERE flow_id = ? AND id > ?"
                    " AND status = 'scheduled' ORDER BY id LIMIT ?)",
                    (flow_id, after, _ROWS_PER_CHANGE),
                ).fetchone()
                if last is None:
                    return 0, None
                return int(
                    conn.execute(
                        f"UPDATE sends SET {assignments} WHERE flow_id = ? AND id > ? AND id <= ?"  # noqa: S608
                        " AND status = 'scheduled'",
                        (*values, flow_id, after, last),
                    ).rowcount
                ), int(last)

            count, last = await self._db.submit(change)
            changed += count
            if last is None:
                return changed
            after = last

    async def parked_sends(self, flow_id: str, parked_at: datetime) -> list[tuple[int, datetime]]:
        # every parked row of a broadcast: a long read, on a connection of its own
        sql = "SELECT id, entry_time FROM sends WHERE flow_id = ? AND status = 'scheduled' AND due_at >= ?"
        args = (flow_id, micros(parked_at))
        rows = await self._db.scan(lambda conn: _select(conn, (sql, args)))
        return [(send_id, from_micros(entry)) for send_id, entry in rows]

    async def reschedule_sends(self, due: Sequence[tuple[int, datetime]]) -> int:
        flat = [value for send_id, at in due for value in (send_id, micros(at))]
        now = micros(datetime.now(UTC))
        changed = 0
        for chunk in chunks(flat, 2):

            def reschedule(conn: sqlite3.Connection, chunk: list[int] = chunk) -> int:
                values = ",".join(["(?,?)"] * (len(chunk) // 2))
                return int(
                    conn.execute(
                        "UPDATE sends SET due_at = due.column2, updated_at = ?"  # noqa: S608
                        f" FROM (VALUES {values}) AS due WHERE sends.id = due.column1 AND status = 'scheduled'",
                        (now, *chunk),
                    ).rowcount
                )

            changed += await self._db.submit(reschedule)
        return changed

    async def settle_remaining(self, flow_id: str, status: SendStatus, reason: str) -> int:
        now = micros(datetime.now(UTC))
        return await self._change_scheduled(
            flow_id, "status = ?, reason = ?, updated_at = ?", (status.value, reason, now)
        )

    async def send_counts(self, flow_id: str) -> dict[tuple[str, str], int]:
        # A connection of its own: counting a large broadcast's rows takes tens
        # of milliseconds, and the shared reader serves the profile loads of
        # ingest and content calls meanwhile.
        sql = "SELECT status, reason, count(*) FROM sends WHERE flow_id = ? GROUP BY status, reason"
        rows = await self._db.scan(lambda conn: _select(conn, (sql, (flow_id,))))
        return {(status, reason): count for status, reason, count in rows}


def _select(conn: sqlite3.Connection, arg: tuple[str, Sequence[object]]) -> list[Any]:
    sql, args = arg
    return conn.execute(sql, args).fetchall()
