"""``sendtime segment`` and ``sendtime broadcast``: audiences as CEL
expressions over the profile, and one template sent to one, each email made
at its own send time.

    sendtime segment create germany 'traits.locale == "de-DE"'
    sendtime segment count germany            # or an expression: 'order_count > 0'
    sendtime segment sample germany --limit 10
    sendtime broadcast create winter_sale --segment germany --local-time 2026-12-04T19:00 \\
        --fallback-zone Europe/Berlin --rate 50 [--key KEY]
    sendtime broadcast show ID [--watch]
    sendtime broadcast list [--active]
    sendtime broadcast pause|resume|cancel ID
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
import time
import uuid
from typing import Any, Final

from sendtime.cli._connection import command
from sendtime.cli._output import CommandError, UsageError, iso, ms
from sendtime.cli._plugins import Subcommands
from sendtime.client import Broadcast, BroadcastState, Client

#: A segment's name; anything else given where a segment goes is an expression.
_NAME: Final = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_FINAL: Final = frozenset({BroadcastState.DONE, BroadcastState.CANCELLED})
WATCH_EVERY_S: Final = 1.0
_BAR: Final = 30


def register(commands: Subcommands, connection: argparse.ArgumentParser) -> None:
    segment = commands.add_parser(
        "segment",
        help="segments: make, list, count and sample audiences (CEL expressions over the profile)",
        description="Segments are CEL expressions over the profile (traits, consent, carts, orders, "
        "recently viewed, activity; see the README's Segments and broadcasts). Where a command takes "
        "AUDIENCE, give a segment's name or an expression.",
    )
    segments = segment.add_subparsers(dest="segment_command", required=True, metavar="SUBCOMMAND")
    create = segments.add_parser("create", parents=[connection], help="make or replace a segment")
    create.add_argument("name", metavar="NAME", help="1-64 characters of a-z, 0-9, '_' and '-'")
    create.add_argument("expression", metavar="EXPRESSION", help="a CEL expression, e.g. 'order_count > 0'")
    create.add_argument("--description", default="", help="what it is for")
    create.set_defaults(run=command(_create_segment, _show_segment), command="segment create")
    listed = segments.add_parser("list", parents=[connection], help="every segment")
    listed.set_defaults(run=command(_list_segments, _show_segments), command="segment list")
    count = segments.add_parser("count", parents=[connection], help="how many stored profiles are in it now")
    _audience(count)
    count.set_defaults(run=command(_count, _show_count), command="segment count")
    sample = segments.add_parser("sample", parents=[connection], help="a few of its users")
    _audience(sample)
    sample.add_argument(
        "--limit", type=int, default=10, metavar="N", help="at most N users (1-100, default 10)"
    )
    sample.set_defaults(run=command(_sample, _show_sample), command="segment sample")

    broadcast = commands.add_parser(
        "broadcast",
        help="broadcasts: send a template to a segment, each email made at its own send time",
        description="A broadcast sends one template to a segment's users through the same checks as "
        "a flow's sends (consent, suppression, frequency caps, quiet hours, unsubscribe). Its audience "
        "is resolved when it starts.",
    )
    broadcasts = broadcast.add_subparsers(dest="broadcast_command", required=True, metavar="SUBCOMMAND")
    make = broadcasts.add_parser(
        "create",
        parents=[connection],
        help="make a broadcast (the same --key twice makes it once)",
        description="Send TEMPLATE to a segment's users now, at --at (a UTC instant) or at --local-time "
        "in each user's own time zone (--fallback-zone for users with none).",
    )
    make.add_argument("template", metavar="TEMPLATE", help="template id, e.g. post_purchase")
    who = make.add_mutually_exclusive_group(required=True)
    who.add_argument("--segment", metavar="NAME", help="a segment's name")
    who.add_argument("--expression", metavar="EXPR", help="a CEL expression instead of a segment")
    make.add_argument(
        "--key", dest="idempotency_key", metavar="KEY", help="idempotency key (default: a new one, printed)"
    )
    make.add_argument("--name", default="", help="a name to show (default: the key)")
    kind = make.add_mutually_exclusive_group()
    kind.add_argument("--transactional", action="store_true", help="no consent, caps or quiet hours")
    kind.add_argument("--group", metavar="G", help="the consent group it needs (default: marketing)")
    make.add_argument("--sender", default="", help="From: (default: the server's delivery.default_sender)")
    when = make.add_mutually_exclusive_group()
    when.add_argument("--at", metavar="TIME", help="a UTC instant, e.g. 2026-12-04T18:00:00Z (default: now)")
    when.add_argument(
        "--local-time", metavar="TIME", help="a wall-clock time in each user's zone, e.g. 2026-12-04T19:00"
    )
    make.add_argument("--fallback-zone", default="", metavar="ZONE", help="for users with no time zone (UTC)")
    make.add_argument(
        "--rate", type=float, default=0.0, metavar="N", help="at most N emails/s (default: no limit)"
    )
    make.add_argument("--end", metavar="TIME", help="skip what is not sent by then (a UTC instant)")
    make.add_argument(
        "--require-block", action="append", default=[], metavar="BLOCK", help="skip users with no data for it"
    )
    make.set_defaults(run=command(_create_broadcast, _show_broadcast), command="broadcast create")
    show = broadcasts.add_parser("show", parents=[connection], help="a broadcast and its progress")
    show.add_argument("id", metavar="ID")
    show.add_argument("--watch", action="store_true", help="show it again every second until it ends")
    show.set_defaults(run=command(_show, _show_broadcast), command="broadcast show")
    every = broadcasts.add_parser("list", parents=[connection], help="broadcasts, newest first")
    every.add_argument("--active", action="store_true", help="only those not done or cancelled")
    every.set_defaults(run=command(_list_broadcasts, _show_broadcasts), command="broadcast list")
    for verb, what in (
        ("pause", "stop sending (within a second) until resumed"),
        ("resume", "send the rest, at their own times again"),
        ("cancel", "cancel the rest (what was sent stays sent)"),
    ):
        action = broadcasts.add_parser(verb, parents=[connection], help=what)
        action.add_argument("id", metavar="ID")
        action.set_defaults(run=command(_act, _show_broadcast), command=f"broadcast {verb}", verb=verb)


def _audience(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("audience", metavar="AUDIENCE", help="a segment's name, or a CEL expression")
    parser.add_argument(
        "--expression", action="store_true", help="AUDIENCE is an expression even if it looks like a name"
    )


def _which(args: argparse.Namespace) -> dict[str, str]:
    text = args.audience.strip()
    if not text:
        raise UsageError("AUDIENCE: give a segment's name or an expression")
    if _NAME.match(text) and not args.expression:
        return {"segment": text}
    return {"expression": text}


# -------------------------------------------------------------------- segments


def _create_segment(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    segment = client.create_segment(args.name, args.expression, description=args.description)
    return {"segment": _segment_json(segment)}


def _list_segments(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    return {"segments": [_segment_json(s) for s in client.list_segments()]}


def _count(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    which = _which(args)
    counted = client.count_segment(segment=which.get("segment"), expression=which.get("expression"))
    return {
        **which,
        "count": counted.count,
        "scanned": counted.scanned,
        "errors": counted.errors,
        "first_error": counted.first_error,
        "elapsed_ms": ms(counted.elapsed.total_seconds()),
    }


def _sample(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    if not 0 < args.limit <= 100:
        raise UsageError("--limit: must be between 1 and 100")
    which = _which(args)
    members = client.sample_segment(
        segment=which.get("segment"), expression=which.get("expression"), limit=args.limit
    )
    return {
        **which,
        "members": [
            {"user_id": m.user_id, "anonymous_id": m.anonymous_id, "email": m.email, "timezone": m.timezone}
            for m in members
        ],
    }


def _segment_json(segment: Any) -> dict[str, Any]:
    return {
        "name": segment.name,
        "expression": segment.expression,
        "description": segment.description,
        "source": segment.source,
    }


def _show_segment(result: dict[str, Any]) -> str:
    s = result["segment"]
    return f"segment {s['name']} ({s['source']}): {s['expression']}" + (
        f"\n  {s['description']}" if s["description"] else ""
    )


def _show_segments(result: dict[str, Any]) -> str:
    if not result["segments"]:
        return "no segments ([[segments]] in the settings, or sendtime segment create)"
    return "\n".join(f"{s['name']:<20} {s['source']:<6} {s['expression']}" for s in result["segments"])


def _audience_label(result: dict[str, Any]) -> str:
    return f"segment {result['segment']}" if "segment" in result else f"expression {result['expression']}"


def _show_count(result: dict[str, Any]) -> str:
    lines = [
        f"{result['count']:,} of {result['scanned']:,} profiles are in {_audience_label(result)} "
        f"({result['elapsed_ms']:g} ms)"
    ]
    if result["errors"]:
        lines.append(
            f"  {result['errors']:,} profiles could not be evaluated (not counted); the first: {result['first_error']}"
        )
    return "\n".join(lines)


def _show_sample(result: dict[str, Any]) -> str:
    members = result["members"]
    if not members:
        return f"nobody is in {_audience_label(result)}"
    rows = [
        f"{m['user_id'] or 'anon:' + m['anonymous_id']:<24} {m['email'] or '-':<32} {m['timezone'] or '-'}"
        for m in members
    ]
    return "\n".join([f"{len(members)} of {_audience_label(result)}:", *rows])


# -------------------------------------------------------------------- broadcasts


def _instant(value: str | None, flag: str) -> dt.datetime | None:
    if value is None:
        return None
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"{flag}: {value!r} is not a time like 2026-12-04T18:00:00Z") from None
    if moment.tzinfo is None:
        raise UsageError(f"{flag}: give the zone (a Z for UTC), e.g. 2026-12-04T18:00:00Z")
    return moment


def _create_broadcast(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    if args.rate < 0:
        raise UsageError("--rate: must be 0 (no limit) or more")
    key = args.idempotency_key
    if key is None:
        key = f"cli-{uuid.uuid4()}"
        print(
            f"sendtime broadcast create: idempotency key {key} (running again with --key {key} is safe: "
            "the server returns this same broadcast)",
            file=sys.stderr,
            flush=True,
        )
    broadcast = client.create_broadcast(
        args.template,
        idempotency_key=key,
        segment=args.segment,
        expression=args.expression,
        name=args.name,
        transactional=args.transactional,
        subscription_group=args.group,
        sender=args.sender,
        send_time=_instant(args.at, "--at"),
        local_time=args.local_time,
        fallback_time_zone=args.fallback_zone,
        rate_limit=args.rate,
        end_time=_instant(args.end, "--end"),
        require_blocks=args.require_block,
    )
    return {"broadcast": _broadcast_json(broadcast)}


def _show(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    broadcast = client.get_broadcast(args.id)
    while args.watch and broadcast.state not in _FINAL:
        if not args.json:
            print(_show_broadcast({"broadcast": _broadcast_json(broadcast)}) + "\n", flush=True)
        try:
            time.sleep(WATCH_EVERY_S)
        except KeyboardInterrupt:
            raise CommandError("stopped watching (the broadcast goes on)") from None
        broadcast = client.get_broadcast(args.id)
    return {"broadcast": _broadcast_json(broadcast)}


def _list_broadcasts(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    return {"broadcasts": [_broadcast_json(b) for b in client.list_broadcasts(active_only=args.active)]}


def _act(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    act = {
        "pause": client.pause_broadcast,
        "resume": client.resume_broadcast,
        "cancel": client.cancel_broadcast,
    }
    act[args.verb](args.id)
    return {"broadcast": _broadcast_json(client.get_broadcast(args.id))}


def _broadcast_json(b: Broadcast) -> dict[str, Any]:
    p = b.progress
    return {
        "id": b.id,
        "idempotency_key": b.idempotency_key,
        "name": b.name,
        "template_id": b.template_id,
        "segment": b.segment,
        "expression": b.expression,
        "subscription_group": b.subscription_group,
        "sender": b.sender,
        "send_time": iso(b.send_time),
        "local_time": b.local_time,
        "fallback_time_zone": b.fallback_time_zone,
        "rate_limit": b.rate_limit,
        "end_time": iso(b.end_time),
        "state": b.state.value,
        "create_time": iso(b.create_time),
        "start_time": iso(b.start_time),
        "plan_time": iso(b.plan_time),
        "progress": None
        if p is None
        else {
            "audience": p.audience,
            "planned": p.planned,
            "scheduled": p.scheduled,
            "in_flight": p.in_flight,
            "sent": p.sent,
            "skipped": dict(p.skipped),
            "failed": p.failed,
            "uncertain": p.uncertain,
            "cancelled": p.cancelled,
            "segment_errors": p.segment_errors,
        },
    }


def progress_bar(done: int, total: int, width: int = _BAR) -> str:
    """'[#########.....................]  30%'."""
    share = done / total if total else 0.0
    filled = round(share * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {share:4.0%}"


def _show_broadcast(result: dict[str, Any]) -> str:
    b = result["broadcast"]
    audience = (b["segment"] and f"segment {b['segment']}") or f"expression {b['expression']}"
    if b["local_time"]:
        when = f"{b['local_time']} in each user's zone (else {b['fallback_time_zone']})"
    else:
        when = (b["send_time"] or "now").replace("T", " ")
    lines = [
        f"broadcast {b['id']} ({b['name']}): {b['state']}",
        f"  {b['template_id']} to {audience}, {when}"
        + (f", at most {b['rate_limit']:g}/s" if b["rate_limit"] else "")
        + ("" if b["subscription_group"] else ", transactional"),
    ]
    p = b["progress"]
    if p is not None and b["state"] not in ("scheduled",):
        settled = p["sent"] + sum(p["skipped"].values()) + p["failed"] + p["uncertain"] + p["cancelled"]
        lines.append(
            f"  {progress_bar(settled, p['audience'] or p['planned'])}  {settled:,} of {p['audience']:,} done"
        )
        lines.append(
            f"  sent {p['sent']:,}, scheduled {p['scheduled']:,}, sending {p['in_flight']:,}, failed {p['failed']:,}, "
            f"uncertain {p['uncertain']:,}, cancelled {p['cancelled']:,}"
        )
        if p["skipped"]:
            lines.append("  skipped: " + ", ".join(f"{k} {v:,}" for k, v in sorted(p["skipped"].items())))
        if p["segment_errors"]:
            lines.append(
                f"  {p['segment_errors']:,} profiles the segment could not be evaluated on (left out)"
            )
    return "\n".join(lines)


def _show_broadcasts(result: dict[str, Any]) -> str:
    if not result["broadcasts"]:
        return "no broadcasts"
    rows = []
    for b in result["broadcasts"]:
        p = b["progress"] or {"audience": 0, "sent": 0}
        rows.append(
            f"{b['id']:<24} {b['state']:<10} {b['template_id']:<20} sent {p['sent']:,} of {p['audience']:,}  {b['name']}"
        )
    return "\n".join(rows)
