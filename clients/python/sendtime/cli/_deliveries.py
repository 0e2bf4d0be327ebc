"""``sendtime send``, ``deliveries`` and ``flows``: emails through the delivery
ledger, and what the ledger holds.

``send`` goes through the ledger: one idempotency key is one email. Without
--idempotency-key it makes a key and prints it first, so that a send whose
answer was lost can be retried with it and still go out only once."""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import sys
import time
import uuid
from collections.abc import Mapping
from typing import Any, Final

from sendtime.cli._arguments import add_identity
from sendtime.cli._connection import command
from sendtime.cli._output import CommandError, UsageError, iso, ms, who_label
from sendtime.cli._plugins import Subcommands
from sendtime.client import Client, Delivery, DeliveryStatus

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


def register(commands: Subcommands, connection: argparse.ArgumentParser) -> None:
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
    add_identity(send_email)
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
    send_email.set_defaults(run=command(_send, _show_send))

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
    deliveries.set_defaults(run=command(_deliveries, _show_deliveries))

    flows = commands.add_parser(
        "flows",
        parents=[connection],
        help="show the configured flows and their deliveries by status",
        description="Each configured flow: the event that enters it, the delay, the events that "
        "cancel it, its consent group, and how many of its deliveries are scheduled, sent, "
        "cancelled, skipped and failed.",
    )
    flows.set_defaults(run=command(_flows, _show_flows))


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
                "next_due_time": iso(_next_due(client, flow.id, flow.scheduled)),
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


# -------------------------------------------------------------------- output


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
        "trigger_time": iso(delivery.trigger_time),
        "receive_time": iso(delivery.receive_time),
        "due_time": iso(delivery.due_time),
        "accept_time": iso(delivery.accept_time),
        "latency_ms": ms(latency.total_seconds()) if latency is not None else None,
        "create_time": iso(delivery.create_time),
        "update_time": iso(delivery.update_time),
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
        f"  {delivery['template_id']} to {who_label(delivery)}"
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
