"""Arguments more than one command group reads: who the command is about, and
values given as text, files or JSON."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

from sendtime.cli._output import UsageError


def add_identity(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", "--user-id", dest="user_id", metavar="USER", help="the user id")
    parser.add_argument("--anonymous-id", help="the anonymous id (for a visitor not yet known)")


def who(args: argparse.Namespace, user_id: str | None) -> dict[str, str]:
    """The one recipient the command names: a user id or an anonymous id."""
    if bool(user_id) == bool(args.anonymous_id):
        raise UsageError("give exactly one of the user id and --anonymous-id")
    return {"user_id": user_id} if user_id else {"anonymous_id": args.anonymous_id}


def text_or_file(value: str) -> str:
    """The value itself, or the contents of FILE for @FILE."""
    return read(Path(value[1:])) if value.startswith("@") else value


def read(path: Path) -> str:
    if str(path) == "-":
        return sys.stdin.read()
    try:
        return path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None


def json_object(flag: str, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{flag}: not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{flag}: must be a JSON object, not {type(value).__name__}")
    return value


def timestamp(text: str) -> dt.datetime:
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"timestamp: {text!r} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise UsageError(f"timestamp: {text!r} needs a UTC offset, e.g. {text}Z or {text}+02:00")
    return moment
