"""Values to and from SQLite rows, and multi-row statements."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any, Final

import msgspec

from sendtime.server.domain.sends import SendRecord, SendStatus

#: Rows per multi-row statement: at most 14 variables a row (sends), under SQLite's 32,766.
ROWS_PER_INSERT: Final = 512
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

encode_json = msgspec.json.Encoder().encode


def micros(moment: datetime) -> int:
    """Microseconds since the epoch, UTC."""
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


def chunks(flat: list[Any], width: int) -> Iterator[list[Any]]:
    """``flat`` (rows of ``width`` values one after another) in chunks of a
    power of two rows each, largest first, at most ROWS_PER_INSERT: 1,000 rows
    go as 512 + 256 + 128 + 64 + 32 + 8. A connection keeps every statement it
    prepared in its cache (sqlite3 keeps 128), and a prepared multi-row
    statement is large: one statement per row count met would fill the cache
    with hundreds of kilobytes each, while these few sizes are reused."""
    rows = len(flat) // width
    start = 0
    while start < rows:
        count = min(ROWS_PER_INSERT, 1 << ((rows - start).bit_length() - 1))
        yield flat[start * width : (start + count) * width]
        start += count


def insert_rows(conn: Any, head: str, marks: str, flat: list[Any], tail: str = "") -> int:
    """One multi-row INSERT per chunk of ``flat`` (a row's values one after
    another); returns how many rows it inserted. Multi-row statements, not
    executemany: that lets go of the GIL for every row, and each time a busy
    loop may keep the writer waiting."""
    width = marks.count("?")
    inserted = 0
    for chunk in chunks(flat, width):
        inserted += conn.execute(_insert_sql(head, marks, len(chunk) // width, tail), chunk).rowcount
    return int(inserted)


@cache
def _insert_sql(head: str, marks: str, rows: int, tail: str) -> str:
    return f"{head} {','.join([marks] * rows)}{tail}"


def padded(values: list[Any]) -> list[Any]:
    """``values`` for an ``IN (...)`` list, its last one repeated up to a power
    of two (the same answer): few statement sizes, as with ``chunks``."""
    size = 1 << (len(values) - 1).bit_length() if values else 0
    return values + values[-1:] * (size - len(values))


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
