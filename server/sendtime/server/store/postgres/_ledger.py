"""The delivery ledger on PostgreSQL, shared by every replica.

- Due sends are claimed with ``FOR UPDATE SKIP LOCKED`` (two replicas never
  claim one send, and neither waits for the other) and a lease: a send claimed
  by a replica that died is "sending" past its lease, and is claimed again
  (it never reached the ESP); one "relaying" past its lease may have, and is
  marked uncertain (never resent) unless the ESP de-duplicates by our key.
- A claim is checked at the hand-over (``LastChecks.attempt``): a replica whose
  lease ran out while it rendered finds the send claimed again, and stops.
- The hand-over takes a per-user advisory lock, then checks exits,
  suppressions and the frequency cap in the statement that marks "relaying":
  two replicas handing over two sends to one user take turns, and the second
  sees the first's "relaying" (READ COMMITTED: each statement sees what
  committed before it started).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import asyncpg

from sendtime.server.domain.flows import PlannedExit, PlannedSend
from sendtime.server.domain.ports import DueSends, HandOver, LastChecks
from sendtime.server.domain.sends import SendRecord, SendStatus

_MAX_KNOWN_SEND_KEYS: Final = 500_000
PlanCounts = tuple[dict[str, int], dict[str, int]]

SEND_COLUMNS: Final = (
    "id, send_key, flow_id, template_id, profile_key, user_id, anonymous_id, entry_key, entry_message_id,"
    " entry_time, received_at, due_at, status, reason, attempts, relay, esp_message_id, template_version,"
    " subscription_group, created_at, updated_at, accepted_at"
)

# New keys and their sends, in one statement: keys in key order (concurrent
# rounds take the same locks in the same order); a key some other round made
# first returns nothing here, so it gets no second send.
_NEW_SENDS: Final = (
    "WITH v AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],"
    " $7::text[], $8::text[], $9::timestamptz[], $10::timestamptz[], $11::timestamptz[], $12::text[])"
    " AS v(k, p, f, t, u, a, e, m, et, r, d, g)),"
    " keys AS (INSERT INTO send_keys SELECT k, p, nextval('send_id') FROM v ORDER BY k"
    " ON CONFLICT DO NOTHING RETURNING send_key, send_id)"
    " INSERT INTO sends (id, send_key, flow_id, template_id, profile_key, user_id, anonymous_id, entry_key,"
    " entry_message_id, entry_time, received_at, due_at, status, subscription_group, created_at, updated_at)"
    " SELECT keys.send_id, k, f, t, p, u, a, e, m, et, r, d, 'scheduled', g, $13, $13"
    " FROM v JOIN keys ON keys.send_key = v.k RETURNING send_key"
)


def exits_sql(first: int) -> tuple[str, str]:
    """Two CTEs (``exited``, ``cancelled``) for a statement that also does
    other things: the exits recorded, and the first exit (in planned order)
    that ends each scheduled send of its profile and flow, entered no later
    than the exit, same entry key or any. Parameters from ``$first``: the
    exits' profile keys, flow ids, entry keys, times, names (``exit_columns``)
    and the time of the change. The sends it can cancel are those committed,
    or written by this transaction's earlier statements."""
    p = [f"${first + i}" for i in range(6)]
    columns = f"{p[0]}::text[], {p[1]}::text[], {p[2]}::text[], {p[3]}::timestamptz[], {p[4]}::text[]"
    return (
        f"exited AS (INSERT INTO flow_exits SELECT * FROM unnest({columns}) ON CONFLICT DO NOTHING)",  # noqa: S608 (only $n marks)
        f"cancelled AS (UPDATE sends SET status = 'cancelled', updated_at = {p[5]},"  # noqa: S608 (only $n marks)
        " reason = 'exit: ' || first.event_name"
        " FROM (SELECT DISTINCT ON (s.profile_key, s.id) s.profile_key, s.id, x.event_name"
        f" FROM unnest({columns}) WITH ORDINALITY AS x(profile_key, flow_id, entry_key, event_time, event_name, seq)"
        " JOIN sends s ON s.profile_key = x.profile_key AND s.flow_id = x.flow_id"
        " WHERE s.status = 'scheduled' AND s.entry_time <= x.event_time AND x.entry_key IN ('*', s.entry_key)"
        " ORDER BY s.profile_key, s.id, x.seq) AS first"
        " WHERE sends.profile_key = first.profile_key AND sends.id = first.id RETURNING sends.flow_id)",
    )


def exit_columns(exits: Sequence[PlannedExit], now: datetime) -> list[Any]:
    return [
        [e.profile_key for e in exits],
        [e.flow_id for e in exits],
        [e.entry_key for e in exits],
        [e.event_time for e in exits],
        [e.event_name for e in exits],
        now,
    ]


_EXITED, _CANCELLED = exits_sql(1)
_EXITS: Final = f"WITH {_EXITED}, {_CANCELLED} SELECT flow_id FROM cancelled"  # noqa: S608 (only $n marks)


class Plans:
    """Writes what a SendPlanner planned, in the caller's transaction."""

    def __init__(self) -> None:
        self._known: set[str] = set()
        self.scheduled: dict[str, int] = {}
        self.cancelled: dict[str, int] = {}

    @property
    def known_keys(self) -> set[str]:
        return self._known

    def fresh(self, sends: Iterable[PlannedSend], *, memo: bool = True) -> list[PlannedSend]:
        """The planned sends whose keys may be new (the others exist: one send per key)."""
        fresh: dict[str, PlannedSend] = {}
        for planned in sends:
            if not memo or planned.send_key not in self._known:
                fresh.setdefault(planned.send_key, planned)
        return [fresh[k] for k in sorted(fresh)]  # the same lock order in every concurrent round

    async def insert_sends(
        self, conn: asyncpg.Connection, fresh: list[PlannedSend], now: datetime
    ) -> tuple[dict[str, int], datetime | None]:
        """``fresh`` (from ``fresh``) written, in one statement: the sends
        scheduled per flow, and the earliest due time."""
        scheduled: dict[str, int] = {}
        earliest: datetime | None = None
        if not fresh:
            return scheduled, earliest
        rows = await conn.fetch(
            _NEW_SENDS,
            [p.send_key for p in fresh],
            [p.profile_key for p in fresh],
            [p.flow_id for p in fresh],
            [p.template_id for p in fresh],
            [p.user_id for p in fresh],
            [p.anonymous_id for p in fresh],
            [p.entry_key for p in fresh],
            [p.entry_message_id for p in fresh],
            [p.entry_time for p in fresh],
            [p.received_at for p in fresh],
            [p.due_at for p in fresh],
            [p.subscription_group for p in fresh],
            now,
        )
        by_key = {p.send_key: p for p in fresh}
        for (key,) in rows:
            planned = by_key[key]
            scheduled[planned.flow_id] = scheduled.get(planned.flow_id, 0) + 1
            if earliest is None or planned.due_at < earliest:
                earliest = planned.due_at
        return scheduled, earliest

    async def apply(
        self,
        conn: asyncpg.Connection,
        sends: list[PlannedSend],
        exits: list[PlannedExit],
        *,
        memo: bool = True,
    ) -> tuple[PlanCounts, datetime | None]:
        """Sends, then exits, each in one statement (the event store folds the
        exits into its last statement instead: one round trip fewer)."""
        now = datetime.now(UTC)
        scheduled, earliest = await self.insert_sends(conn, self.fresh(sends, memo=memo), now)
        cancelled: dict[str, int] = {}
        if exits:
            for (flow_id,) in await conn.fetch(_EXITS, *exit_columns(exits, now)):
                cancelled[flow_id] = cancelled.get(flow_id, 0) + 1
        return (scheduled, cancelled), earliest

    def committed(self, sends: Iterable[PlannedSend]) -> None:
        """After a commit: every key planned exists now (bounded memory)."""
        keys = {p.send_key for p in sends}
        if len(self._known) + len(keys) > _MAX_KNOWN_SEND_KEYS:
            self._known.clear()
        self._known.update(keys)

    def count(self, counts: Iterable[PlanCounts]) -> None:
        for scheduled, cancelled in counts:
            for totals, added in ((self.scheduled, scheduled), (self.cancelled, cancelled)):
                for flow_id, count in added.items():
                    if count:
                        totals[flow_id] = totals.get(flow_id, 0) + count


_EXIT_SQL: Final = (
    "SELECT event_name FROM flow_exits WHERE profile_key = ANY($1::text[]) AND flow_id = $2 AND event_time >= $3"
    " AND entry_key IN ($4, '*') LIMIT 1"
)
_DUPLICATE_SQL: Final = (
    "SELECT 1 FROM sends WHERE profile_key = ANY($1::text[]) AND flow_id = $2 AND entry_key = $3"
    " AND entry_time >= $4 AND status IN ('sent', 'relaying', 'uncertain') LIMIT 1"
)
_SUPPRESSED_SQL: Final = (
    "SELECT 1 FROM suppressions WHERE subject = ANY($1::text[]) AND grp IN ($2, '*') LIMIT 1"
)
_SENT_SINCE_SQL: Final = (
    "SELECT count(*) FROM sends WHERE profile_key = ANY($1::text[]) AND subscription_group != ''"
    " AND status IN ('sent', 'relaying', 'uncertain') AND coalesce(accepted_at, updated_at) >= $2"
)


class PostgresLedger:
    def __init__(self, pool: asyncpg.Pool, plans: Plans, *, lease: timedelta) -> None:
        self._pool = pool
        self._plans = plans
        self._lease = lease
        #: Learnt from recover_interrupted at start: what an expired "relaying" becomes.
        self._relay_idempotent = False

    async def schedule_send(self, planned: PlannedSend) -> SendRecord:
        async with self._pool.acquire() as conn, conn.transaction():
            counts, _ = await self._plans.apply(conn, [planned], [], memo=False)
            row = await conn.fetchrow(
                f"SELECT {SEND_COLUMNS} FROM sends WHERE id = (SELECT send_id FROM send_keys WHERE send_key = $1)",  # noqa: S608 (only $n marks)
                planned.send_key,
            )
        self._plans.count([counts])
        return send_record(row)

    async def claim_due(self, now: datetime, limit: int) -> DueSends:
        async with self._pool.acquire() as conn, conn.transaction():
            await self._expire_leases(conn, now)
            rows = await conn.fetch(
                "WITH due AS (SELECT profile_key, id FROM sends WHERE status = 'scheduled' AND due_at <= $1"  # noqa: S608 (only $n marks)
                " ORDER BY due_at LIMIT $2 FOR UPDATE SKIP LOCKED)"
                " UPDATE sends s SET status = 'sending', attempts = attempts + 1, updated_at = $1,"
                f" lease_until = $3 FROM due WHERE s.profile_key = due.profile_key AND s.id = due.id"
                f" RETURNING {', '.join('s.' + c.strip() for c in SEND_COLUMNS.split(','))}",
                now,
                limit,
                now + self._lease,
            )
            # (expired leases are found by the next claim: the dispatcher claims
            # at least every poll interval)
            next_due = await conn.fetchval("SELECT min(due_at) FROM sends WHERE status = 'scheduled'")
        records = sorted((send_record(row) for row in rows), key=lambda r: r.due_at)
        return DueSends(records, next_due)

    async def _expire_leases(self, conn: asyncpg.Connection, now: datetime) -> tuple[int, int]:
        """Sends whose replica went away: claimed again, or uncertain."""
        again = _count(
            await conn.execute(
                "UPDATE sends SET status = 'scheduled', reason = 'claim expired before relay (replica gone?)',"
                " updated_at = $1, lease_until = NULL WHERE (profile_key, id) IN (SELECT profile_key, id FROM sends"
                " WHERE status = 'sending' AND lease_until < $1 FOR UPDATE SKIP LOCKED)",
                now,
            )
        )
        if self._relay_idempotent:
            status, reason = "scheduled", "claim expired during relay; the ESP de-duplicates by key"
        else:
            status, reason = (
                "uncertain",
                "claim expired while the ESP had it; not resent, to never send twice",
            )
        unsure = _count(
            await conn.execute(
                "UPDATE sends SET status = $2, reason = $3, updated_at = $1, lease_until = NULL"
                " WHERE (profile_key, id) IN (SELECT profile_key, id FROM sends"
                " WHERE status = 'relaying' AND lease_until < $1 FOR UPDATE SKIP LOCKED)",
                now,
                status,
                reason,
            )
        )
        return (again + unsure, 0) if self._relay_idempotent else (again, unsure)

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
        now = datetime.now(UTC)
        sets = ["status = $1", "reason = $2", "updated_at = $3"]
        values: list[Any] = [status.value, reason, now]
        if status not in (SendStatus.SENDING, SendStatus.RELAYING):
            sets.append("lease_until = NULL")
        for column, value in (
            ("due_at", due_at),
            ("relay", relay),
            ("esp_message_id", esp_message_id),
            ("template_version", template_version),
            ("accepted_at", accepted_at),
        ):
            if value is not None:
                values.append(value)
                sets.append(f"{column} = ${len(values)}")
        sql = (
            f"UPDATE sends SET {', '.join(sets)} WHERE id = ${len(values) + 1} AND status = ${len(values) + 2}"  # noqa: S608
            " RETURNING profile_key"
        )
        async with self._pool.acquire() as conn, conn.transaction():
            profile_key = await conn.fetchval(sql, *values, send_id, expect.value)
            if profile_key is not None and attempt is not None:
                await conn.execute(
                    "INSERT INTO send_attempts VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (profile_key, send_id,"
                    " attempt, outcome) DO UPDATE SET at = excluded.at, detail = excluded.detail",
                    profile_key,
                    send_id,
                    attempt[0],
                    now,
                    attempt[1],
                    attempt[2],
                )
        return profile_key is not None

    async def hand_over(
        self, send_id: int, *, relay: str, template_version: str, checks: LastChecks
    ) -> HandOver:
        now = datetime.now(UTC)
        subjects = list(checks.subjects) if checks.group else []
        # the person's keys: exits and the cap count for every id of the person
        keys = sorted(set(checks.person_keys) | {checks.profile_key})
        others = [key for key in keys if key != checks.profile_key]
        duplicates = checks.duplicate_since is not None and bool(others) and bool(checks.flow_id)
        conditions = ["id = $1", "status = 'sending'"]
        values: list[Any] = [send_id, relay, template_version, now, now + self._lease]
        if checks.attempt:
            values.append(checks.attempt)
            conditions.append(f"attempts = ${len(values)}")
        if checks.flow_id:
            values += (keys, checks.flow_id, checks.entry_time, checks.entry_key)
            n = len(values)
            conditions.append(
                f"NOT EXISTS (SELECT 1 FROM flow_exits WHERE profile_key = ANY(${n - 3}::text[]) AND flow_id = ${n - 2}"  # noqa: S608 (only $n marks)
                f" AND event_time >= ${n - 1} AND entry_key IN (${n}, '*'))"
            )
        if duplicates:
            values += (others, checks.flow_id, checks.entry_key, checks.duplicate_since)
            n = len(values)
            conditions.append(
                f"NOT EXISTS (SELECT 1 FROM sends AS other WHERE other.profile_key = ANY(${n - 3}::text[])"  # noqa: S608 (only $n marks)
                f" AND other.flow_id = ${n - 2} AND other.entry_key = ${n - 1} AND other.entry_time >= ${n}"
                " AND other.status IN ('sent', 'relaying', 'uncertain'))"
            )
        if subjects:
            values += (subjects, checks.group)
            n = len(values)
            conditions.append(
                f"NOT EXISTS (SELECT 1 FROM suppressions WHERE subject = ANY(${n - 1}::text[]) AND grp IN (${n}, '*'))"  # noqa: S608 (only $n marks)
            )
        if checks.cap_since is not None:
            values += (keys, checks.cap_since, checks.cap_count)
            n = len(values)
            conditions.append(
                f"(SELECT count(*) FROM sends WHERE profile_key = ANY(${n - 2}::text[]) AND subscription_group != ''"  # noqa: S608 (only $n marks)
                f" AND status IN ('sent', 'relaying', 'uncertain') AND coalesce(accepted_at, updated_at) >= ${n - 1})"
                f" < ${n}"
            )
        sql = (
            "UPDATE sends SET status = 'relaying', reason = '', relay = $2, template_version = $3,"  # noqa: S608
            f" updated_at = $4, lease_until = $5 WHERE {' AND '.join(conditions)}"
        )
        async with self._pool.acquire() as conn, conn.transaction():
            # Hand-overs to one person take turns, on every replica: the cap
            # and the duplicate check see the "relaying" of a hand-over that
            # committed just before (each key locked, in key order: no deadlock).
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(key, 0)) FROM unnest($1::text[]) AS key ORDER BY key",
                keys,
            )
            if _count(await conn.execute(sql, *values)):
                return HandOver(True)
            exit_event = (
                await conn.fetchval(_EXIT_SQL, keys, checks.flow_id, checks.entry_time, checks.entry_key)
                if checks.flow_id
                else None
            )
            duplicate = duplicates and (
                await conn.fetchval(
                    _DUPLICATE_SQL, others, checks.flow_id, checks.entry_key, checks.duplicate_since
                )
                is not None
            )
            suppressed = (
                bool(subjects) and await conn.fetchval(_SUPPRESSED_SQL, subjects, checks.group) is not None
            )
            sent = (
                int(await conn.fetchval(_SENT_SINCE_SQL, keys, checks.cap_since))
                if checks.cap_since is not None
                else 0
            )
        capped = checks.cap_since is not None and sent >= checks.cap_count
        return HandOver(
            False, exit_event=exit_event, suppressed=suppressed, capped=capped, sent=sent, duplicate=duplicate
        )

    async def recover_interrupted(
        self, *, relay_idempotent: bool, now: datetime | None = None
    ) -> tuple[int, int]:
        """Several replicas share the ledger: only the sends whose lease ran
        out are another's to recover (claim_due keeps doing it as it claims)."""
        self._relay_idempotent = relay_idempotent
        async with self._pool.acquire() as conn, conn.transaction():
            return await self._expire_leases(conn, now or datetime.now(UTC))

    async def get_send(self, *, send_id: int | None = None, send_key: str | None = None) -> SendRecord | None:
        async with self._pool.acquire() as conn:
            if send_id is not None:
                row = await conn.fetchrow(f"SELECT {SEND_COLUMNS} FROM sends WHERE id = $1", send_id)  # noqa: S608
            else:
                row = await conn.fetchrow(
                    f"SELECT {SEND_COLUMNS} FROM sends WHERE id = (SELECT send_id FROM send_keys"  # noqa: S608
                    " WHERE send_key = $1)",
                    send_key,
                )
        return send_record(row) if row else None

    async def list_sends(
        self,
        *,
        profile_key: str | None = None,
        flow_id: str | None = None,
        limit: int = 50,
        before_id: int | None = None,
    ) -> list[SendRecord]:
        where: list[str] = ["true"]
        values: list[Any] = []
        for column, value in (("profile_key", profile_key), ("flow_id", flow_id), ("id", before_id)):
            if value is not None:
                values.append(value)
                where.append(f"{column} {'<' if column == 'id' else '='} ${len(values)}")
        values.append(limit)
        sql = (
            f"SELECT {SEND_COLUMNS} FROM sends WHERE {' AND '.join(where)}"  # noqa: S608
            f" ORDER BY id DESC LIMIT ${len(values)}"
        )
        async with self._pool.acquire() as conn:
            return [send_record(row) for row in await conn.fetch(sql, *values)]

    async def flow_counts(self) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {}
        async with self._pool.acquire() as conn:
            for flow_id, status, count in await conn.fetch(
                "SELECT flow_id, status, count(*) FROM sends GROUP BY 1, 2"
            ):
                counts.setdefault(flow_id, {})[status] = count
        return counts

    async def sent_since(self, profile_key: str, since: datetime) -> int:
        async with self._pool.acquire() as conn:
            return int(await conn.fetchval(_SENT_SINCE_SQL, [profile_key], since))

    async def exit_since(self, profile_key: str, flow_id: str, entry_key: str, since: datetime) -> str | None:
        async with self._pool.acquire() as conn:
            name: str | None = await conn.fetchval(_EXIT_SQL, [profile_key], flow_id, since, entry_key)
            return name


def _count(status: str) -> int:
    """The row count of a command tag ("UPDATE 3")."""
    return int(status.rsplit(" ", 1)[-1])


def send_record(row: Any) -> SendRecord:
    return SendRecord(
        id=row["id"],
        send_key=row["send_key"],
        flow_id=row["flow_id"],
        template_id=row["template_id"],
        profile_key=row["profile_key"],
        user_id=row["user_id"],
        anonymous_id=row["anonymous_id"],
        entry_key=row["entry_key"],
        entry_message_id=row["entry_message_id"],
        entry_time=row["entry_time"],
        received_at=row["received_at"],
        due_at=row["due_at"],
        status=SendStatus(row["status"]),
        reason=row["reason"],
        attempts=row["attempts"],
        relay=row["relay"],
        esp_message_id=row["esp_message_id"],
        template_version=row["template_version"],
        subscription_group=row["subscription_group"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        accepted_at=row["accepted_at"],
    )
