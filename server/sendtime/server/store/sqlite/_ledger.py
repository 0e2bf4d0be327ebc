"""The delivery ledger on SQLite: one row per send and its state machine
(domain.sends), the plans that schedule and cancel sends, and the hand-over
that checks exits, suppressions and the frequency cap in one statement."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from functools import cache
from typing import Any, Final, TypeVar

from sendtime.server.domain.flows import PlannedExit, PlannedSend
from sendtime.server.domain.ports import DueSends, HandOver, LastChecks
from sendtime.server.domain.sends import SendRecord, SendStatus
from sendtime.server.store.sqlite._db import SqliteDatabase
from sendtime.server.store.sqlite._rows import (
    SEND_COLUMNS,
    chunks,
    from_micros,
    insert_rows,
    micros,
    send_record,
)

_MAX_KNOWN_SEND_KEYS: Final = 500_000

#: Sends scheduled and cancelled by flow id, in one transaction.
PlanCounts = tuple[dict[str, int], dict[str, int]]


class Plans:
    """Writes what a SendPlanner planned, in the caller's transaction, and
    counts it. Touched by the writer thread only, except ``counted`` and the
    totals (on the loop, once the transaction committed)."""

    def __init__(self) -> None:
        # Send keys known to be in the ledger, and those the transaction in
        # progress adds (they count only once it commits).
        self._known: set[str] = set()
        self._pending: set[str] = set()
        # On the loop, from what committed transactions report.
        self.scheduled: dict[str, int] = {}
        self.cancelled: dict[str, int] = {}

    @property
    def known_keys(self) -> set[str]:
        return self._known

    def apply(
        self,
        conn: sqlite3.Connection,
        sends: list[PlannedSend],
        exits: list[PlannedExit],
        *,
        memo: bool = True,
    ) -> tuple[PlanCounts, datetime | None]:
        """Schedule and cancel in the transaction of the events that caused it;
        returns how many were scheduled and cancelled by flow, and the earliest
        due time scheduled. With ``memo``, call ``committed`` or ``rolled_back`` after.

        Set-based, a few statements per flow and round rather than one or two
        per event: each statement lets go of the GIL, and a busy event loop can
        then keep the writer waiting for it (up to the switch interval)."""
        now = micros(datetime.now(UTC))
        scheduled: dict[str, int] = {}
        cancelled: dict[str, int] = {}
        earliest: datetime | None = None
        # Most entries repeat a key that is already scheduled (every view of a
        # browse-abandonment week, every add to one cart): skip those without
        # touching SQLite. A send row is never deleted, so a key known to exist
        # stays true; keys become "known" only once their transaction commits.
        fresh: dict[str, PlannedSend] = {}
        for planned in sends:
            if not memo or planned.send_key not in self._known:
                fresh.setdefault(planned.send_key, planned)
        sends = list(fresh.values())
        if memo:
            self._pending.update(fresh)
        if sends:
            for flow_id, rows in _by_flow(sends, _send_row, now).items():
                scheduled[flow_id] = insert_rows(conn, _SCHEDULE_SQL, _SCHEDULE_MARKS, rows)
            earliest = min(p.due_at for p in sends)
        if exits:
            insert_rows(conn, "INSERT OR IGNORE INTO flow_exits VALUES", "(?,?,?,?,?)", _exit_rows(exits))
            for flow_id, rows in _by_flow(exits, _cancel_row, 0).items():
                cancelled[flow_id] = sum(
                    conn.execute(_cancel_sql(len(chunk) // 4), (now, *chunk, flow_id)).rowcount
                    for chunk in chunks(rows, 4)
                )
        return (scheduled, cancelled), earliest

    def committed(self) -> None:
        """After a commit: the keys it scheduled exist now (bounded memory)."""
        if len(self._known) + len(self._pending) > _MAX_KNOWN_SEND_KEYS:
            self._known.clear()
        self._known.update(self._pending)
        self._pending.clear()

    def rolled_back(self) -> None:
        self._pending.clear()  # forgetting is always safe

    def count(self, counts: Iterable[PlanCounts]) -> None:
        """On the loop, once the transaction that made them committed."""
        for scheduled, cancelled in counts:
            for totals, added in ((self.scheduled, scheduled), (self.cancelled, cancelled)):
                for flow_id, count in added.items():
                    if count:
                        totals[flow_id] = totals.get(flow_id, 0) + count


class SqliteLedger:
    def __init__(self, db: SqliteDatabase, plans: Plans) -> None:
        self._db = db
        self._plans = plans

    async def schedule_send(self, planned: PlannedSend) -> SendRecord:
        def schedule(conn: sqlite3.Connection) -> tuple[SendRecord, PlanCounts]:
            counts, _ = self._plans.apply(conn, [planned], [], memo=False)
            row = conn.execute(
                f"SELECT {SEND_COLUMNS} FROM sends WHERE send_key = ?",  # noqa: S608
                (planned.send_key,),
            ).fetchone()
            return send_record(row), counts

        record, counts = await self._db.submit(schedule)
        self._plans.count([counts])
        return record

    async def claim_due(self, now: datetime, limit: int) -> DueSends:
        """One trip through the writer tells the dispatcher both what to send and when to look again."""
        at = micros(now)

        def claim(conn: sqlite3.Connection) -> DueSends:
            rows = conn.execute(
                f"UPDATE sends SET status = 'sending', attempts = attempts + 1, updated_at = ?"  # noqa: S608
                f" WHERE id IN (SELECT id FROM sends WHERE status = 'scheduled' AND due_at <= ?"
                f" ORDER BY due_at LIMIT ?) RETURNING {SEND_COLUMNS}",
                (at, at, limit),
            ).fetchall()
            return DueSends([send_record(row) for row in rows], _select_next_due(conn))

        return await self._db.submit(claim)

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
        now = micros(datetime.now(UTC))
        sets = ["status = ?", "reason = ?", "updated_at = ?"]
        values: list[Any] = [status.value, reason, now]
        for column, value in (
            ("due_at", None if due_at is None else micros(due_at)),
            ("relay", relay),
            ("esp_message_id", esp_message_id),
            ("template_version", template_version),
            ("accepted_at", None if accepted_at is None else micros(accepted_at)),
        ):
            if value is not None:
                sets.append(f"{column} = ?")
                values.append(value)

        def update(conn: sqlite3.Connection) -> bool:
            changed = conn.execute(
                f"UPDATE sends SET {', '.join(sets)} WHERE id = ? AND status = ?",  # noqa: S608 (fixed names)
                (*values, send_id, expect.value),
            ).rowcount
            if changed and attempt is not None:
                conn.execute(
                    "INSERT OR REPLACE INTO send_attempts VALUES (?, ?, ?, ?, ?)",
                    (send_id, *attempt[:1], now, *attempt[1:]),
                )
            return bool(changed)

        return await self._db.submit(update)

    async def hand_over(
        self, send_id: int, *, relay: str, template_version: str, checks: LastChecks
    ) -> HandOver:
        """The writer stores exit events and suppressions too, so none
        committed before this is missed, and one committed after it comes too
        late to matter. The checks are conditions of the UPDATE itself (one
        statement: the writer thread takes the GIL back once); only a send
        they stop is looked at again, to say why."""
        now = micros(datetime.now(UTC))
        # the person's keys: exits and the cap count for every id of the person
        keys = sorted(set(checks.person_keys) | {checks.profile_key})
        others = [key for key in keys if key != checks.profile_key]
        entry_time = micros(checks.entry_time)
        subjects = list(checks.subjects) if checks.group else []
        cap_since = None if checks.cap_since is None else micros(checks.cap_since)
        duplicate_since = None if checks.duplicate_since is None else micros(checks.duplicate_since)
        duplicates = duplicate_since is not None and bool(others) and bool(checks.flow_id)
        conditions = ["id = ?", "status = 'sending'"]
        values: list[Any] = [relay, template_version, now, send_id]
        if checks.attempt:
            conditions.append("attempts = ?")
            values.append(checks.attempt)
        if checks.flow_id:
            conditions.append(f"NOT EXISTS ({exit_sql(len(keys))})")
            values += (*keys, checks.flow_id, entry_time, checks.entry_key)
        if duplicates:
            conditions.append(f"NOT EXISTS ({duplicate_sql(len(others))})")
            values += (*others, checks.flow_id, checks.entry_key, duplicate_since)
        if subjects:
            conditions.append(f"NOT EXISTS ({suppressed_sql(len(subjects))})")
            values += (*subjects, checks.group)
        if cap_since is not None:
            conditions.append(f"({sent_since_sql(len(keys))}) < ?")
            values += (*keys, cap_since, checks.cap_count)
        sql = (
            "UPDATE sends SET status = 'relaying', reason = '', relay = ?, template_version = ?,"  # noqa: S608
            f" updated_at = ? WHERE {' AND '.join(conditions)}"
        )

        def hand(conn: sqlite3.Connection) -> HandOver:
            if conn.execute(sql, values).rowcount:
                return HandOver(True)
            exit_event = (
                _select_exit(conn, keys, checks.flow_id, checks.entry_key, entry_time)
                if checks.flow_id
                else None
            )
            duplicate = duplicates and (
                conn.execute(
                    duplicate_sql(len(others)), (*others, checks.flow_id, checks.entry_key, duplicate_since)
                ).fetchone()
                is not None
            )
            suppressed = bool(subjects) and select_suppressed(conn, (subjects, checks.group))
            sent = _select_sent_since(conn, (keys, cap_since)) if cap_since is not None else 0
            capped = cap_since is not None and sent >= checks.cap_count
            return HandOver(
                False,
                exit_event=exit_event,
                suppressed=suppressed,
                capped=capped,
                sent=sent,
                duplicate=duplicate,
            )

        return await self._db.submit(hand)

    async def recover_interrupted(
        self, *, relay_idempotent: bool, now: datetime | None = None
    ) -> tuple[int, int]:
        """One process: whatever is "sending" or "relaying" at start was its own."""
        at = micros(now or datetime.now(UTC))

        def recover(conn: sqlite3.Connection) -> tuple[int, int]:
            again = conn.execute(
                "UPDATE sends SET status = 'scheduled', reason = 'interrupted before relay', updated_at = ?"
                " WHERE status = 'sending'",
                (at,),
            ).rowcount
            if relay_idempotent:
                again += conn.execute(
                    "UPDATE sends SET status = 'scheduled', reason = 'interrupted during relay; the ESP"
                    " de-duplicates by key', updated_at = ? WHERE status = 'relaying'",
                    (at,),
                ).rowcount
                unsure = 0
            else:
                unsure = conn.execute(
                    "UPDATE sends SET status = 'uncertain', reason = 'interrupted while the ESP had it;"
                    " not resent, to never send twice', updated_at = ? WHERE status = 'relaying'",
                    (at,),
                ).rowcount
            return again, unsure

        return await self._db.submit(recover)

    async def get_send(self, *, send_id: int | None = None, send_key: str | None = None) -> SendRecord | None:
        return await self._db.read(_select_send, (send_id, send_key))

    async def list_sends(
        self,
        *,
        profile_key: str | None = None,
        flow_id: str | None = None,
        limit: int = 50,
        before_id: int | None = None,
    ) -> list[SendRecord]:
        return await self._db.read(_select_sends, (profile_key, flow_id, limit, before_id))

    async def flow_counts(self) -> dict[str, dict[str, int]]:
        # every send row: on a connection of its own, not holding up the reader's short reads
        return await self._db.scan(lambda conn: _select_flow_counts(conn, None))

    async def sent_since(self, profile_key: str, since: datetime) -> int:
        return await self._db.read(_select_sent_since, ([profile_key], micros(since)))


_SCHEDULE_SQL: Final = (
    "INSERT OR IGNORE INTO sends (send_key, flow_id, template_id, profile_key, user_id, anonymous_id,"
    " entry_key, entry_message_id, entry_time, received_at, due_at, status, subscription_group,"
    " created_at, updated_at) VALUES"
)
_SCHEDULE_MARKS: Final = "(?,?,?,?,?,?,?,?,?,?,?,'scheduled',?,?,?)"
_Planned = TypeVar("_Planned", PlannedSend, PlannedExit)


def _send_row(p: PlannedSend, now: int) -> tuple[Any, ...]:
    return (
        p.send_key,
        p.flow_id,
        p.template_id,
        p.profile_key,
        p.user_id,
        p.anonymous_id,
        p.entry_key,
        p.entry_message_id,
        micros(p.entry_time),
        micros(p.received_at),
        micros(p.due_at),
        p.subscription_group,
        now,
        now,
    )


def _cancel_row(exit_: PlannedExit, _now: int) -> tuple[Any, ...]:
    return (exit_.profile_key, exit_.entry_key, micros(exit_.event_time), exit_.event_name)


def _exit_rows(exits: list[PlannedExit]) -> list[Any]:
    rows: list[Any] = []
    for e in exits:
        rows += (e.profile_key, e.flow_id, e.entry_key, micros(e.event_time), e.event_name)
    return rows


def _by_flow(
    planned: list[_Planned], row: Callable[[_Planned, int], tuple[Any, ...]], now: int
) -> dict[str, list[Any]]:
    """Flat statement parameters per flow, in the order planned."""
    flat: dict[str, list[Any]] = {}
    for item in planned:
        flat.setdefault(item.flow_id, []).extend(row(item, now))
    return flat


@cache
def _cancel_sql(rows: int) -> str:
    """Cancel the scheduled sends of one flow that any of ``rows`` exits ends:
    same profile, entered no later than the exit, same entry key or any. Named
    after the first such exit of the round, as one statement per exit would
    (SQLite takes a bare column beside min() from the row with the minimum).
    Driven from the exits (CROSS JOIN fixes that order: SQLite would rather
    scan the flow's sends), each looking up its profile's sends by index.
    Exits are (seq, profile_key, entry_key, event_time, event_name) rows; no
    WITH clause, for Python's sqlite3 reports no rowcount for one."""
    values = ",".join(f"({n},?,?,?,?)" for n in range(rows))
    return (
        "UPDATE sends SET status = 'cancelled', updated_at = ?, reason = 'exit: ' || first.event_name"  # noqa: S608
        " FROM (SELECT sends.id AS id, min(exits.column1), exits.column5 AS event_name"
        f" FROM (VALUES {values}) AS exits CROSS JOIN sends"  # only numbers and "?" marks
        " ON sends.profile_key = exits.column2 AND sends.flow_id = ?"
        " WHERE sends.status = 'scheduled' AND sends.entry_time <= exits.column4"
        " AND exits.column3 IN ('*', sends.entry_key) GROUP BY sends.id) AS first"
        " WHERE sends.id = first.id"
    )


@cache
def exit_sql(keys: int) -> str:
    """An exit of the flow entry under any of ``keys`` profile keys, at or after the entry."""
    marks = ",".join("?" * keys)
    return (
        f"SELECT event_name FROM flow_exits WHERE profile_key IN ({marks}) AND flow_id = ?"  # noqa: S608 (only "?" marks)
        " AND event_time >= ? AND entry_key IN (?, '*') LIMIT 1"
    )


@cache
def duplicate_sql(keys: int) -> str:
    """A send of the same flow entry to one of ``keys``, entered since a time,
    that went (or may have gone) to the ESP."""
    marks = ",".join("?" * keys)
    return (
        f"SELECT 1 FROM sends WHERE profile_key IN ({marks}) AND flow_id = ? AND entry_key = ?"  # noqa: S608 (only "?" marks)
        " AND entry_time >= ? AND status IN ('sent', 'relaying', 'uncertain') LIMIT 1"
    )


@cache
def sent_since_sql(keys: int) -> str:
    """Counts what may have reached the person: sent (accepted), and also
    relaying (handed to the ESP, answer pending) and uncertain (the ESP may
    have taken it), timed by acceptance or else by the hand-over. Without the
    in-flight ones, two sends for one user handed over while the other was at
    the ESP would both pass a cap of one."""
    marks = ",".join("?" * keys)
    return (
        f"SELECT count(*) FROM sends WHERE profile_key IN ({marks}) AND subscription_group != ''"  # noqa: S608 (only "?" marks)
        " AND status IN ('sent', 'relaying', 'uncertain') AND coalesce(accepted_at, updated_at) >= ?"
    )


@cache
def suppressed_sql(subjects: int) -> str:
    marks = ",".join("?" * subjects)
    return f"SELECT 1 FROM suppressions WHERE subject IN ({marks}) AND grp IN (?, '*') LIMIT 1"  # noqa: S608


def select_exit(conn: sqlite3.Connection, args: tuple[str, str, str, int]) -> str | None:
    profile_key, flow_id, entry_key, since = args
    return _select_exit(conn, [profile_key], flow_id, entry_key, since)


def _select_exit(
    conn: sqlite3.Connection, keys: list[str], flow_id: str, entry_key: str, since: int
) -> str | None:
    row = conn.execute(exit_sql(len(keys)), (*keys, flow_id, since, entry_key)).fetchone()
    return row[0] if row else None


def select_suppressed(conn: sqlite3.Connection, args: tuple[list[str], str]) -> bool:
    subjects, group = args
    return conn.execute(suppressed_sql(len(subjects)), (*subjects, group)).fetchone() is not None


def _select_sent_since(conn: sqlite3.Connection, args: tuple[list[str], int]) -> int:
    keys, since = args
    return int(conn.execute(sent_since_sql(len(keys)), (*keys, since)).fetchone()[0])


def _select_send(conn: sqlite3.Connection, args: tuple[int | None, str | None]) -> SendRecord | None:
    send_id, send_key = args
    column, value = ("id", send_id) if send_id is not None else ("send_key", send_key)
    row = conn.execute(f"SELECT {SEND_COLUMNS} FROM sends WHERE {column} = ?", (value,)).fetchone()  # noqa: S608
    return send_record(row) if row else None


def _select_sends(
    conn: sqlite3.Connection, args: tuple[str | None, str | None, int, int | None]
) -> list[SendRecord]:
    profile_key, flow_id, limit, before_id = args
    where: list[str] = ["1 = 1"]
    values: list[Any] = []
    for column, value in (("profile_key", profile_key), ("flow_id", flow_id)):
        if value is not None:
            where.append(f"{column} = ?")
            values.append(value)
    if before_id is not None:
        where.append("id < ?")
        values.append(before_id)
    sql = f"SELECT {SEND_COLUMNS} FROM sends WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?"  # noqa: S608
    return [send_record(row) for row in conn.execute(sql, (*values, limit))]


def _select_flow_counts(conn: sqlite3.Connection, _arg: object) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for flow_id, status, count in conn.execute("SELECT flow_id, status, count(*) FROM sends GROUP BY 1, 2"):
        counts.setdefault(flow_id, {})[status] = count
    return counts


def _select_next_due(conn: sqlite3.Connection) -> datetime | None:
    row = conn.execute("SELECT min(due_at) FROM sends WHERE status = 'scheduled'").fetchone()
    return None if row[0] is None else from_micros(row[0])
