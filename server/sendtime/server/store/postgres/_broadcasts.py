"""Segments, broadcasts and a broadcast's rows of the ledger, on PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import asyncpg
import msgspec

from sendtime.server.domain.broadcasts import ACTIVE_STATES, Broadcast, BroadcastState
from sendtime.server.domain.flows import PlannedSend
from sendtime.server.domain.segments import Segment
from sendtime.server.domain.sends import SendStatus
from sendtime.server.store.postgres._ledger import Plans

_decode_segment = msgspec.json.Decoder(Segment).decode
_decode_broadcast = msgspec.json.Decoder(Broadcast).decode
_encode = msgspec.json.Encoder().encode
#: Sends per transaction when writing a broadcast's rows.
_ROWS_PER_WRITE = 5000


def _count(status: str) -> int:
    return int(status.rsplit(" ", 1)[-1])


class PostgresBroadcasts:
    def __init__(self, pool: asyncpg.Pool, plans: Plans) -> None:
        self._pool = pool
        self._plans = plans

    async def save_segment(self, segment: Segment) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO segments VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET doc = excluded.doc",
                segment.name,
                _encode(segment),
            )

    async def get_segment(self, name: str) -> Segment | None:
        async with self._pool.acquire() as conn:
            doc = await conn.fetchval("SELECT doc FROM segments WHERE name = $1", name)
        return _decode_segment(doc) if doc is not None else None

    async def list_segments(self) -> list[Segment]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch("SELECT doc FROM segments ORDER BY name")
        return [_decode_segment(row[0]) for row in rows]

    async def create_broadcast(self, broadcast: Broadcast) -> tuple[Broadcast, bool]:
        async with self._pool.acquire() as conn, conn.transaction():
            status = await conn.execute(
                "INSERT INTO broadcasts VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                broadcast.id,
                broadcast.idempotency_key,
                broadcast.state.value,
                broadcast.created_at,
                _encode(broadcast),
            )
            doc = await conn.fetchval(
                "SELECT doc FROM broadcasts WHERE idempotency_key = $1", broadcast.idempotency_key
            )
        return _decode_broadcast(doc), _count(status) == 1

    async def get_broadcast(self, broadcast_id: str) -> Broadcast | None:
        async with self._pool.acquire() as conn:
            doc = await conn.fetchval("SELECT doc FROM broadcasts WHERE id = $1", broadcast_id)
        return _decode_broadcast(doc) if doc is not None else None

    async def list_broadcasts(self, *, active_only: bool = False, limit: int = 100) -> list[Broadcast]:
        states = sorted(ACTIVE_STATES) if active_only else [s.value for s in BroadcastState]
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT doc FROM broadcasts WHERE state = ANY($1::text[]) ORDER BY created_at DESC, id LIMIT $2",
                states,
                limit,
            )
        return [_decode_broadcast(row[0]) for row in rows]

    async def update_broadcast(self, broadcast: Broadcast, *, expect: Sequence[BroadcastState]) -> bool:
        async with self._pool.acquire() as conn:
            status = await conn.execute(
                "UPDATE broadcasts SET state = $1, doc = $2 WHERE id = $3 AND state = ANY($4::text[])",
                broadcast.state.value,
                _encode(broadcast),
                broadcast.id,
                [s.value for s in expect],
            )
        return _count(status) == 1

    async def change_broadcast(
        self, broadcast_id: str, change: Callable[[Broadcast], Broadcast | None]
    ) -> Broadcast | None:
        async with self._pool.acquire() as conn, conn.transaction():
            # the row lock keeps every other writer (another replica) out until the commit
            doc = await conn.fetchval("SELECT doc FROM broadcasts WHERE id = $1 FOR UPDATE", broadcast_id)
            changed = change(_decode_broadcast(doc)) if doc is not None else None
            if changed is not None:
                await conn.execute(
                    "UPDATE broadcasts SET state = $1, doc = $2 WHERE id = $3",
                    changed.state.value,
                    _encode(changed),
                    broadcast_id,
                )
        return changed

    async def add_recipients(self, sends: Sequence[PlannedSend]) -> int:
        added = 0
        for start in range(0, len(sends), _ROWS_PER_WRITE):
            batch = self._plans.fresh(sends[start : start + _ROWS_PER_WRITE], memo=False)
            async with self._pool.acquire() as conn, conn.transaction():
                scheduled, _ = await self._plans.insert_sends(conn, batch, datetime.now(UTC))
            self._plans.count([(scheduled, {})])
            added += sum(scheduled.values())
        return added

    async def park_sends(self, flow_id: str, parked_at: datetime) -> int:
        async with self._pool.acquire() as conn:
            return _count(
                await conn.execute(
                    "UPDATE sends SET due_at = $1, updated_at = now() WHERE flow_id = $2 AND status = 'scheduled'",
                    parked_at,
                    flow_id,
                )
            )

    async def parked_sends(self, flow_id: str, parked_at: datetime) -> list[tuple[int, datetime]]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT id, entry_time FROM sends WHERE flow_id = $1 AND status = 'scheduled' AND due_at >= $2",
                flow_id,
                parked_at,
            )
        return [(row[0], row[1]) for row in rows]

    async def reschedule_sends(self, due: Sequence[tuple[int, datetime]]) -> int:
        changed = 0
        for start in range(0, len(due), _ROWS_PER_WRITE):
            chunk = due[start : start + _ROWS_PER_WRITE]
            async with self._pool.acquire() as conn:
                changed += _count(
                    await conn.execute(
                        "UPDATE sends s SET due_at = d.at, updated_at = now()"
                        " FROM unnest($1::bigint[], $2::timestamptz[]) AS d(id, at)"
                        " WHERE s.id = d.id AND s.status = 'scheduled'",
                        [send_id for send_id, _ in chunk],
                        [at for _, at in chunk],
                    )
                )
        return changed

    async def settle_remaining(self, flow_id: str, status: SendStatus, reason: str) -> int:
        async with self._pool.acquire() as conn:
            return _count(
                await conn.execute(
                    "UPDATE sends SET status = $1, reason = $2, updated_at = now()"
                    " WHERE flow_id = $3 AND status = 'scheduled'",
                    status.value,
                    reason,
                    flow_id,
                )
            )

    async def send_counts(self, flow_id: str) -> dict[tuple[str, str], int]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT status, reason, count(*) FROM sends WHERE flow_id = $1 GROUP BY status, reason",
                flow_id,
            )
        return {(row[0], row[1]): row[2] for row in rows}
