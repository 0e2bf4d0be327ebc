"""Client commands of the ``sendtime`` CLI, over the Python client:

    sendtime track "Product Added" --user u1 --properties '{"product_id": "p1", "price": 9.5}'
    sendtime track --event '{"userId": "u1", "event": "Signed Up"}'     # a whole event
    sendtime identify --user u1 --email ada@example.com --consent marketing=true --trait plan=pro
    sendtime profile u1 [--json]

Each talks to --target (default $SENDTIME_TARGET, else 127.0.0.1:50051) with
--api-key (default $SENDTIME_API_KEY, else the development key). Output is
readable by default and one JSON object with --json. Exit status: 0 on
success, 1 when the server refuses or cannot be reached, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

from google.protobuf import json_format

from sendtime.client import Ack, Client, Outcome, SendtimeError, Unavailable
from sendtime.v1 import event_pb2, profile_service_pb2

DEFAULT_TARGET: Final = "127.0.0.1:50051"
DEFAULT_API_KEY: Final = "dev-key"

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
_CONSENT_NAMES: Final = {
    event_pb2.CONSENT_STATE_OPTED_IN: "opted in",
    event_pb2.CONSENT_STATE_OPTED_OUT: "opted out",
}


class UsageError(Exception):
    """A bad argument; the message names it."""


Run = Callable[[Client, argparse.Namespace], dict[str, Any]]
Show = Callable[[dict[str, Any]], str]


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    connection = argparse.ArgumentParser(add_help=False)
    group = connection.add_argument_group("connection")
    group.add_argument(
        "--target",
        default=os.environ.get("SENDTIME_TARGET", DEFAULT_TARGET),
        help=f"server address host:port (default: $SENDTIME_TARGET, else {DEFAULT_TARGET})",
    )
    group.add_argument(
        "--api-key",
        default=os.environ.get("SENDTIME_API_KEY", DEFAULT_API_KEY),
        help="API key (default: $SENDTIME_API_KEY, else the development key)",
    )
    group.add_argument("--tls", action="store_true", help="connect with TLS (system root certificates)")
    group.add_argument("--timeout", type=float, default=5.0, help="seconds before giving up (default: 5)")
    group.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    track = commands.add_parser(
        "track",
        parents=[connection],
        help="send one tracked event",
        description="Send one event, from flags or as a whole event in JSON (--event).",
    )
    track.add_argument("name", nargs="?", metavar="NAME", help='event name, e.g. "Product Added"')
    _add_identity(track)
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
    track.set_defaults(run=_command(_track, _show_ack))

    identify = commands.add_parser(
        "identify", parents=[connection], help="send who a user is: traits and consent"
    )
    _add_identity(identify)
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
    identify.set_defaults(run=_command(_identify, _show_ack))

    profile = commands.add_parser("profile", parents=[connection], help="show the profile derived for a user")
    profile.add_argument("user", nargs="?", metavar="USER", help="the user id")
    profile.add_argument("--anonymous-id", help="look up an anonymous visitor instead")
    profile.set_defaults(run=_command(_profile, _show_profile))


def _add_identity(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", "--user-id", dest="user_id", metavar="USER", help="the user id")
    parser.add_argument("--anonymous-id", help="the anonymous id (for a visitor not yet known)")


def _add_event_id(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--message-id", help="the idempotency key (default: a new UUID)")
    parser.add_argument(
        "--timestamp", help="when it happened, ISO 8601 with a UTC offset (default: now)", metavar="TIME"
    )


def _command(run: Run, show: Show) -> Callable[[argparse.Namespace], int]:
    """Wrap a command: connect, run, print the result or a clear error."""

    def main(args: argparse.Namespace) -> int:
        prog = f"sendtime {args.command}"
        try:
            if args.timeout <= 0:
                raise UsageError("--timeout: must be positive")
            with Client(args.target, args.api_key, tls=args.tls, default_timeout=args.timeout) as client:
                result = run(client, args)
        except UsageError as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return 2
        except SendtimeError as exc:
            _report(prog, args, exc)
            return 1
        print(json.dumps(result, ensure_ascii=False) if args.json else show(result))
        return 0

    return main


def _report(prog: str, args: argparse.Namespace, error: SendtimeError) -> None:
    if isinstance(error, Unavailable):
        print(f"{prog}: cannot reach sendtime at {args.target}: {error.message}", file=sys.stderr)
    else:
        print(f"{prog}: {error.code.name.lower().replace('_', ' ')}: {error.message}", file=sys.stderr)
    for violation in error.field_violations:
        print(f"  {violation.field}: {violation.description}", file=sys.stderr)
    if args.json:
        print(
            json.dumps(
                {
                    "error": {
                        "code": error.code.name,
                        "reason": error.reason,
                        "message": error.message,
                        "field_violations": [
                            {"field": v.field, "description": v.description} for v in error.field_violations
                        ],
                    }
                },
                ensure_ascii=False,
            )
        )


# ------------------------------------------------------------------ commands


def _track(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if args.event is not None:
        fields = _whole_event(_json_object("--event", _text_or_file(args.event)))
    if args.properties is not None:
        fields["properties"] = _json_object("--properties", args.properties)
    elif args.json_file is not None:
        fields["properties"] = _json_object("--json-file", _read(args.json_file))
    for flag in ("name", "user_id", "anonymous_id", "message_id"):
        if getattr(args, flag) is not None:
            fields[flag] = getattr(args, flag)
    if args.timestamp is not None:
        fields["timestamp"] = args.timestamp
    name = fields.pop("name", None)
    if not isinstance(name, str) or not name:
        raise UsageError("NAME: give the event name (or 'name' in --event)")
    if "timestamp" in fields:
        fields["timestamp"] = _timestamp(fields["timestamp"])
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
        timestamp=_timestamp(args.timestamp) if args.timestamp is not None else None,
    )
    return _ack_json(ack)


def _profile(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    if bool(args.user) == bool(args.anonymous_id):
        raise UsageError("give exactly one of USER and --anonymous-id")
    return _profile_json(client.get_profile(args.user, anonymous_id=args.anonymous_id))


# ------------------------------------------------------------------ arguments


def _text_or_file(value: str) -> str:
    return _read(Path(value[1:])) if value.startswith("@") else value


def _read(path: Path) -> str:
    if str(path) == "-":
        return sys.stdin.read()
    try:
        return path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None


def _json_object(flag: str, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{flag}: not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{flag}: must be a JSON object, not {type(value).__name__}")
    return value


def _timestamp(text: str) -> dt.datetime:
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"timestamp: {text!r} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise UsageError(f"timestamp: {text!r} needs a UTC offset, e.g. {text}Z or {text}+02:00")
    return moment


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


# -------------------------------------------------------------------- output


def _ack_json(ack: Ack) -> dict[str, Any]:
    return {"message_id": ack.message_id, "outcome": ack.outcome.value}


def _show_ack(result: dict[str, Any]) -> str:
    if result["outcome"] == Outcome.DUPLICATE:
        return f"duplicate: message id {result['message_id']} was seen before; nothing changed"
    return f"{result['outcome']}: message id {result['message_id']}"


def _profile_json(profile: profile_service_pb2.Profile) -> dict[str, Any]:
    """The proto's JSON mapping with snake_case names, except that the extra
    traits are a JSON object and the event count a number."""
    result = json_format.MessageToDict(profile, preserving_proto_field_name=True)
    result.pop("extra_traits_json", None)
    result["extra_traits"] = json.loads(profile.extra_traits_json) if profile.extra_traits_json else {}
    result["event_count"] = profile.event_count
    return result


def _show_profile(profile: dict[str, Any]) -> str:
    who = [f"user {profile['user_id']}" if profile.get("user_id") else ""]
    if profile.get("anonymous_id"):
        who.append(f"anonymous id {profile['anonymous_id']}")
    lines = [", ".join(w for w in who if w)]
    traits = profile.get("traits", {})
    name = " ".join(t for t in (traits.get("first_name"), traits.get("last_name")) if t)
    for label, value in (
        ("name", name),
        ("email", traits.get("email")),
        ("locale", traits.get("locale")),
        ("timezone", traits.get("timezone")),
    ):
        if value:
            lines.append(f"  {label}: {value}")
    consent = traits.get("consent", {})
    if consent:
        states = (
            f"{group} {_CONSENT_NAMES.get(event_pb2.ConsentState.Value(state), state)}"
            for group, state in sorted(consent.items())
        )
        lines.append(f"  consent: {', '.join(states)}")
    if profile["extra_traits"]:
        lines.append(f"  traits: {json.dumps(profile['extra_traits'], ensure_ascii=False)}")
    lines.append(
        f"  events: {profile['event_count']}, first seen {profile.get('first_seen_time', '-')}, "
        f"last active {profile.get('last_activity_time', '-')}"
    )
    for cart in profile.get("carts", []):
        lines.append(f"  cart {cart['cart_id']}:")
        lines.extend(
            f"    {line.get('quantity', 0)} x {_product(line)}{_price(line)}"
            for line in cart.get("lines", [])
        )
    viewed = profile.get("recently_viewed", [])
    if viewed:
        lines.append("  recently viewed: " + ", ".join(_product(v) for v in viewed))
    for order in profile.get("orders", []):
        refund = f", refunded {order['refund_time']}" if order.get("refund_time") else ""
        total = f" {order.get('total', 0)} {order.get('currency', '')}".rstrip()
        lines.append(f"  order {order['order_id']}:{total}, {order.get('complete_time', '-')}{refund}")
    return "\n".join(lines)


def _product(item: Mapping[str, Any]) -> str:
    label = item.get("product_id") or item.get("sku") or "?"
    return f"{label} ({item['name']})" if item.get("name") else str(label)


def _price(item: Mapping[str, Any]) -> str:
    if "price" not in item:
        return ""
    return f" at {item['price']} {item.get('currency', '')}".rstrip()
