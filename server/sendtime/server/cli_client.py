"""Client commands of the ``sendtime`` CLI, over the Python client:

    sendtime track "Product Added" --user u1 --properties '{"product_id": "p1", "price": 9.5}'
    sendtime track --event '{"userId": "u1", "event": "Signed Up"}'     # a whole event
    sendtime identify --user u1 --email ada@example.com --consent marketing=true --trait plan=pro
    sendtime profile u1 [--json]
    sendtime content u1 [--blocks cart,recommendations] [--deadline-ms 200] [--json]
    sendtime render abandoned_cart --user u1 [--out cart.html] [--text]
    sendtime preview abandoned_cart --user u1 --png cart.png [--mobile]
    sendtime demo-data                                  # a demo shopper to try these on
    sendtime send post_purchase --user u1 [--idempotency-key KEY] [--transactional] [--wait]
    sendtime deliveries [--user u1] [--flow abandoned_cart] [--limit N | --all] [--json]
    sendtime flows                                      # flows and their deliveries by status

Each talks to the server that ``sendtime serve`` would start with the same
settings: --config FILE (default $SENDTIME_CONFIG) and the SENDTIME_* variables
(SENDTIME_GRPC__PORT=6000) give its gRPC address, and TLS when [grpc.tls] is
set. --target HOST:PORT (default $SENDTIME_TARGET) names a server outright.
The key is --api-key (default $SENDTIME_API_KEY, else the development key,
when the config accepts it). When nothing listens at the address the command
says so at once, naming where the address came from.

Output is readable by default and one JSON object with --json; with --json an
error is one JSON object on stderr and stdout stays empty. Exit status: 0 on
success, 1 when the server refuses or cannot be reached (or preview finds no
Chromium, or ``send --wait`` ends in anything but sent), 2 for bad arguments.

``send`` goes through the delivery ledger: one idempotency key is one email.
Without --idempotency-key it makes a key and prints it first, so that a send
whose answer was lost can be retried with it and still go out only once.

The content commands' --deadline-ms is the gRPC deadline, which is the
server's time budget for the blocks, as it would be for an ESP at send time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from google.protobuf import json_format

from sendtime.client import (
    Ack,
    Client,
    ContentBlock,
    DeadlineExceeded,
    Delivery,
    DeliveryStatus,
    Outcome,
    RenderedEmail,
    SendtimeError,
    Unavailable,
    identify_event,
    track_event,
)
from sendtime.server.settings import DEV_KEY, SettingsError, load_settings
from sendtime.v1 import event_pb2, profile_service_pb2

#: How long the check that something listens at the target may take: a
#: refused connection answers at once, a silent host is given this long.
CONNECT_CHECK_S: Final = 2.0

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


#: What an ESP would give a send; the server's own default budget is also 300 ms.
DEFAULT_DEADLINE_MS: Final = 300.0
MAX_DEADLINE_MS: Final = 60_000.0
CHROMIUM_NAMES: Final = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_INSTALL_HINT: Final = (
    "install Chromium (Debian: apt-get install chromium) or give its path with --chromium PATH"
)
#: Flags for a quiet, throwaway headless Chromium: no sandbox (it refuses to
#: run as root with one), no GPU, and no calls home while it renders.
CHROMIUM_FLAGS: Final = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
#: A phone's viewport width in CSS pixels, for --mobile.
MOBILE_WIDTH: Final = 390
DESKTOP_WIDTH: Final = 700
#: How long ``send --wait`` waits for a final status by default.
DEFAULT_WAIT_S: Final = 60.0
#: How often it asks: quickly at first (an API send is due at once), then less often.
WAIT_POLL_S: Final = (0.05, 0.1, 0.2, 0.5, 1.0)
DEFAULT_LIST_LIMIT: Final = 50
#: The server's largest page of deliveries.
MAX_PAGE_SIZE: Final = 500
_FINAL_STATUSES: Final = frozenset(status for status in DeliveryStatus if status.final)
#: A flow summary's counts, in the order ``flows`` shows them.
_FLOW_COUNTS: Final = ("scheduled", "sent", "cancelled", "skipped", "failed", "other")


class UsageError(Exception):
    """A bad argument; the message names it."""


class CommandError(Exception):
    """The command could not do its work (a file it cannot write, no Chromium);
    the message says what to do."""


Run = Callable[[Client, argparse.Namespace], dict[str, Any]]
Show = Callable[[dict[str, Any]], str]


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    connection = argparse.ArgumentParser(add_help=False)
    group = connection.add_argument_group("connection")
    group.add_argument(
        "--config",
        metavar="FILE",
        help="the server's TOML settings: its gRPC host, port and TLS are dialled (default: "
        "$SENDTIME_CONFIG; SENDTIME_GRPC__PORT and the other SENDTIME_* variables apply on top, "
        "as for sendtime serve)",
    )
    group.add_argument(
        "--target",
        metavar="HOST:PORT",
        help="the server's gRPC address, over the settings (default: $SENDTIME_TARGET, else the "
        "settings' grpc.host:grpc.port, 127.0.0.1:50051 by default)",
    )
    group.add_argument(
        "--api-key",
        help="API key (default: $SENDTIME_API_KEY, else the development key dev-key)",
    )
    group.add_argument(
        "--tls",
        action="store_true",
        help="connect with TLS, system root certificates (on anyway when the settings have [grpc.tls])",
    )
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

    send = argparse.ArgumentParser(add_help=False)
    group = send.add_argument_group("send")
    group.add_argument(
        "--deadline-ms",
        type=float,
        default=DEFAULT_DEADLINE_MS,
        metavar="N",
        help="the call's deadline, which is the server's time budget: blocks it cannot fetch "
        f"in time come back stale or as fallbacks (default: {DEFAULT_DEADLINE_MS:g})",
    )
    group.add_argument("--campaign", help="the campaign, for blocks and offers that depend on it")
    group.add_argument("--locale", help="BCP 47 tag overriding the profile's locale")
    group.add_argument("--cart-id", help="the cart to show (default: the most recently updated)")

    content = commands.add_parser(
        "content",
        parents=[connection, send],
        help="show the content blocks for a user, as a send would get them now",
        description="Fetch content blocks for a user within a deadline; each says whether it is "
        "fresh, cached, stale or a fallback, and why.",
    )
    content.add_argument("user", nargs="?", metavar="USER", help="the user id")
    content.add_argument("--anonymous-id", help="fetch for an anonymous visitor instead")
    content.add_argument(
        "--blocks",
        metavar="NAMES",
        help="comma-separated block names, e.g. cart,recommendations (default: every built-in "
        "block: cart, recommendations, recently_viewed, offers, last_order)",
    )
    content.set_defaults(run=_command(_content, _show_content))

    render = commands.add_parser(
        "render",
        parents=[connection, send],
        help="render a whole email for a user from a server template",
        description="Render TEMPLATE for a user: subject, preheader, HTML and text, with the "
        "blocks that fell back.",
    )
    render.add_argument("template", metavar="TEMPLATE", help="template id, e.g. abandoned_cart")
    _add_identity(render)
    render.add_argument("--out", type=Path, metavar="FILE", help="write the HTML to FILE")
    render.add_argument(
        "--text", action="store_true", help="print the plain-text part (printed anyway without --out)"
    )
    render.set_defaults(run=_command(_render, _show_render))

    preview = commands.add_parser(
        "preview",
        parents=[connection, send],
        help="screenshot a rendered email with headless Chromium",
        description="Render TEMPLATE for a user on the server and screenshot the HTML with "
        "headless Chromium (chromium, chromium-browser or google-chrome on PATH).",
    )
    preview.add_argument("template", metavar="TEMPLATE", help="template id, e.g. abandoned_cart")
    _add_identity(preview)
    preview.add_argument("--png", type=Path, required=True, metavar="FILE", help="where to write the PNG")
    preview.add_argument(
        "--width",
        type=int,
        help=f"viewport width in CSS pixels (default: {DESKTOP_WIDTH}, {MOBILE_WIDTH} with --mobile)",
    )
    preview.add_argument("--height", type=int, default=1600, help="viewport height (default: 1600)")
    preview.add_argument(
        "--mobile",
        action="store_true",
        help=f"a phone-wide viewport ({MOBILE_WIDTH} px): the responsive layout",
    )
    preview.add_argument(
        "--chromium", metavar="PATH", help="the Chromium (or Chrome) executable (default: found on PATH)"
    )
    preview.add_argument(
        "--chromium-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds Chromium may take for the screenshot (default: 60)",
    )
    preview.set_defaults(run=_command(_preview, _show_preview))

    demo = commands.add_parser(
        "demo-data",
        parents=[connection],
        help="load a demo shopper and a demo buyer to try content, render and preview on",
        description="Send a realistic demo session: a shopper who browsed and left a cart (one "
        "line now cheaper, one out of stock) and a buyer with a completed order, for the "
        "products of the demo catalog. Message ids are fixed, so running it again changes nothing.",
    )
    demo.add_argument("--user", default="demo-shopper", help="the shopper's user id (default: demo-shopper)")
    demo.add_argument("--buyer", default="demo-buyer", help="the buyer's user id (default: demo-buyer)")
    demo.set_defaults(run=_command(_demo_data, _show_demo_data))

    send_email = commands.add_parser(
        "send",
        parents=[connection],
        help="send a template to a user now (needs the send scope)",
        description="Send the server's template TEMPLATE to a user now, through the delivery "
        "ledger: one idempotency key is one email, so running the command again with the same "
        "--idempotency-key shows the first delivery and never sends a second email. Without "
        "--wait it prints the delivery as scheduled; with --wait, exit status 1 unless it ends sent.",
    )
    send_email.add_argument("template", metavar="TEMPLATE", help="template id, e.g. post_purchase")
    _add_identity(send_email)
    send_email.add_argument(
        "--idempotency-key",
        "--key",
        dest="idempotency_key",
        metavar="KEY",
        help="at most 100 characters; the same key is the same send (default: a new one, printed "
        "so that a retry can reuse it)",
    )
    send_email.add_argument(
        "--transactional",
        action="store_true",
        help="a transactional send: no consent, suppression, frequency cap or quiet hours",
    )
    send_email.add_argument(
        "--group",
        metavar="G",
        help="the consent group a marketing send needs (default: marketing)",
    )
    send_email.add_argument(
        "--wait",
        action="store_true",
        help="wait until the delivery is final (sent, failed, cancelled, skipped or uncertain)",
    )
    send_email.add_argument(
        "--wait-timeout",
        type=float,
        default=DEFAULT_WAIT_S,
        metavar="S",
        help=f"seconds --wait waits before giving up (default: {DEFAULT_WAIT_S:g})",
    )
    send_email.set_defaults(run=_command(_send, _show_send))

    deliveries = commands.add_parser(
        "deliveries",
        parents=[connection],
        help="list deliveries, newest first, with status, attempts and latency",
        description="List deliveries from the ledger, newest first, for a user, a flow, both or "
        "all: status and why, attempts, relay, the ESP's message id and the latency from the "
        "triggering event to the ESP's acceptance.",
    )
    deliveries.add_argument("--user", "--user-id", dest="user_id", metavar="U", help="only this user's")
    deliveries.add_argument("--flow", metavar="F", help="only this flow's, e.g. abandoned_cart")
    how_many = deliveries.add_mutually_exclusive_group()
    how_many.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIST_LIMIT,
        metavar="N",
        help=f"show at most N (default: {DEFAULT_LIST_LIMIT})",
    )
    how_many.add_argument("--all", action="store_true", help="show every one, page after page")
    deliveries.add_argument(
        "--page-size",
        type=int,
        default=MAX_PAGE_SIZE,
        metavar="N",
        help=f"deliveries asked for per call (default: {MAX_PAGE_SIZE}, the server's most)",
    )
    deliveries.set_defaults(run=_command(_deliveries, _show_deliveries))

    flows = commands.add_parser(
        "flows",
        parents=[connection],
        help="show the configured flows and their deliveries by status",
        description="Each configured flow: the event that enters it, the delay, the events that "
        "cancel it, its consent group, and how many of its deliveries are scheduled, sent, "
        "cancelled, skipped and failed.",
    )
    flows.set_defaults(run=_command(_flows, _show_flows))


def _add_identity(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", "--user-id", dest="user_id", metavar="USER", help="the user id")
    parser.add_argument("--anonymous-id", help="the anonymous id (for a visitor not yet known)")


def _add_event_id(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--message-id", help="the idempotency key (default: a new UUID)")
    parser.add_argument(
        "--timestamp", help="when it happened, ISO 8601 with a UTC offset (default: now)", metavar="TIME"
    )


def _connect(args: argparse.Namespace) -> None:
    """Fill in args.target, args.tls and args.api_key as the flags, the
    environment and the server's settings say, and args.target_from with
    where the address came from (for the error when nothing listens)."""
    if args.target:
        args.target_from = "--target"
    elif os.environ.get("SENDTIME_TARGET"):
        args.target, args.target_from = os.environ["SENDTIME_TARGET"], "$SENDTIME_TARGET"
    config = args.config or os.environ.get("SENDTIME_CONFIG")
    try:
        settings = load_settings(Path(config) if config else None)
    except SettingsError as exc:
        flag = "--config" if args.config else "$SENDTIME_CONFIG" if config else "SENDTIME_* variables"
        raise UsageError(f"{flag}: {exc}") from None
    if not args.target:
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(  # noqa: S104
            settings.grpc.host, settings.grpc.host
        )
        args.target = f"[{host}]:{settings.grpc.port}" if ":" in host else f"{host}:{settings.grpc.port}"
        sources = [f"the [grpc] settings of {config}"] if config else []
        sources += sorted(name for name in os.environ if name.startswith("SENDTIME_GRPC__"))
        args.target_from = " and ".join(sources) or "the default settings"
        args.tls = args.tls or settings.grpc.tls is not None
    if args.api_key is None:
        args.api_key = os.environ.get("SENDTIME_API_KEY")
    if args.api_key is None:
        if config and not settings.auth.dev_key:
            raise UsageError(
                f"--api-key: {config} turns the development key off (auth.dev_key = false); "
                "give a key with --api-key or $SENDTIME_API_KEY"
            )
        args.api_key = DEV_KEY


def _check_listening(target: str, target_from: str, timeout: float) -> None:
    """Fail at once when nothing listens at ``target``: gRPC would retry a
    refused connection until the call's timeout, and say less."""
    if "://" in target or target.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):
        return  # a gRPC name scheme: leave the resolving to gRPC
    parts = urlsplit(f"//{target}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or port is None:
        raise UsageError(f"{target_from}: {target!r} is not HOST:PORT")
    try:
        with socket.create_connection((host, port), timeout=min(timeout, CONNECT_CHECK_S)):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise CommandError(
            f"cannot reach sendtime at {target} (from {target_from}): {reason}. Is the server running? "
            "Start it with `sendtime serve` (or `make run`), or point this command at it with "
            "--config FILE, --target HOST:PORT or SENDTIME_GRPC__PORT as the server was started with."
        ) from None


def _command(run: Run, show: Show) -> Callable[[argparse.Namespace], int]:
    """Wrap a command: connect, run, print the result or a clear error."""

    def main(args: argparse.Namespace) -> int:
        prog = f"sendtime {args.command}"
        try:
            if args.timeout <= 0:
                raise UsageError("--timeout: must be positive")
            _connect(args)
            _check_listening(args.target, args.target_from, args.timeout)
            with Client(args.target, args.api_key, tls=args.tls, default_timeout=args.timeout) as client:
                result = run(client, args)
        except UsageError as exc:
            if args.json:
                _json_error({"code": "INVALID_ARGUMENT", "message": str(exc)})
            else:
                print(f"{prog}: error: {exc}", file=sys.stderr)
            return 2
        except CommandError as exc:
            if args.json:
                _json_error({"code": "FAILED", "message": str(exc)})
            else:
                print(f"{prog}: {exc}", file=sys.stderr)
            return 1
        except SendtimeError as exc:
            _report(prog, args, exc)
            return 1
        try:
            # keys starting with "_" are for the readable output only
            public = {key: value for key, value in result.items() if not key.startswith("_")}
            print(json.dumps(public, ensure_ascii=False) if args.json else show(result), flush=True)
        except BrokenPipeError:  # piped into head: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        # a command that did its work may still report an outcome that is not success
        return int(result.get("_exit", 0))

    return main


def _json_error(error: Mapping[str, Any]) -> None:
    """With --json, an error is one JSON object on stderr: stdout holds only
    results, so a script reading it never mistakes an error for one."""
    print(json.dumps({"error": error}, ensure_ascii=False), file=sys.stderr)


def _report(prog: str, args: argparse.Namespace, error: SendtimeError) -> None:
    if args.json:
        _json_error(
            {
                "code": error.code.name,
                "reason": error.reason,
                "message": error.message,
                "field_violations": [
                    {"field": v.field, "description": v.description} for v in error.field_violations
                ],
            }
        )
        return
    # A violation the message already states is named by its field only, so
    # the reason is said once.
    stated = [v.field for v in error.field_violations if v.description in error.message]
    fields = f" (field {', '.join(stated)})" if stated else ""
    if isinstance(error, Unavailable):
        print(f"{prog}: cannot reach sendtime at {args.target}: {error.message}", file=sys.stderr)
    elif isinstance(error, DeadlineExceeded) and getattr(args, "deadline_ms", None) is not None:
        print(
            f"{prog}: no answer within --deadline-ms {args.deadline_ms:g}: {error.message}", file=sys.stderr
        )
    else:
        code = error.code.name.lower().replace("_", " ")
        print(f"{prog}: {code}: {error.message}{fields}", file=sys.stderr)
    for violation in error.field_violations:
        if violation.field not in stated:
            print(f"  {violation.field}: {violation.description}", file=sys.stderr)


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


def _deadline(args: argparse.Namespace) -> float:
    if not 0 < args.deadline_ms <= MAX_DEADLINE_MS:
        raise UsageError(f"--deadline-ms: must be more than 0 and at most {MAX_DEADLINE_MS:g}")
    return float(args.deadline_ms) / 1000


def _who(args: argparse.Namespace, user_id: str | None) -> dict[str, str]:
    if bool(user_id) == bool(args.anonymous_id):
        raise UsageError("give exactly one of the user id and --anonymous-id")
    return {"user_id": user_id} if user_id else {"anonymous_id": args.anonymous_id}


def _content(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    who = _who(args, args.user)
    names = [name.strip() for name in (args.blocks or "").split(",") if name.strip()]
    content = client.get_content(
        args.user,
        anonymous_id=args.anonymous_id,
        blocks=names,
        campaign=args.campaign,
        locale=args.locale,
        cart_id=args.cart_id,
        timeout=_deadline(args),
    )
    return {
        **who,
        "blocks": _blocks_json(content.blocks),
        "server_time_ms": _ms(content.server_time),
        "budget_ms": _ms(content.budget),
    }


def _render_email(client: Client, args: argparse.Namespace) -> tuple[dict[str, str], RenderedEmail]:
    who = _who(args, args.user_id)
    if not args.template.strip():
        raise UsageError("TEMPLATE: give a template id, e.g. abandoned_cart")
    email = client.render_email(
        args.template,
        args.user_id,
        anonymous_id=args.anonymous_id,
        campaign=args.campaign,
        locale=args.locale,
        cart_id=args.cart_id,
        timeout=_deadline(args),
    )
    return who, email


def _email_json(who: Mapping[str, str], email: RenderedEmail) -> dict[str, Any]:
    return {
        **who,
        "template_id": email.template_id,
        "template_version": email.template_version,
        "subject": email.subject,
        "preheader": email.preheader,
        "blocks": _blocks_json(email.blocks),
        "fell_back": [block.name for block in email.fell_back],
        "server_time_ms": _ms(email.server_time),
        "budget_ms": _ms(email.budget),
    }


def _render(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    who, email = _render_email(client, args)
    result = _email_json(who, email)
    result.update(html=email.html, text=email.text, out=None)
    if args.out is not None:
        _write(args.out, email.html.encode())
        result["out"] = str(args.out)
    result["_show_text"] = args.text or args.out is None
    return result


def _preview(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    width = args.width if args.width is not None else MOBILE_WIDTH if args.mobile else DESKTOP_WIDTH
    for flag, value in (("--width", width), ("--height", args.height)):
        if not 100 <= value <= 10_000:
            raise UsageError(f"{flag}: must be between 100 and 10000 pixels")
    if args.chromium_timeout <= 0:
        raise UsageError("--chromium-timeout: must be positive")
    _who(args, args.user_id)
    # Before the render: no server call for a screenshot that cannot be taken.
    chromium = _find_chromium(args.chromium)
    if not args.png.resolve().parent.is_dir():
        raise CommandError(f"--png {args.png}: no such directory {args.png.resolve().parent}")
    who, email = _render_email(client, args)
    _screenshot(chromium, email.html, args.png, width, args.height, args.chromium_timeout)
    return {
        **_email_json(who, email),
        "png": str(args.png),
        "png_bytes": args.png.stat().st_size,
        "width": width,
        "height": args.height,
        "chromium": chromium,
    }


def _demo_data(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    if not args.user or not args.buyer or args.user == args.buyer:
        raise UsageError("--user and --buyer must be two different, non-empty user ids")
    events = _demo_events(args.user, args.buyer, dt.datetime.now(dt.UTC))
    acks = client.ingest(events)
    rejected = [(event, ack) for event, ack in zip(events, acks, strict=True) if not ack.stored]
    if rejected:
        problems = "; ".join(
            f"{ack.message_id}: {ack.reason} {', '.join(str(v) for v in ack.field_violations)}".strip()
            for _, ack in rejected
        )
        raise CommandError(f"the server rejected {len(rejected)} of {len(events)} demo events: {problems}")
    # the commands to try reach the same server when run the same way
    hint = f" --target {args.target}" if args.target_from == "--target" else ""
    if args.config:
        hint += f" --config {args.config}"
    return {
        "user": args.user,
        "buyer": args.buyer,
        "events": [
            {
                "message_id": ack.message_id,
                "user_id": event.user_id,
                "event": event.track.name if event.WhichOneof("kind") == "track" else "Identify",
                "outcome": ack.outcome.value,
            }
            for event, ack in zip(events, acks, strict=True)
        ],
        "accepted": sum(ack.outcome is Outcome.ACCEPTED for ack in acks),
        "duplicate": sum(ack.outcome is Outcome.DUPLICATE for ack in acks),
        "try": [
            f"sendtime content {args.user}{hint}",
            f"sendtime render abandoned_cart --user {args.user} --out cart.html{hint}",
            f"sendtime preview abandoned_cart --user {args.user} --png cart.png{hint}",
            f"sendtime render browse_abandonment --user {args.user} --text{hint}",
            f"sendtime render post_purchase --user {args.buyer} --out order.html{hint}",
        ],
    }


def _send(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    if not args.template.strip():
        raise UsageError("TEMPLATE: give a template id, e.g. post_purchase")
    if bool(args.user_id) == bool(args.anonymous_id):
        raise UsageError("--user: give the user to send to (or --anonymous-id for a visitor, not both)")
    if args.transactional and args.group is not None:
        raise UsageError("--group: a transactional send needs no consent group; give one or the other")
    if args.group is not None and not args.group.strip():
        raise UsageError("--group: must not be empty")
    if args.wait_timeout <= 0:
        raise UsageError("--wait-timeout: must be positive")
    key: str | None = args.idempotency_key
    generated = key is None
    if key is None:
        key = f"cli-{uuid.uuid4()}"
        # Before the call, and on stderr: the key matters most when the call
        # fails or times out, and --json keeps stdout one object.
        print(
            f"sendtime send: idempotency key {key} (made for this send; running again with "
            f"--idempotency-key {key} is safe: the server returns this same delivery and "
            "never sends twice)",
            file=sys.stderr,
            flush=True,
        )
    elif not key.strip():
        raise UsageError("--idempotency-key: must not be empty")
    delivery = client.send_email(
        args.template,
        user_id=args.user_id,
        anonymous_id=args.anonymous_id,
        idempotency_key=key,
        transactional=args.transactional,
        subscription_group=args.group,
    )
    if args.wait:
        delivery = _wait(client, delivery, key, args.wait_timeout)
    result: dict[str, Any] = {
        "idempotency_key": key,
        "generated_key": generated,
        "waited": args.wait,
        "delivery": _delivery_json(delivery),
    }
    if args.wait and delivery.status is not DeliveryStatus.SENT:
        result["_exit"] = 1
    return result


def _wait(client: Client, delivery: Delivery, key: str, timeout: float) -> Delivery:
    """Ask for the delivery until it is final or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    pauses = itertools.chain(WAIT_POLL_S, itertools.repeat(WAIT_POLL_S[-1]))
    again = f"run again with --idempotency-key {key} --wait to keep waiting (it will not send twice)"
    try:
        while not delivery.final:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CommandError(
                    f"delivery {delivery.id} is still {_status_text(delivery)} after {timeout:g} s; {again}"
                )
            time.sleep(min(next(pauses), remaining))
            delivery = client.get_delivery(delivery.id)
    except KeyboardInterrupt:
        raise CommandError(
            f"stopped waiting: delivery {delivery.id} was {_status_text(delivery)}; {again}"
        ) from None
    return delivery


def _deliveries(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    if not args.all and args.limit <= 0:
        raise UsageError("--limit: must be positive")
    if not 0 < args.page_size <= MAX_PAGE_SIZE:
        raise UsageError(f"--page-size: must be between 1 and {MAX_PAGE_SIZE}")
    wanted: int | None = None if args.all else args.limit
    found: list[Delivery] = []
    token = ""
    while True:
        size = args.page_size if wanted is None else min(args.page_size, wanted - len(found))
        page = client.list_deliveries(
            user_id=args.user_id, flow_id=args.flow, page_size=size, page_token=token or None
        )
        found.extend(page.deliveries)
        token = page.next_page_token
        if not token or not page.deliveries or (wanted is not None and len(found) >= wanted):
            break
    return {
        "user_id": args.user_id,
        "flow_id": args.flow,
        "deliveries": [_delivery_json(d) for d in found],
        # where the next page starts when --limit cut the list short
        "next_page_token": token,
    }


def _flows(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "flows": [
            {
                "id": flow.id,
                "template_id": flow.template_id,
                "entry_event": flow.entry_event,
                "delay_s": flow.delay.total_seconds(),
                "exit_events": list(flow.exit_events),
                "subscription_group": flow.subscription_group,
                "transactional": flow.transactional,
                **{status: getattr(flow, status) for status in _FLOW_COUNTS},
                # what is scheduled, not what the delay says: a send keeps the due
                # time it got when it was planned (under another delay, say)
                "next_due_time": _iso(_next_due(client, flow.id, flow.scheduled)),
            }
            for flow in client.list_flows()
        ],
        "_now": dt.datetime.now(dt.UTC),
    }


def _next_due(client: Client, flow_id: str, scheduled: int) -> dt.datetime | None:
    """When the flow's earliest scheduled send is due: read page by page until
    every one of its ``scheduled`` sends was seen (newest first, so usually
    on the first page)."""
    due: list[dt.datetime] = []
    seen = 0
    token = ""
    while seen < scheduled:
        page = client.list_deliveries(flow_id=flow_id, page_size=MAX_PAGE_SIZE, page_token=token or None)
        for delivery in page.deliveries:
            if delivery.status is DeliveryStatus.SCHEDULED:
                seen += 1
                if delivery.due_time is not None:
                    due.append(delivery.due_time)
        token = page.next_page_token
        if not token or not page.deliveries:
            break
    return min(due, default=None)


# --------------------------------------------------------------- demo data

#: Products of demo/catalog.json (the server's default catalog), as a shop's
#: events would describe them: (name, price when the event happened).
_DEMO_PRODUCTS: Final = {
    "kettle-electric": ("Electric Kettle 1.7 L", 79.0, "kettles"),
    "kettle-steel": ("Gooseneck Kettle, Brushed Steel", 64.0, "kettles"),
    "grinder-burr": ("Hand Burr Grinder", 89.0, "coffee"),
    "scale-digital": ("Brewing Scale with Timer", 39.0, "coffee"),
    "dripper-v60": ("Pour-Over Dripper", 24.0, "coffee"),
    "filters-100": ("Paper Filters, 100 pack", 6.0, "coffee"),
    "tea-sencha": ("Organic Sencha, 100 g", 11.5, "tea"),
}
#: The shopper added the steel kettle before its price dropped to 64.
_DEMO_ADDED_PRICES: Final = {"kettle-steel": 72.0}


def _demo_product(product_id: str, **extra: Any) -> dict[str, Any]:
    name, price, category = _DEMO_PRODUCTS[product_id]
    return {
        "product_id": product_id,
        "name": name,
        "price": price,
        "currency": "EUR",
        "category": category,
        "url": f"https://shop.example.com/p/{product_id}",
        "image_url": f"https://shop.example.com/img/{product_id}.jpg",
        **extra,
    }


def _demo_events(shopper: str, buyer: str, now: dt.datetime) -> list[event_pb2.Event]:
    """The demo session, with message ids fixed by user and step: sending it
    again gives duplicates and changes nothing.

    The shopper browses over the last few minutes and fills the cart just now,
    so the abandoned-cart email comes one flow delay after demo-data (20 s
    under ``make demo``, 30 minutes under ``make run``), not at once; the
    buyer's order is half an hour old, well within the flows' max_entry_age."""

    def at(minutes_ago: float) -> dt.datetime:
        return now - dt.timedelta(minutes=minutes_ago)

    def mid(user: str, step: str) -> str:
        return f"demo-data:{user}:{step}"

    cart_id = f"{shopper}-cart"
    events = [
        identify_event(
            shopper,
            email=f"{shopper}@example.com",
            first_name="Ada",
            last_name="Lovelace",
            locale="en-GB",
            timezone="Europe/London",
            consent={"marketing": True},
            traits={"plan": "member"},
            message_id=mid(shopper, "identify"),
            timestamp=at(12),
        ),
        *(
            track_event(
                "Product Viewed",
                _demo_product(product_id),
                user_id=shopper,
                message_id=mid(shopper, f"viewed:{product_id}"),
                timestamp=at(10 - 2 * n),
            )
            for n, product_id in enumerate(
                ("kettle-electric", "kettle-steel", "grinder-burr", "scale-digital")
            )
        ),
        *(
            track_event(
                "Product Added",
                _demo_product(
                    product_id,
                    price=_DEMO_ADDED_PRICES.get(product_id, _DEMO_PRODUCTS[product_id][1]),
                    quantity=quantity,
                    cart_id=cart_id,
                ),
                user_id=shopper,
                message_id=mid(shopper, f"added:{product_id}"),
                # seconds apart, ending now: the cart was just left
                timestamp=at((2 - n) / 60),
            )
            for n, (product_id, quantity) in enumerate(
                (("kettle-steel", 1), ("kettle-electric", 1), ("filters-100", 2))
            )
        ),
        identify_event(
            buyer,
            email=f"{buyer}@example.com",
            first_name="Grace",
            last_name="Hopper",
            locale="en-US",
            timezone="America/New_York",
            consent={"marketing": True},
            message_id=mid(buyer, "identify"),
            timestamp=at(40),
        ),
    ]
    # What the buyer bought together is what recommendations learn to suggest.
    order = ("kettle-steel", "grinder-burr", "dripper-v60", "scale-digital")
    events.append(
        track_event(
            "Order Completed",
            {
                "order_id": f"{buyer}-order-1",
                "total": sum(_DEMO_PRODUCTS[p][1] for p in order),
                "currency": "EUR",
                "products": [_demo_product(p, quantity=1) for p in order],
            },
            user_id=buyer,
            message_id=mid(buyer, "order-1"),
            timestamp=at(30),
        )
    )
    return events


# ------------------------------------------------------------------ chromium


def _find_chromium(given: str | None) -> str:
    if given is not None:
        found = shutil.which(given)
        if found is None:
            raise CommandError(f"--chromium {given}: not an executable program; {CHROMIUM_INSTALL_HINT}")
        return found
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found is not None:
            return found
    raise CommandError(
        f"no Chromium on PATH (looked for {', '.join(CHROMIUM_NAMES)}); {CHROMIUM_INSTALL_HINT}"
    )


def _screenshot(chromium: str, html: str, png: Path, width: int, height: int, timeout: float) -> None:
    """Screenshot ``html`` into ``png`` with a fresh, throwaway Chromium profile."""
    target = png.resolve()
    with tempfile.TemporaryDirectory(prefix="sendtime-preview-") as scratch:
        folder = Path(scratch)
        page = folder / "email.html"
        page.write_text(html, encoding="utf-8")
        log_path = folder / "chromium.log"
        command = [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={folder / 'profile'}",
            f"--window-size={width},{height}",
            f"--screenshot={target}",
            page.as_uri(),
        ]
        target.unlink(missing_ok=True)  # so a stale file cannot pass for this screenshot
        # Output to a file, not a pipe: Chromium's helpers may outlive it and
        # hold a pipe open. Its own session, so a timeout can end all of them.
        with log_path.open("wb") as log:
            process = subprocess.Popen(  # noqa: S603 - the executable is the user's choice
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
            try:
                code = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                code = None
            finally:
                _end_group(process)
        if code is None:
            raise CommandError(f"Chromium took longer than {timeout:g} s (see --chromium-timeout)")
        problem = ""
        if code != 0:
            problem = f"Chromium exited with status {code}"
        elif not target.is_file() or not target.read_bytes().startswith(PNG_SIGNATURE):
            problem = "Chromium wrote no PNG"
        if problem:
            tail = _tail(log_path.read_text(errors="replace"), 8)
            raise CommandError(f"{problem}; its last output:\n{tail}" if tail else problem)


def _end_group(process: subprocess.Popen[bytes]) -> None:
    """Kill what is left of the Chromium we started (its session's process group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _tail(text: str, count: int) -> str:
    return "\n".join(f"  {line}" for line in text.strip().splitlines()[-count:])


def _write(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise CommandError(f"cannot write {path}: {exc.strerror}") from None


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


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def _blocks_json(blocks: Iterable[ContentBlock]) -> dict[str, Any]:
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


def _who_label(result: Mapping[str, Any]) -> str:
    if result.get("user_id"):
        return f"user {result['user_id']}"
    return f"anonymous id {result['anonymous_id']}"


def _provenance(block: Mapping[str, Any]) -> str:
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


def _show_content(result: dict[str, Any]) -> str:
    lines = [
        f"content for {_who_label(result)}: {len(result['blocks'])} blocks in "
        f"{result['server_time_ms']:g} ms of a {result['budget_ms']:g} ms budget"
    ]
    for name, block in result["blocks"].items():
        lines.append("")
        lines.append(f"{name}: {_provenance(block)}")
        if block["data"] is not None:
            lines.extend(f"  {line}" for line in _block_lines(name, block["data"]))
    return "\n".join(lines)


def _block_lines(name: str, data: Any) -> list[str]:
    """A compact reading of a built-in block; JSON for any other (or an
    unexpected shape: the server's blocks may grow fields)."""
    show = _BLOCK_VIEWS.get(name)
    if show is not None:
        try:
            return show(data)
        except (KeyError, TypeError, ValueError, AttributeError):
            pass
    text = json.dumps(data, ensure_ascii=False)
    return [text if len(text) <= 300 else text[:297] + "..."]


def _money(amount: Any, currency: Any) -> str:
    if not isinstance(amount, int | float):
        return "-"
    return f"{amount:.2f} {currency or ''}".rstrip()


def _item(product: Mapping[str, Any]) -> str:
    label = f"{product['name']} ({product['id']})" if product.get("name") else str(product["id"])
    stock = "" if product.get("in_stock", True) else ", out of stock"
    return f"{label}  {_money(product.get('price'), product.get('currency'))}{stock}"


def _cart_lines(cart: Mapping[str, Any]) -> list[str]:
    count = cart["item_count"]
    lines = [
        f"cart {cart['cart_id']}: {count} item{'s' if count != 1 else ''} in stock, "
        f"total {_money(cart['total'], cart['currency'])}"
    ]
    for line in cart["lines"]:
        product = line["product"]
        notes = []
        if line.get("price_dropped"):
            notes.append(f"price dropped from {_money(line['added_price'], product.get('currency'))}")
        if not line.get("in_stock", True):
            notes.append("OUT OF STOCK")
        label = f"{product['name']} ({product['id']})" if product.get("name") else str(product["id"])
        unit = _money(line.get("unit_price"), product.get("currency"))
        lines.append(f"  {line['quantity']} x {label}  {unit}" + (f"  [{'; '.join(notes)}]" if notes else ""))
    return lines


def _products_lines(data: Mapping[str, Any]) -> list[str]:
    lines = [f"strategy: {data['strategy']}"] if data.get("strategy") else []
    for product in data["products"]:
        seen = f", viewed {_moment(product['viewed_at'])}" if product.get("viewed_at") else ""
        lines.append(f"{_item(product)}{seen}")
    return lines


def _moment(text: str) -> str:
    """An ISO 8601 time as '2024-05-01 10:42 UTC' (as given when it is not ISO 8601)."""
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        return text
    if moment.tzinfo is not None:
        moment = moment.astimezone(dt.UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _offers_lines(data: Mapping[str, Any]) -> list[str]:
    return [f"{offer['code']}: {offer['text']}" for offer in data["offers"]]


def _order_lines(order: Mapping[str, Any]) -> list[str]:
    lines = [f"order {order['order_id']}: {_money(order.get('total'), order.get('currency'))}"]
    lines.extend(f"  {_item(product)}" for product in order["products"])
    return lines


_BLOCK_VIEWS: Final[dict[str, Callable[[Any], list[str]]]] = {
    "cart": _cart_lines,
    "recommendations": _products_lines,
    "recently_viewed": _products_lines,
    "offers": _offers_lines,
    "last_order": _order_lines,
}


def _email_summary(result: Mapping[str, Any]) -> list[str]:
    lines = [
        f"{result['template_id']} (version {result['template_version']}) for {_who_label(result)}, "
        f"{result['server_time_ms']:g} ms of a {result['budget_ms']:g} ms budget",
        f"subject:   {result['subject']}",
        f"preheader: {result['preheader']}",
        "blocks:",
        *(f"  {name}: {_provenance(block)}" for name, block in result["blocks"].items()),
    ]
    if result["fell_back"]:
        lines.append(f"fell back: {', '.join(result['fell_back'])} (rendered with the template's fallback)")
    else:
        lines.append("fell back: none")
    return lines


def _show_render(result: dict[str, Any]) -> str:
    lines = _email_summary(result)
    if result["out"] is not None:
        lines.append(f"wrote {result['out']} ({len(result['html'].encode()):,} bytes of HTML)")
    if result["_show_text"]:
        lines.extend(["", result["text"].rstrip()])
    if result["out"] is None:
        lines.extend(["", "(give --out FILE.html to write the HTML)"])
    return "\n".join(lines)


def _show_preview(result: dict[str, Any]) -> str:
    lines = _email_summary(result)
    lines.append(
        f"wrote {result['png']} ({result['width']}x{result['height']} screenshot, "
        f"{result['png_bytes']:,} bytes, by {result['chromium']})"
    )
    return "\n".join(lines)


def _show_demo_data(result: dict[str, Any]) -> str:
    total = len(result["events"])
    if result["duplicate"] == total:
        status = f"already loaded: all {total} events were duplicates, nothing changed"
    else:
        status = f"{result['accepted']} of {total} events accepted, {result['duplicate']} duplicates"
    lines = [
        f"demo data: {status}",
        f"  {result['user']}: browsed, then left a cart with a kettle now cheaper than when added "
        "and one now out of stock",
        f"  {result['buyer']}: a completed order (what recommendations learn from)",
        "",
        "try next:",
        *(f"  {command}" for command in result["try"]),
    ]
    return "\n".join(lines)


def _iso(moment: dt.datetime | None) -> str | None:
    """RFC 3339 in UTC with a Z, as protobuf's JSON mapping writes times."""
    if moment is None:
        return None
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _delivery_json(delivery: Delivery) -> dict[str, Any]:
    latency = delivery.latency
    return {
        "id": delivery.id,
        "idempotency_key": delivery.idempotency_key,
        "flow_id": delivery.flow_id,
        "template_id": delivery.template_id,
        "template_version": delivery.template_version,
        "user_id": delivery.user_id,
        "anonymous_id": delivery.anonymous_id,
        "entry_key": delivery.entry_key,
        "status": delivery.status.value,
        "reason": delivery.reason,
        "attempts": delivery.attempts,
        "relay": delivery.relay,
        "esp_message_id": delivery.esp_message_id,
        "trigger_time": _iso(delivery.trigger_time),
        "receive_time": _iso(delivery.receive_time),
        "due_time": _iso(delivery.due_time),
        "accept_time": _iso(delivery.accept_time),
        "latency_ms": _ms(latency.total_seconds()) if latency is not None else None,
        "create_time": _iso(delivery.create_time),
        "update_time": _iso(delivery.update_time),
    }


def _status_text(delivery: Delivery | Mapping[str, Any]) -> str:
    """'sent', 'skipped (no consent for marketing)'."""
    if isinstance(delivery, Delivery):
        status, reason = delivery.status.value, delivery.reason
    else:
        status, reason = delivery["status"], delivery["reason"]
    return f"{status} ({reason})" if reason else str(status)


def _recipient(delivery: Mapping[str, Any]) -> str:
    return str(delivery["user_id"]) if delivery["user_id"] else f"anon:{delivery['anonymous_id']}"


def _show_send(result: dict[str, Any]) -> str:
    delivery = result["delivery"]
    attempts = delivery["attempts"]
    lines = [
        f"delivery {delivery['id']}: {_status_text(delivery)}",
        f"  {delivery['template_id']} to {_who_label(delivery)}"
        + (f", via {delivery['relay']}" if delivery["relay"] else "")
        + f", {attempts} attempt{'s' if attempts != 1 else ''}",
    ]
    if delivery["esp_message_id"]:
        lines.append(f"  ESP message id: {delivery['esp_message_id']}")
    if delivery["latency_ms"] is not None:
        lines.append(f"  latency: {delivery['latency_ms']:g} ms from the request to the ESP's acceptance")
    key_note = "made for this send; " if result["generated_key"] else ""
    lines.append(
        f"  idempotency key: {result['idempotency_key']} ({key_note}sending again with it returns "
        "this delivery and sends nothing)"
    )
    status = delivery["status"]
    if not result["waited"] and status not in _FINAL_STATUSES:
        lines.append(
            f"  {status} now; add --wait to follow it, or see: sendtime deliveries "
            + (f"--user {delivery['user_id']}" if delivery["user_id"] else "")
        )
    elif status != DeliveryStatus.SENT:
        lines.append(f"  not sent: {_status_text(delivery)}")
    return "\n".join(line.rstrip() for line in lines)


def _show_deliveries(result: dict[str, Any]) -> str:
    scope = [
        f"user {result['user_id']}" if result["user_id"] else "",
        f"flow {result['flow_id']}" if result["flow_id"] else "",
    ]
    where = " and ".join(part for part in scope if part)
    deliveries = result["deliveries"]
    if not deliveries:
        return f"no deliveries{' for ' + where if where else ''}"
    rows = [
        [
            str(d["id"]),
            d["flow_id"] or "(api)",
            d["template_id"],
            _recipient(d),
            d["status"],
            _when(d),
            _clip(d["reason"] or "-", 40),
            str(d["attempts"]),
            d["relay"] or "-",
            d["esp_message_id"] or "-",
            f"{d['latency_ms']:.1f}" if d["latency_ms"] is not None else "-",
        ]
        for d in deliveries
    ]
    headers = [
        "ID",
        "FLOW",
        "TEMPLATE",
        "USER",
        "STATUS",
        "WHEN (UTC)",
        "REASON",
        "ATTEMPTS",
        "RELAY",
        "ESP MESSAGE ID",
        "LATENCY MS",
    ]
    lines = _table(headers, rows, right={0, 7, 10})
    count = len(deliveries)
    summary = f"{count} deliver{'ies' if count != 1 else 'y'}{' for ' + where if where else ''}, newest first"
    if result["next_page_token"]:
        summary += "; more are older (--limit N or --all)"
    return "\n".join([*lines, "", summary])


def _when(delivery: Mapping[str, Any]) -> str:
    """When a scheduled send is due, when a sent one was accepted, else when it
    last changed: 'due 2026-11-29 10:31:05'."""
    if delivery["status"] == "scheduled" and delivery["due_time"]:
        label, moment = "due", delivery["due_time"]
    elif delivery["accept_time"]:
        label, moment = "sent", delivery["accept_time"]
    else:
        label, moment = "at", delivery["update_time"]
    if not moment:
        return "-"
    return f"{label} {moment[:19].replace('T', ' ')}"


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [line(headers), *(line(row) for row in rows)]


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())  # a reason from an ESP may span lines
    return text if len(text) <= width else text[: width - 3] + "..."


def _span(seconds: float) -> str:
    """A delay as people say it: 'at once', '45 s', '30 min', '1 h', '3 d'."""
    if seconds <= 0:
        return "at once"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{round(seconds / size, 2):g} {unit}"
    return f"{round(seconds, 2):g} s"


def _show_flows(result: dict[str, Any]) -> str:
    flows = result["flows"]
    if not flows:
        return "no flows configured (the server's [[flows]] settings)"
    lines: list[str] = []
    for flow in flows:
        kind = "transactional" if flow["transactional"] else f"consent group {flow['subscription_group']}"
        exits = ", ".join(f'"{event}"' for event in flow["exit_events"]) or "none"
        counts = ", ".join(
            f"{status} {flow[status]}" for status in _FLOW_COUNTS if status != "other" or flow[status]
        )
        lines.extend(
            [
                f"{flow['id']}: template {flow['template_id']}, {kind}",
                f'  enters on "{flow["entry_event"]}", sends {_after(flow["delay_s"])}, exits on {exits}',
                f"  {counts}",
            ]
        )
        if flow["next_due_time"] is not None:
            due = dt.datetime.fromisoformat(flow["next_due_time"])
            wait = (due - result["_now"]).total_seconds()
            when = f"in {_span(wait)}" if wait > 0 else "now"
            lines.append(f"  next scheduled send due {when} ({due:%Y-%m-%d %H:%M:%S} UTC)")
    return "\n".join(lines)


def _after(delay_s: float) -> str:
    span = _span(delay_s)
    return span if span == "at once" else f"after {span}"
