"""Flow planning, unsubscribe tokens, quiet hours and the built message."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime, time, timedelta

import msgspec
import pytest

from sendtime.server.domain.errors import InvalidInput, PermissionDenied
from sendtime.server.domain.events import Event, EventKind, IncomingEvent, validate
from sendtime.server.domain.flows import ExitOn, Flow, FlowPlanner, Reentry, send_key
from sendtime.server.domain.sends import QuietHours
from sendtime.server.domain.unsubscribe import UnsubscribeTokens
from sendtime.server.relay.message import build

T0 = datetime(2026, 11, 2, 10, 0, tzinfo=UTC)


def flow(**changes: object) -> Flow:
    base = Flow(
        id="abandoned_cart",
        template="abandoned_cart",
        entry_event="Product Added",
        entry_filter={},
        entry_key="cart_id",
        delay=timedelta(minutes=30),
        exit_events=("Order Completed",),
        exit_on=ExitOn.SAME_KEY,
        reentry=Reentry.ONCE_PER_KEY,
        reentry_period=timedelta(days=1),
        subscription_group="marketing",
        sender="Shop <shop@example.com>",
    )
    for name, value in changes.items():
        object.__setattr__(base, name, value)
    return base


def track(message_id: str, name: str, properties: dict[str, object], minute: float = 0) -> Event:
    at = T0 + timedelta(minutes=minute)
    return validate(
        IncomingEvent(
            message_id=message_id,
            kind=EventKind.TRACK,
            user_id="ada",
            name=name,
            timestamp=at,
            properties=msgspec.json.encode(properties),
        ),
        at,
    )


def test_entry_schedules_one_send_per_key_after_the_delay() -> None:
    planner = FlowPlanner([flow()])
    sends, exits = planner.plan(
        [
            track("m1", "Product Added", {"cart_id": "c1", "product_id": "p"}),
            track("m2", "Product Added", {"cart_id": "c1", "product_id": "q"}, minute=1),
            track("m3", "Product Viewed", {"product_id": "p"}),
        ]
    )
    assert exits == []
    assert [s.entry_key for s in sends] == ["c1", "c1"]
    assert sends[0].send_key == sends[1].send_key == send_key("abandoned_cart", 1, "u:ada", "c1")
    assert sends[0].due_at == T0 + timedelta(minutes=30)


def test_entry_needs_its_key_and_filter() -> None:
    planner = FlowPlanner([flow(entry_filter={"category": "kettles"})])
    sends, _ = planner.plan(
        [
            track("m1", "Product Added", {"product_id": "p", "category": "kettles"}),  # no cart_id
            track("m2", "Product Added", {"cart_id": "c", "product_id": "p", "category": "mugs"}),
            track("m3", "Product Added", {"cart_id": "c", "product_id": "p", "category": "kettles"}),
        ]
    )
    assert [s.entry_message_id for s in sends] == ["m3"]


def test_once_per_period_keys_by_period() -> None:
    planner = FlowPlanner(
        [flow(entry_key="", reentry=Reentry.ONCE_PER_PERIOD, reentry_period=timedelta(days=1))]
    )
    sends, _ = planner.plan(
        [
            track("m1", "Product Added", {"product_id": "p"}, minute=0),
            track("m2", "Product Added", {"product_id": "p"}, minute=60),
            track("m3", "Product Added", {"product_id": "p"}, minute=60 * 24),
        ]
    )
    assert len({s.send_key for s in sends}) == 2


def test_exits_name_their_key_or_every_entry() -> None:
    planner = FlowPlanner([flow(), flow(id="browse", entry_event="Product Viewed", exit_on=ExitOn.ANY)])
    _, exits = planner.plan(
        [
            track("o1", "Order Completed", {"order_id": "o", "cart_id": "c1"}),
            track("o2", "Order Completed", {"order_id": "p"}),
        ]
    )
    assert sorted((e.flow_id, e.entry_key) for e in exits) == [
        ("abandoned_cart", "*"),
        ("abandoned_cart", "c1"),
        ("browse", "*"),
        ("browse", "*"),
    ]


def test_a_late_event_is_not_scheduled_in_the_past_of_its_arrival_by_more_than_the_delay() -> None:
    old = track("m1", "Product Added", {"cart_id": "c", "product_id": "p"}, minute=-600)
    late = msgspec.structs.replace(old, received_at=T0)
    (planned,), _ = FlowPlanner([flow()]).plan([late])
    assert planned.due_at == T0


def test_history_older_than_the_flows_max_entry_age_enters_nothing() -> None:
    def arriving_late(message_id: str, hours: float) -> Event:
        event = track(message_id, "Product Added", {"cart_id": message_id, "product_id": "p"})
        return msgspec.structs.replace(event, received_at=T0 + timedelta(hours=hours))

    planner = FlowPlanner([flow(max_entry_age=timedelta(days=1))])
    sends, _ = planner.plan([arriving_late("a-day-late", 23), arriving_late("two-days-late", 48)])
    assert [send.entry_key for send in sends] == ["a-day-late"]
    # no limit: the imported cart still gets its reminder, due at once
    (unlimited,), _ = FlowPlanner([flow(max_entry_age=None)]).plan([arriving_late("x", 48)])
    assert unlimited.due_at == T0 + timedelta(hours=48)


def test_unsubscribe_tokens_refuse_tampering_and_age() -> None:
    tokens = UnsubscribeTokens(b"0123456789abcdef0123")
    token = tokens.issue("u:ada", "marketing", T0)
    assert tokens.verify(token, T0).profile_key == "u:ada"
    payload, _, signature = token.partition(".")
    forged = UnsubscribeTokens(b"another-secret-0123456").issue("u:ada", "marketing", T0)
    with pytest.raises(PermissionDenied, match="altered"):
        tokens.verify(forged, T0)
    with pytest.raises(PermissionDenied, match="altered"):
        tokens.verify(payload[:-2] + "xx." + signature, T0)
    with pytest.raises(PermissionDenied, match="expired"):
        tokens.verify(token, T0 + timedelta(days=91))
    with pytest.raises(InvalidInput):
        tokens.verify("not-a-token", T0)


def test_quiet_hours_in_the_users_zone() -> None:
    quiet = QuietHours(start=time(21), end=time(8), default_timezone="UTC", hold=True)
    evening_utc = datetime(2026, 11, 2, 22, 30, tzinfo=UTC)
    assert quiet.next_allowed(evening_utc, None) == datetime(2026, 11, 3, 8, 0, tzinfo=UTC)
    # 22:30 UTC is 14:30 in Los Angeles: not quiet there
    assert quiet.next_allowed(evening_utc, "America/Los_Angeles") is None
    # 10:00 UTC is 21:00 in Sydney (UTC+11 in November): quiet until 08:00 there
    until = quiet.next_allowed(datetime(2026, 11, 2, 10, 0, tzinfo=UTC), "Australia/Sydney")
    assert until == datetime(2026, 11, 2, 21, 0, tzinfo=UTC)
    assert quiet.next_allowed(datetime(2026, 11, 2, 12, 0, tzinfo=UTC), "Not/AZone") is None


def test_message_has_the_headers_providers_require_and_resists_injection() -> None:
    outgoing = build(
        send_key="snd_1",
        message_id_domain="mail.example.com",
        sender="Shop <shop@example.com>",
        recipient_email="ada@example.com",
        recipient_name="Ada\r\nBcc: victim@example.com",
        reply_to="help@example.com",
        subject="Your cart\r\nBcc: victim@example.com",
        html="<p>Hi</p>",
        text="Hi",
        date=T0,
        list_id="shop.example.com",
        unsubscribe_url="https://mail.example.com/v1/unsubscribe/tok",
        unsubscribe_mailto="mailto:unsubscribe@example.com",
    )
    raw = outgoing.mime.decode("ascii")
    # the header is plain text on the wire (not an RFC 2047 encoded word), one line
    assert "\r\nList-Unsubscribe: <https://mail.example.com/v1/unsubscribe/tok>, <mailto:" in raw
    assert all(len(line) <= 998 for line in raw.split("\r\n"))
    parsed = email.message_from_bytes(outgoing.mime, policy=email.policy.default)
    assert parsed["Message-ID"] == "<snd_1@mail.example.com>"
    assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert parsed["List-Unsubscribe"] == (
        "<https://mail.example.com/v1/unsubscribe/tok>, <mailto:unsubscribe@example.com>"
    )
    assert parsed["List-ID"] == "<shop.example.com>"
    assert parsed["Bcc"] is None
    assert "\n" not in parsed["Subject"]
    assert parsed.get_content_type() == "multipart/alternative"
    assert [part.get_content_type() for part in parsed.iter_parts()] == ["text/plain", "text/html"]
    assert outgoing.envelope_to == "ada@example.com"


def test_long_unsubscribe_urls_and_non_ascii_names_survive_the_wire() -> None:
    url = "https://mail.example.com/v1/unsubscribe/" + "A" * 160 + ".sig"
    outgoing = build(
        send_key="snd_2",
        message_id_domain="mail.example.com",
        sender="Boutique Émile <shop@example.com>",
        recipient_email="zoe@example.com",
        recipient_name="Zoë Ångström",
        reply_to="",
        subject="Ton panier t'attend, Zoë",
        html="<p>Café crème = 3 €</p>",
        text="Café crème = 3 €\n" + "x" * 200,
        date=T0,
        list_id="shop.example.com",
        unsubscribe_url=url,
    )
    raw = outgoing.mime
    assert f"List-Unsubscribe: <{url}>".encode() in raw
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert str(parsed["Subject"]) == "Ton panier t'attend, Zoë"
    assert parsed["To"].addresses[0].display_name == "Zoë Ångström"
    assert parsed["From"].addresses[0].display_name == "Boutique Émile"
    # (the stdlib parser keeps the CRLF line ends of a quoted-printable part)
    text, html = (part.get_content().replace("\r\n", "\n") for part in parsed.iter_parts())
    assert text == "Café crème = 3 €\n" + "x" * 200
    assert html == "<p>Café crème = 3 €</p>"
    with pytest.raises(ValueError, match="not an email address"):
        build(
            send_key="snd_3",
            message_id_domain="d.example",
            sender="s@example.com",
            recipient_email="nobody",
            recipient_name="",
            reply_to="",
            subject="s",
            html="h",
            text="t",
            date=T0,
            list_id="",
        )
