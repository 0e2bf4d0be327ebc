"""``sendtime profile``: the profile the server derived for a user."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any, Final

from google.protobuf import json_format

from sendtime.cli._connection import command
from sendtime.cli._output import UsageError
from sendtime.cli._plugins import Subcommands
from sendtime.client import Client
from sendtime.v1 import event_pb2, profile_service_pb2

_CONSENT_NAMES: Final = {
    event_pb2.CONSENT_STATE_OPTED_IN: "opted in",
    event_pb2.CONSENT_STATE_OPTED_OUT: "opted out",
}


def register(commands: Subcommands, connection: argparse.ArgumentParser) -> None:
    profile = commands.add_parser("profile", parents=[connection], help="show the profile derived for a user")
    profile.add_argument("user", nargs="?", metavar="USER", help="the user id")
    profile.add_argument("--anonymous-id", help="look up an anonymous visitor instead")
    profile.set_defaults(run=command(_profile, _show_profile))


def _profile(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    if bool(args.user) == bool(args.anonymous_id):
        raise UsageError("give exactly one of USER and --anonymous-id")
    return _profile_json(client.get_profile(args.user, anonymous_id=args.anonymous_id))


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
    # the person's other ids: the profile shown is merged from all of them
    linked = [f"user {user}" for user in profile.get("linked_user_ids", [])]
    linked += [f"anonymous id {anonymous}" for anonymous in profile.get("linked_anonymous_ids", [])]
    if linked:
        lines.append(f"  linked: {', '.join(linked)}")
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
