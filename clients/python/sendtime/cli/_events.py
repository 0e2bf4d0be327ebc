"""``sendtime track`` and ``sendtime identify``: send one event."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from sendtime.cli._arguments import add_identity, json_object, read, text_or_file, timestamp
from sendtime.cli._connection import command
from sendtime.cli._output import UsageError
from sendtime.cli._plugins import Subcommands
from sendtime.client import Ack, Client, Outcome

#: The keys of a whole event given to ``track --event``, with Segment's
#: camelCase spellings, mapped to the client's argument names.
_EVENT_KEYS: Final = {
    "name": "name",
    "event": "name",
    "properties": "properties",
    "user_id": "user_id",
    "userId": "user_id",
    "anonymous_id": "anonymous_id",
    "anonymousId": "anonymous_id",
    "message_id": "message_id",
    "messageId": "message_id",
    "timestamp": "timestamp",
}
_TRUE: Final = frozenset({"true", "yes", "1", "in", "opted_in"})
_FALSE: Final = frozenset({"false", "no", "0", "out", "opted_out"})


def register(commands: Subcommands, connection: argparse.ArgumentParser) -> None:
    track = commands.add_parser(
        "track",
        parents=[connection],
        help="send one tracked event",
        description="Send one event, from flags or as a whole event in JSON (--event).",
    )
    track.add_argument("name", nargs="?", metavar="NAME", help='event name, e.g. "Product Added"')
    add_identity(track)
    properties = track.add_mutually_exclusive_group()
    properties.add_argument("--properties", metavar="JSON", help="properties as a JSON object")
    properties.add_argument(
        "--json-file",
        type=Path,
        metavar="FILE",
        help="read the properties JSON object from FILE (- for stdin)",
    )
    track.add_argument(
        "--event",
        metavar="JSON",
        help="a whole event as a JSON object (name or event, properties, user_id or userId, "
        "anonymous_id or anonymousId, message_id or messageId, timestamp), or @FILE; "
        "other flags override its fields",
    )
    _add_event_id(track)
    track.set_defaults(run=command(_track, _show_ack))

    identify = commands.add_parser(
        "identify", parents=[connection], help="send who a user is: traits and consent"
    )
    add_identity(identify)
    identify.add_argument("--email")
    identify.add_argument("--first-name")
    identify.add_argument("--last-name")
    identify.add_argument("--locale", help='BCP 47 language tag, e.g. "en-GB"')
    identify.add_argument("--timezone", help='IANA time zone, e.g. "Europe/Berlin"')
    identify.add_argument(
        "--consent",
        action="append",
        default=[],
        metavar="GROUP=true|false",
        help="consent for a subscription group; repeat for several",
    )
    identify.add_argument(
        "--trait",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a further trait; VALUE is read as JSON when it is valid JSON (42, true), else as text",
    )
    _add_event_id(identify)
    identify.set_defaults(run=command(_identify, _show_ack))


def _add_event_id(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--message-id", help="the idempotency key (default: a new UUID)")
    parser.add_argument(
        "--timestamp", help="when it happened, ISO 8601 with a UTC offset (default: now)", metavar="TIME"
    )


def _track(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if args.event is not None:
        fields = _whole_event(json_object("--event", text_or_file(args.event)))
    if args.properties is not None:
        fields["properties"] = json_object("--properties", args.properties)
    elif args.json_file is not None:
        fields["properties"] = json_object("--json-file", read(args.json_file))
    for flag in ("name", "user_id", "anonymous_id", "message_id"):
        if getattr(args, flag) is not None:
            fields[flag] = getattr(args, flag)
    if args.timestamp is not None:
        fields["timestamp"] = args.timestamp
    name = fields.pop("name", None)
    if not isinstance(name, str) or not name:
        raise UsageError("NAME: give the event name (or 'name' in --event)")
    if "timestamp" in fields:
        fields["timestamp"] = timestamp(fields["timestamp"])
    return _ack_json(client.track(name, **fields))


def _whole_event(event: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(event) - set(_EVENT_KEYS))
    if unknown:
        raise UsageError(f"--event: unknown keys {', '.join(unknown)}; known: {', '.join(_EVENT_KEYS)}")
    fields = {_EVENT_KEYS[key]: value for key, value in event.items()}
    for key in ("name", "user_id", "anonymous_id", "message_id", "timestamp"):
        if key in fields and not isinstance(fields[key], str):
            raise UsageError(f"--event: {key} must be a string")
    if "properties" in fields and not isinstance(fields["properties"], dict):
        raise UsageError("--event: properties must be a JSON object")
    return fields


def _identify(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    consent = dict(_consent(item) for item in args.consent)
    traits = dict(_trait(item) for item in args.trait)
    ack = client.identify(
        args.user_id,
        anonymous_id=args.anonymous_id,
        email=args.email,
        first_name=args.first_name,
        last_name=args.last_name,
        locale=args.locale,
        timezone=args.timezone,
        consent=consent,
        traits=traits,
        message_id=args.message_id,
        timestamp=timestamp(args.timestamp) if args.timestamp is not None else None,
    )
    return _ack_json(ack)


def _pair(flag: str, item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise UsageError(f"{flag}: expected KEY=VALUE, got {item!r}")
    return key, value


def _consent(item: str) -> tuple[str, bool]:
    group, value = _pair("--consent", item)
    if value.lower() in _TRUE:
        return group, True
    if value.lower() in _FALSE:
        return group, False
    raise UsageError(f"--consent {group}: expected true or false, got {value!r}")


def _trait(item: str) -> tuple[str, Any]:
    key, value = _pair("--trait", item)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _ack_json(ack: Ack) -> dict[str, Any]:
    return {"message_id": ack.message_id, "outcome": ack.outcome.value}


def _show_ack(result: dict[str, Any]) -> str:
    if result["outcome"] == Outcome.DUPLICATE:
        return f"duplicate: message id {result['message_id']} was seen before; nothing changed"
    return f"{result['outcome']}: message id {result['message_id']}"
