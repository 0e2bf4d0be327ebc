"""Client commands of the ``sendtime`` CLI, over the Python client:

    sendtime track "Product Added" --user u1 --properties '{"product_id": "p1", "price": 9.5}'
    sendtime track --event '{"userId": "u1", "event": "Signed Up"}'     # a whole event
    sendtime identify --user u1 --email ada@example.com --consent marketing=true --trait plan=pro
    sendtime profile u1 [--json]
    sendtime content u1 [--blocks cart,recommendations] [--deadline-ms 200] [--json]
    sendtime render abandoned_cart --user u1 [--out cart.html] [--text]
    sendtime preview abandoned_cart --user u1 --png cart.png [--mobile]
    sendtime demo-data                                  # a demo shopper to try these on

Each talks to --target (default $SENDTIME_TARGET, else 127.0.0.1:50051) with
--api-key (default $SENDTIME_API_KEY, else the development key). Output is
readable by default and one JSON object with --json. Exit status: 0 on
success, 1 when the server refuses or cannot be reached (or preview finds no
Chromium), 2 for bad arguments.

The content commands' --deadline-ms is the gRPC deadline, which is the
server's time budget for the blocks, as it would be for an ESP at send time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final

from google.protobuf import json_format

from sendtime.client import (
    Ack,
    Client,
    ContentBlock,
    DeadlineExceeded,
    Outcome,
    RenderedEmail,
    SendtimeError,
    Unavailable,
    identify_event,
    track_event,
)
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
        except CommandError as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            if args.json:
                print(json.dumps({"error": {"code": "FAILED", "message": str(exc)}}, ensure_ascii=False))
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
        return 0

    return main


def _report(prog: str, args: argparse.Namespace, error: SendtimeError) -> None:
    if isinstance(error, Unavailable):
        print(f"{prog}: cannot reach sendtime at {args.target}: {error.message}", file=sys.stderr)
    elif isinstance(error, DeadlineExceeded) and getattr(args, "deadline_ms", None) is not None:
        print(
            f"{prog}: no answer within --deadline-ms {args.deadline_ms:g}: {error.message}", file=sys.stderr
        )
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
    hint = (
        "" if args.target == os.environ.get("SENDTIME_TARGET", DEFAULT_TARGET) else f" --target {args.target}"
    )
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
    again gives duplicates and changes nothing."""

    def at(minutes_ago: int) -> dt.datetime:
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
            timestamp=at(180),
        ),
        *(
            track_event(
                "Product Viewed",
                _demo_product(product_id),
                user_id=shopper,
                message_id=mid(shopper, f"viewed:{product_id}"),
                timestamp=at(170 - 5 * n),
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
                timestamp=at(140 - 5 * n),
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
            timestamp=at(60 * 26),
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
            timestamp=at(60 * 25),
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
