"""What every command group shares: the two errors a command reports, and the
small text views of times, durations, users and content blocks."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sendtime.client import ContentBlock


class UsageError(Exception):
    """A bad argument; the message names it (exit status 2)."""


class CommandError(Exception):
    """The command could not do its work (a file it cannot write, no Chromium);
    the message says what to do (exit status 1)."""


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def iso(moment: dt.datetime | None) -> str | None:
    """RFC 3339 in UTC with a Z, as protobuf's JSON mapping writes times."""
    if moment is None:
        return None
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def who_label(result: Mapping[str, Any]) -> str:
    if result.get("user_id"):
        return f"user {result['user_id']}"
    return f"anonymous id {result['anonymous_id']}"


def blocks_json(blocks: Iterable[ContentBlock]) -> dict[str, Any]:
    """Blocks by name, shaped as the HTTP content endpoint shapes them."""
    return {
        block.name: {
            "data": block.data,
            "source": block.source.value,
            "reason": block.reason.value if block.reason else None,
            "age_ms": round(block.age * 1000, 1),
            "detail": block.detail,
        }
        for block in blocks
    }


def provenance(block: Mapping[str, Any]) -> str:
    """'fresh', 'cached, 1.2 s old', 'fallback (missing data): no profile'."""
    text = str(block["source"])
    if block["reason"]:
        text += f" ({block['reason'].replace('_', ' ')})"
    if block["source"] in ("cached", "stale"):
        text += f", {_age(block['age_ms'] / 1000)} old"
    if block["detail"]:
        text += f": {block['detail']}"
    return text


def _age(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.0f} min"


def write(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise CommandError(f"cannot write {path}: {exc.strerror}") from None
