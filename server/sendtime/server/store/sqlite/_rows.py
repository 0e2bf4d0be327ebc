"""Values to and from SQLite rows, and multi-row statements."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import msgspec

from sendtime.server.domain.sends import SendRecord, SendStatus

#: Rows per multi-row statement: at most 14 variables a row (sends), under SQLite's 32,766.
ROWS_PER_INSERT: Final = 1000
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

encode_json = msgspec.json.Encoder().encode


def micros(moment: datetime) -> int:
    """Microseconds since the epoch, UTC."""
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


def chunks(flat: list[Any], width: int, rows: int) -> Iterator[list[Any]]:
    step = width * rows
    for start in range(0, len(flat), step):
        yield flat[start : start + step]


def insert_rows(conn: Any, head: str, marks: str, flat: list[Any], tail: str = "") -> int:
    """One multi-row INSERT per chunk of ``flat`` (a row's values one after
    another); returns how many rows it inserted. Multi-row statements, not
    executemany: that lets go of the GIL for every row, and each time a busy
    loop may keep the writer waiting."""
    width = marks.count("?")
    inserted = 0
    for chunk in chunks(flat, width, ROWS_PER_INSERT):
        sql = f"{head} {','.join([marks] * (len(chunk) // width))}{tail}"
        inserted += conn.execute(sql, chunk).rowcount
    return int(inserted)


SEND_COLUMNS: Final = (
    "id, send_key, flow_id, template_id, profile_key, user_id, anonymous_id, entry_key, entry_message_id,"
    " entry_time, received_at, due_at, status, reason, attempts, relay, esp_message_id, template_version,"
    " subscription_group, created_at, updated_at, accepted_at"
)


def send_record(row: tuple[Any, ...]) -> SendRecord:
    (
        id_,
        key,
        flow_id,
        template_id,
        profile_key,
        user_id,
        anonymous_id,
        entry_key,
        entry_message_id,
        entry_time,
        received_at,
        due_at,
        status,
        reason,
        attempts,
        relay,
        esp_message_id,
        template_version,
        group,
        created_at,
        updated_at,
        accepted_at,
    ) = row
    return SendRecord(
        id=id_,
        send_key=key,
        flow_id=flow_id,
        template_id=template_id,
        profile_key=profile_key,
        user_id=user_id,
        anonymous_id=anonymous_id,
        entry_key=entry_key,
        entry_message_id=entry_message_id,
        entry_time=from_micros(entry_time),
        received_at=from_micros(received_at),
        due_at=from_micros(due_at),
        status=SendStatus(status),
        reason=reason,
        attempts=attempts,
        relay=relay,
        esp_message_id=esp_message_id,
        template_version=template_version,
        subscription_group=group,
        created_at=from_micros(created_at),
        updated_at=from_micros(updated_at),
        accepted_at=None if accepted_at is None else from_micros(accepted_at),
    )
