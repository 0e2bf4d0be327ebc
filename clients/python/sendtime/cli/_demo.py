"""``sendtime demo-data``: a demo shopper and a demo buyer to try the content,
render and preview commands on, for the products of the demo catalog."""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any, Final

from sendtime.cli._connection import command
from sendtime.cli._output import CommandError, UsageError
from sendtime.cli._plugins import Subcommands
from sendtime.client import Client, Outcome, identify_event, track_event
from sendtime.v1 import event_pb2

#: Products of demo/catalog.json (the server's default catalog), as a shop's
#: events would describe them: (name, price when the event happened, category).
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


def register(commands: Subcommands, connection: argparse.ArgumentParser) -> None:
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
    demo.set_defaults(run=command(_demo_data, _show_demo_data))


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
