"""Flows and relay against real servers on loopback: sendtime, an SMTP server
(aiosmtpd), and ESP HTTP servers that fail on purpose."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc.aio
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sendtime.server.app import Sendtime
from sendtime.v1 import delivery_service_pb2 as D
from sendtime.v1 import delivery_service_pb2_grpc, event_pb2, event_service_pb2
from tests.conftest import DEV_AUTH, SettingsFactory, event_stub
from tests.integration.server_process import start_server
from tests.integration.smtp_server import Inbox, SmtpServer

SENT = D.DELIVERY_STATUS_SENT


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    server = SmtpServer()
    server.start()
    yield server
    server.stop()


def flows_config(
    relay: str, *, delay_s: float = 0.2, template: str = "abandoned_cart", extra: str = ""
) -> str:
    return f"""
[delivery]
public_base_url = "https://mail.example.com"
frequency_cap_count = 0
poll_interval_ms = 100
{extra}
[delivery.relay]
{relay}

[[flows]]
id = "abandoned_cart"
template = "{template}"
entry_event = "Product Added"
entry_key = "cart_id"
delay_s = {delay_s}
exit_events = ["Order Completed"]
require_blocks = ["cart"]
"""


def smtp_relay(port: int, attempts: int = 3) -> str:
    return f'kind = "smtp"\nhost = "127.0.0.1"\nport = {port}\ntls = "off"\nattempts = {attempts}\n'


def track(message_id: str, name: str, properties: dict[str, Any], user: str = "ada") -> event_pb2.Event:
    return event_pb2.Event(
        message_id=message_id,
        user_id=user,
        track=event_pb2.TrackPayload(name=name, properties_json=json.dumps(properties).encode()),
    )


def identify(message_id: str, user: str = "ada", email: str = "ada@example.com") -> event_pb2.Event:
    traits = event_pb2.Traits(
        email=email, first_name="Ada", consent={"marketing": event_pb2.CONSENT_STATE_OPTED_IN}
    )
    return event_pb2.Event(
        message_id=message_id, user_id=user, identify=event_pb2.IdentifyPayload(traits=traits)
    )


def add_to_cart(message_id: str, cart: str = "c1", user: str = "ada") -> event_pb2.Event:
    return track(
        message_id,
        "Product Added",
        {"cart_id": cart, "product_id": "kettle-steel", "name": "Kettle", "price": 70, "quantity": 1},
        user,
    )


async def ingest(channel: grpc.aio.Channel, *events: event_pb2.Event) -> None:
    reply = await event_stub(channel).IngestEvents(
        event_service_pb2.IngestEventsRequest(events=list(events)), metadata=DEV_AUTH
    )
    assert all(a.outcome != event_pb2.EVENT_OUTCOME_REJECTED for a in reply.acks), reply


def deliveries(channel: grpc.aio.Channel) -> delivery_service_pb2_grpc.DeliveryServiceAsyncStub:
    return delivery_service_pb2_grpc.DeliveryServiceStub(channel)


async def wait_for_status(
    channel: grpc.aio.Channel, wanted: set[int], *, user: str = "ada", timeout: float = 10.0
) -> D.Delivery:
    deadline = time.monotonic() + timeout
    while True:
        reply = await deliveries(channel).ListDeliveries(
            D.ListDeliveriesRequest(user_id=user), metadata=DEV_AUTH
        )
        found = [d for d in reply.deliveries if d.status in wanted]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no delivery reached {wanted}: {reply.deliveries}")
        await asyncio.sleep(0.02)


async def a_later_send_went_out(channel: grpc.aio.Channel) -> None:
    """Another user's send, entered now, reaches sent: by then the dispatcher
    has looked past every send due before it, so whatever did not happen to
    those will not (a wait on that, not on the clock)."""
    await ingest(
        channel, identify("later-i", user="bea", email="bea@example.com"), add_to_cart("later-a", user="bea")
    )
    await wait_for_status(channel, {SENT}, user="bea")


def to_ada(messages: list[Any]) -> list[Any]:
    return [m for m in messages if "ada@example.com" in str(m["To"])]


def channel_to(app: Sendtime) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}")


async def test_abandoned_cart_reaches_smtp_with_live_cart_and_unsubscribe_headers(
    make_settings: SettingsFactory, smtp: SmtpServer
) -> None:
    async with (
        Sendtime(make_settings(flows_config(smtp_relay(smtp.port)))) as app,
        channel_to(app) as channel,
    ):
        await ingest(channel, identify("i1"), add_to_cart("a1"))
        delivery = await wait_for_status(channel, {SENT})
        (message,) = await asyncio.to_thread(smtp.inbox.wait_for, 1)
    assert message["To"] == "Ada <ada@example.com>"
    assert "you left something" in message["Subject"]
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert message["List-Unsubscribe"].startswith("<https://mail.example.com/v1/unsubscribe/")
    assert message["Message-ID"] == f"<{delivery.idempotency_key}@sendtime.local>"
    html = message.get_body(("html",)).get_content()  # type: ignore[union-attr]
    text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    # the demo catalog's live price (64) and the price when added (70)
    assert "Gooseneck Kettle, Brushed Steel" in html
    assert "64.00" in text
    assert "70.00" in text
    # the body's Unsubscribe link is the header's one-click URL, in both parts
    one_click = message["List-Unsubscribe"].split(",")[0].strip("<> ")
    assert f'href="{one_click}"' in html
    assert one_click in text
    assert delivery.flow_id == "abandoned_cart"
    assert delivery.relay == "smtp"
    assert delivery.esp_message_id
    assert delivery.template_version
    assert delivery.latency.ToMilliseconds() >= 200  # the flow's delay
    assert smtp.inbox.envelopes == [("shop@example.com", ["ada@example.com"])]


async def test_an_order_before_the_delay_ends_cancels_the_send(
    make_settings: SettingsFactory, smtp: SmtpServer
) -> None:
    config = flows_config(smtp_relay(smtp.port), delay_s=0.5)
    async with Sendtime(make_settings(config)) as app, channel_to(app) as channel:
        await ingest(channel, identify("i1"), add_to_cart("a1"))
        await ingest(
            channel, track("o1", "Order Completed", {"order_id": "o1", "cart_id": "c1", "total": 64})
        )
        cancelled = await wait_for_status(channel, {D.DELIVERY_STATUS_CANCELLED})
        await a_later_send_went_out(channel)  # past the cancelled send's due time
        flows = await deliveries(channel).ListFlows(D.ListFlowsRequest(), metadata=DEV_AUTH)
    assert cancelled.reason == "exit: Order Completed"
    assert to_ada(smtp.inbox.messages) == []
    (summary,) = flows.flows
    assert (summary.id, summary.cancelled, summary.sent) == ("abandoned_cart", 1, 1)


async def test_an_order_that_lands_while_the_email_renders_still_cancels_it(
    make_settings: SettingsFactory, smtp: SmtpServer, tmp_path: Path
) -> None:
    slow = web.Application()

    async def points(_request: web.Request) -> web.Response:
        await asyncio.sleep(0.6)
        return web.json_response({"points": 10})

    slow.router.add_get("/{tail:.*}", points)
    runner = web.AppRunner(slow)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "slow_cart.mjml.liquid").write_text(
        '+++\nid = "slow_cart"\nsubject = "Your cart"\n'
        "[blocks.cart]\nfallback = { lines = [] }\n[blocks.loyalty]\nfallback = { points = 0 }\n+++\n"
        "<mjml><mj-body><mj-section><mj-column><mj-text>{{ cart.lines.size }} items, {{ loyalty.points }}"
        " points</mj-text></mj-column></mj-section></mj-body></mjml>\n"
    )
    content = (
        f'[content]\ntemplates_dir = "{templates}"\nallowed_upstream_hosts = ["127.0.0.1"]\n'
        f'[[content.upstreams]]\nname = "loyalty"\nurl = "http://127.0.0.1:{port}/{{user.id}}"\ntimeout_s = 2.0\n'
    )
    config = flows_config(smtp_relay(smtp.port), delay_s=0.0, template="slow_cart") + content
    try:
        async with Sendtime(make_settings(config)) as app, channel_to(app) as channel:
            await ingest(channel, identify("i1"), add_to_cart("a1"))
            await wait_for_status(channel, {D.DELIVERY_STATUS_SENDING})  # rendering: the upstream is slow
            await ingest(channel, track("o1", "Order Completed", {"order_id": "o1", "cart_id": "c1"}))
            cancelled = await wait_for_status(channel, {D.DELIVERY_STATUS_CANCELLED})
    finally:
        await runner.cleanup()
    assert cancelled.reason == "exit: Order Completed"
    assert smtp.inbox.messages == []


async def test_esp_that_answers_429_and_503_before_202_gets_one_request_accepted(
    make_settings: SettingsFactory,
) -> None:
    answers = [
        web.Response(status=429, headers={"Retry-After": "0"}, text='{"errors":[{"message":"slow down"}]}'),
        web.Response(status=503, text="busy"),
        web.Response(status=202, headers={"X-Message-Id": "sg-123"}),
    ]
    received: list[dict[str, Any]] = []

    async def mail_send(request: web.Request) -> web.Response:
        received.append(await request.json())
        if len(received) <= len(answers):
            return answers[len(received) - 1]
        return web.Response(status=202, headers={"X-Message-Id": f"sg-{len(received)}"})

    esp = web.Application()
    esp.router.add_post("/v3/mail/send", mail_send)
    runner = web.AppRunner(esp)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    relay = (
        f'kind = "sendgrid"\napi_key = "SG.test"\nbase_url = "http://127.0.0.1:{runner.addresses[0][1]}"\n'
    )
    try:
        async with (
            Sendtime(make_settings(flows_config(relay, delay_s=0.0))) as app,
            channel_to(app) as channel,
        ):
            await ingest(channel, identify("i1"), add_to_cart("a1"))
            delivery = await wait_for_status(channel, {SENT})
            await a_later_send_went_out(channel)  # a repeat for ada would have come by now
    finally:
        await runner.cleanup()
    recipients = [r["personalizations"][0]["to"][0]["email"] for r in received]
    assert recipients == ["ada@example.com"] * 3 + ["bea@example.com"]
    assert delivery.esp_message_id == "sg-123"
    assert delivery.relay == "sendgrid"


async def test_smtp_server_down_then_back_gets_the_email_once(make_settings: SettingsFactory) -> None:
    smtp = SmtpServer()  # not started yet
    config = flows_config(smtp_relay(smtp.port, attempts=6), delay_s=0.0)
    async with Sendtime(make_settings(config)) as app, channel_to(app) as channel:
        await ingest(channel, identify("i1"), add_to_cart("a1"))
        await wait_for_status(channel, {D.DELIVERY_STATUS_RELAYING})  # retrying against a closed port
        smtp.start()
        try:
            await wait_for_status(channel, {SENT})
            await a_later_send_went_out(channel)
            assert len(to_ada(smtp.inbox.messages)) == 1
        finally:
            smtp.stop()


class SilentAfterData(Inbox):
    """Takes the message, then never answers the end of DATA."""

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        await super().handle_DATA(server, session, envelope)
        await asyncio.sleep(3)  # past the relay's timeout
        return "250 2.0.0 Ok: queued as LATE"


async def test_no_answer_after_the_message_went_out_is_uncertain_and_never_resent(
    make_settings: SettingsFactory,
) -> None:
    smtp = SmtpServer()
    smtp.inbox = inbox = SilentAfterData()
    smtp.start()
    relay = smtp_relay(smtp.port, attempts=3) + "timeout_s = 0.3\n"
    try:
        async with (
            Sendtime(make_settings(flows_config(relay, delay_s=0.0))) as app,
            channel_to(app) as channel,
        ):
            await ingest(channel, identify("i1"), add_to_cart("a1"))
            delivery = await wait_for_status(channel, {D.DELIVERY_STATUS_UNCERTAIN})
            # Uncertain is written once the relay gave up, and is final: a retry
            # of the relay's own came before it, and the dispatcher claims only
            # scheduled sends. The inbox holds what reached the server by then.
            [again] = (
                await deliveries(channel).ListDeliveries(
                    D.ListDeliveriesRequest(user_id="ada"), metadata=DEV_AUTH
                )
            ).deliveries
    finally:
        smtp.stop()
    assert len(inbox.messages) == 1
    assert again.status == D.DELIVERY_STATUS_UNCERTAIN
    assert "may have taken it" in delivery.reason


@pytest.mark.slow
async def test_kill_9_between_scheduling_and_sending_sends_exactly_once(
    tmp_path: Path, smtp: SmtpServer
) -> None:
    config = tmp_path / "sendtime.toml"
    config.write_text(flows_config(smtp_relay(smtp.port), delay_s=1.0))
    server = await start_server(tmp_path / "data", config=config)
    async with grpc.aio.insecure_channel(server.target) as channel:
        await ingest(channel, identify("i1"), add_to_cart("a1"))
    server.kill()  # acked and scheduled, not yet due
    await server.wait()
    assert smtp.inbox.messages == []

    restarted = await start_server(tmp_path / "data", config=config)
    try:
        await asyncio.to_thread(smtp.inbox.wait_for, 1)
        async with grpc.aio.insecure_channel(restarted.target) as channel:
            sent = await wait_for_status(channel, {SENT})
    finally:
        restarted.terminate()
        await restarted.wait()
    again = await start_server(tmp_path / "data", config=config)
    await asyncio.sleep(1.0)
    again.terminate()
    await again.wait()
    assert len(smtp.inbox.messages) == 1
    assert sent.attempts == 1


async def test_one_click_unsubscribe_suppresses_the_next_marketing_send(
    make_settings: SettingsFactory, smtp: SmtpServer
) -> None:
    async with (
        Sendtime(make_settings(flows_config(smtp_relay(smtp.port), delay_s=0.0))) as app,
        channel_to(app) as channel,
        aiohttp.ClientSession() as http,
    ):
        await ingest(channel, identify("i1"), add_to_cart("a1"))
        (message,) = await asyncio.to_thread(smtp.inbox.wait_for, 1)
        link = message["List-Unsubscribe"].split(",")[0].strip("<> ")
        local = link.replace("https://mail.example.com", f"http://127.0.0.1:{app.http_port}")
        async with http.get(local) as page:  # a person's click: asks first, changes nothing
            assert page.status == 200
            assert "Unsubscribe?" in await page.text()
        async with http.post(local + "x", data=b"List-Unsubscribe=One-Click") as forged:
            assert forged.status == 403
        async with http.post(
            local,
            data=b"List-Unsubscribe=One-Click",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ) as response:
            assert response.status == 200
        await ingest(channel, add_to_cart("a2", cart="c2"))
        skipped = await wait_for_status(channel, {D.DELIVERY_STATUS_SKIPPED})
    assert skipped.reason == "suppressed for marketing"
    assert len(smtp.inbox.messages) == 1


async def test_send_email_api_is_idempotent(make_settings: SettingsFactory, smtp: SmtpServer) -> None:
    async with (
        Sendtime(make_settings(flows_config(smtp_relay(smtp.port)))) as app,
        channel_to(app) as channel,
    ):
        await ingest(channel, identify("i1"), add_to_cart("a1"))
        stub = deliveries(channel)
        request = D.SendEmailRequest(
            template_id="abandoned_cart",
            user_id="ada",
            idempotency_key="order-42-receipt",
            transactional=True,
        )
        first = await stub.SendEmail(request, metadata=DEV_AUTH)
        again = await stub.SendEmail(request, metadata=DEV_AUTH)
        assert first.delivery.id == again.delivery.id
        got = await stub.GetDelivery(
            D.GetDeliveryRequest(idempotency_key="order-42-receipt"), metadata=DEV_AUTH
        )
        assert got.delivery.id == first.delivery.id
        await asyncio.to_thread(smtp.inbox.wait_for, 2)  # the receipt and the flow's reminder
        await a_later_send_went_out(channel)  # a second receipt would have come by now
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.SendEmail(
                D.SendEmailRequest(template_id="nope", user_id="ada", idempotency_key="k"), metadata=DEV_AUTH
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    subjects = sorted(m["Subject"] for m in to_ada(smtp.inbox.messages))
    assert len(subjects) == 2
    assert first.delivery.idempotency_key == "order-42-receipt"
    # the transactional receipt carries no unsubscribe link; the flow's marketing email does
    assert sorted(m["List-Unsubscribe"] is None for m in to_ada(smtp.inbox.messages)) == [False, True]


async def test_esp_feedback_webhooks_suppress_addresses(
    make_settings: SettingsFactory, smtp: SmtpServer
) -> None:
    private_key = ec.generate_private_key(ec.SECP256R1())
    public_der = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    extra = (
        f'[delivery.feedback]\nsendgrid_public_key = "{base64.b64encode(public_der).decode()}"\n'
        'postmark_username = "pm"\npostmark_password = "secret-pm"\n'
    )
    config = flows_config(smtp_relay(smtp.port), delay_s=0.0, extra="") + extra
    async with (
        Sendtime(make_settings(config)) as app,
        channel_to(app) as channel,
        aiohttp.ClientSession() as http,
    ):
        base = f"http://127.0.0.1:{app.http_port}/v1/feedback"
        events = json.dumps([{"email": "ada@example.com", "event": "bounce", "sg_event_id": "e1"}]).encode()
        stamp = str(int(time.time()))
        signature = base64.b64encode(
            private_key.sign(stamp.encode() + events, ec.ECDSA(hashes.SHA256()))
        ).decode()
        headers = {
            "X-Twilio-Email-Event-Webhook-Signature": signature,
            "X-Twilio-Email-Event-Webhook-Timestamp": stamp,
        }
        async with http.post(f"{base}/sendgrid", data=events, headers=headers) as response:
            assert (response.status, (await response.json())["suppressed"]) == (200, 1)
        async with http.post(f"{base}/sendgrid", data=events, headers=headers) as response:
            assert (await response.json())["suppressed"] == 0, "a retried webhook adds nothing"
        async with http.post(f"{base}/sendgrid", data=events + b" ", headers=headers) as response:
            assert response.status == 403
        complaint = json.dumps({"RecordType": "SpamComplaint", "Email": "bob@example.com"}).encode()
        basic = "Basic " + base64.b64encode(b"pm:secret-pm").decode()
        async with http.post(
            f"{base}/postmark", data=complaint, headers={"Authorization": basic}
        ) as response:
            assert (await response.json())["suppressed"] == 1
        async with http.post(f"{base}/postmark", data=complaint) as response:
            assert response.status == 401

        await ingest(channel, identify("i1"), add_to_cart("a1"))
        skipped = await wait_for_status(channel, {D.DELIVERY_STATUS_SKIPPED})
    assert skipped.reason == "suppressed for marketing"
    assert smtp.inbox.messages == []


async def test_with_require_opt_in_only_users_who_opted_in_get_marketing(
    make_settings: SettingsFactory, smtp: SmtpServer
) -> None:
    config = flows_config(smtp_relay(smtp.port), delay_s=0.0, extra="require_opt_in = true")
    async with Sendtime(make_settings(config)) as app, channel_to(app) as channel:
        bob = event_pb2.Event(
            message_id="i-bob",
            user_id="bob",
            identify=event_pb2.IdentifyPayload(traits=event_pb2.Traits(email="bob@example.com")),
        )
        await ingest(channel, bob, add_to_cart("a-bob", cart="c-bob", user="bob"))
        skipped = await wait_for_status(channel, {D.DELIVERY_STATUS_SKIPPED}, user="bob")
        await ingest(channel, identify("i-ada"), add_to_cart("a-ada"))
        await wait_for_status(channel, {SENT})
    assert skipped.reason == "no opt-in to marketing (delivery.require_opt_in)"
    assert [m["To"] for m in smtp.inbox.messages] == ["Ada <ada@example.com>"]
