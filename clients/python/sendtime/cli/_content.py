"""``sendtime content``, ``render`` and ``preview``: content blocks and whole
emails for a user, as a send would get them now.

The commands' --deadline-ms is the gRPC deadline, which is the server's time
budget for the blocks, as it would be for an ESP at send time."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

from sendtime.cli._arguments import add_identity, who
from sendtime.cli._chromium import find_chromium, screenshot
from sendtime.cli._connection import command
from sendtime.cli._output import CommandError, UsageError, blocks_json, ms, provenance, who_label, write
from sendtime.cli._plugins import Subcommands
from sendtime.client import Client, RenderedEmail

#: What an ESP would give a send; the server's own default budget is also 300 ms.
DEFAULT_DEADLINE_MS: Final = 300.0
MAX_DEADLINE_MS: Final = 60_000.0
#: A phone's viewport width in CSS pixels, for --mobile.
MOBILE_WIDTH: Final = 390
DESKTOP_WIDTH: Final = 700


def register(commands: Subcommands, connection: argparse.ArgumentParser) -> None:
    send = _send_arguments()
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
    content.set_defaults(run=command(_content, _show_content))

    render = commands.add_parser(
        "render",
        parents=[connection, send],
        help="render a whole email for a user from a server template",
        description="Render TEMPLATE for a user: subject, preheader, HTML and text, with the "
        "blocks that fell back.",
    )
    render.add_argument("template", metavar="TEMPLATE", help="template id, e.g. abandoned_cart")
    add_identity(render)
    render.add_argument("--out", type=Path, metavar="FILE", help="write the HTML to FILE")
    render.add_argument(
        "--text", action="store_true", help="print the plain-text part (printed anyway without --out)"
    )
    render.set_defaults(run=command(_render, _show_render))

    preview = commands.add_parser(
        "preview",
        parents=[connection, send],
        help="screenshot a rendered email with headless Chromium",
        description="Render TEMPLATE for a user on the server and screenshot the HTML with "
        "headless Chromium (chromium, chromium-browser or google-chrome on PATH).",
    )
    preview.add_argument("template", metavar="TEMPLATE", help="template id, e.g. abandoned_cart")
    add_identity(preview)
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
    preview.set_defaults(run=command(_preview, _show_preview))


def _send_arguments() -> argparse.ArgumentParser:
    """What a send at this moment would give the server: its deadline and context."""
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
    return send


def _deadline(args: argparse.Namespace) -> float:
    if not 0 < args.deadline_ms <= MAX_DEADLINE_MS:
        raise UsageError(f"--deadline-ms: must be more than 0 and at most {MAX_DEADLINE_MS:g}")
    return float(args.deadline_ms) / 1000


def _content(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    recipient = who(args, args.user)
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
        **recipient,
        "blocks": blocks_json(content.blocks),
        "server_time_ms": ms(content.server_time),
        "budget_ms": ms(content.budget),
    }


def _render_email(client: Client, args: argparse.Namespace) -> tuple[dict[str, str], RenderedEmail]:
    recipient = who(args, args.user_id)
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
    return recipient, email


def _email_json(recipient: Mapping[str, str], email: RenderedEmail) -> dict[str, Any]:
    return {
        **recipient,
        "template_id": email.template_id,
        "template_version": email.template_version,
        "subject": email.subject,
        "preheader": email.preheader,
        "blocks": blocks_json(email.blocks),
        "fell_back": [block.name for block in email.fell_back],
        "server_time_ms": ms(email.server_time),
        "budget_ms": ms(email.budget),
    }


def _render(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    recipient, email = _render_email(client, args)
    result = _email_json(recipient, email)
    result.update(html=email.html, text=email.text, out=None)
    if args.out is not None:
        write(args.out, email.html.encode())
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
    who(args, args.user_id)
    # Before the render: no server call for a screenshot that cannot be taken.
    chromium = find_chromium(args.chromium)
    if not args.png.resolve().parent.is_dir():
        raise CommandError(f"--png {args.png}: no such directory {args.png.resolve().parent}")
    recipient, email = _render_email(client, args)
    screenshot(chromium, email.html, args.png, width, args.height, args.chromium_timeout)
    return {
        **_email_json(recipient, email),
        "png": str(args.png),
        "png_bytes": args.png.stat().st_size,
        "width": width,
        "height": args.height,
        "chromium": chromium,
    }


# -------------------------------------------------------------------- output


def _show_content(result: dict[str, Any]) -> str:
    lines = [
        f"content for {who_label(result)}: {len(result['blocks'])} blocks in "
        f"{result['server_time_ms']:g} ms of a {result['budget_ms']:g} ms budget"
    ]
    for name, block in result["blocks"].items():
        lines.append("")
        lines.append(f"{name}: {provenance(block)}")
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
        f"{result['template_id']} (version {result['template_version']}) for {who_label(result)}, "
        f"{result['server_time_ms']:g} ms of a {result['budget_ms']:g} ms budget",
        f"subject:   {result['subject']}",
        f"preheader: {result['preheader']}",
        "blocks:",
        *(f"  {name}: {provenance(block)}" for name, block in result["blocks"].items()),
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
