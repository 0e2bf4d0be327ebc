"""The email preferences page: HTML for people, JSON for whoever asks for it.

GET shows each subscription group with a checkbox; the form POSTs the boxes
that are ticked (``on``) and the groups that were shown (``shown``), so that an
unticked box reads as "off" and a group added since the page loaded is left
alone.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Final
from urllib.parse import parse_qs

from aiohttp import web

from sendtime.server.domain.errors import InvalidInput
from sendtime.server.preferences import PreferencesView

MAX_FORM_BYTES: Final = 8192


def wanted_groups(body: bytes) -> dict[str, bool]:
    """The choice a posted form makes: every shown group, on when ticked."""
    try:
        form = parse_qs(body.decode(), keep_blank_values=True, strict_parsing=bool(body), max_num_fields=200)
    except (UnicodeDecodeError, ValueError):
        raise InvalidInput.field("body", "is not a form (application/x-www-form-urlencoded)") from None
    ticked = set(form.get("on", []))
    shown = form.get("shown", [])
    if not shown:
        raise InvalidInput.field("shown", "name the groups the page showed")
    unknown = ticked - set(shown)
    if unknown:
        raise InvalidInput.field("on", f"ticks groups the page did not show: {', '.join(sorted(unknown))}")
    return {group: group in ticked for group in shown}


def as_json(view: PreferencesView, *, saved: bool = False) -> Mapping[str, object]:
    return {
        "saved": saved,
        "groups": [
            {"group": g.group, "subscribed": g.subscribed, "why_not": g.why_not, "changeable": g.changeable}
            for g in view.groups
        ],
    }


def page(view: PreferencesView, action: str, *, saved: bool = False) -> web.Response:
    rows = []
    for state in view.groups:
        name = html.escape(state.group)
        ticked = " checked" if state.subscribed else ""
        disabled = "" if state.changeable else " disabled"
        why = f' <small style="color:#71717a">({html.escape(state.why_not)})</small>' if state.why_not else ""
        shown = f'<input type="hidden" name="shown" value="{name}">' if state.changeable else ""
        rows.append(
            f'<p><label><input type="checkbox" name="on" value="{name}"{ticked}{disabled}> '
            f"{name} emails</label>{why}{shown}</p>"
        )
    listing = "".join(rows) or "<p>There are no subscription groups to choose from.</p>"
    note = '<p role="status"><strong>Saved.</strong></p>' if saved else ""
    button = '<button type="submit">Save</button>' if any(s.changeable for s in view.groups) else ""
    body = (
        "<!doctype html><html lang=en><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        "<title>Email preferences</title>"
        '<body style="font-family:system-ui,sans-serif;max-width:32rem;margin:4rem auto;padding:0 1rem">'
        f"<h1>Email preferences</h1>{note}<p>Choose the emails you want from us.</p>"
        f'<form method="post" action="{html.escape(action)}">{listing}{button}</form></body></html>'
    )
    return web.Response(status=200, text=body, content_type="text/html")


def wants_json(request: web.Request) -> bool:
    return "application/json" in request.headers.get("Accept", "")
