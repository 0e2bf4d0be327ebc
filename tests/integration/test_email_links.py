"""The links every email carries, followed as a recipient would: one-click
unsubscribe and the email preferences page, on the HTTP edge's own port
when no public address is configured. Real sendtime, real SMTP server."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
from collections.abc import Iterator
from email.message import EmailMessage

import aiohttp
import pytest

from sendtime.server.app import Sendtime
from sendtime.v1 import delivery_service_pb2 as D
from tests.conftest import DEV_AUTH, SettingsFactory
from tests.integration.smtp_server import SmtpServer
from tests.integration.test_delivery import (
    add_to_cart,
    channel_to,
    deliveries,
    identify,
    ingest,
    smtp_relay,
    wait_for_status,
)


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    server = SmtpServer()
    server.start()
    yield server
    server.stop()


def config(relay: str, *, public_base_url: str = "", delay_s: float = 0.0) -> str:
    base = f'public_base_url = "{public_base_url}"\n' if public_base_url else ""
    return f"""
[delivery]
{base}frequency_cap_count = 0
poll_interval_ms = 100

[delivery.relay]
{relay}

[[flows]]
id = "abandoned_cart"
template = "abandoned_cart"
entry_event = "Product Added"
entry_key = "cart_id"
delay_s = {delay_s}
exit_events = ["Order Completed"]
require_blocks = ["cart"]
"""


def preferences_link(message: EmailMessage) -> str:
    html = message.get_body(("html",)).get_content()  # type: ignore[union-attr]
    (link,) = set(re.findall(r'href="([^"]*/v1/preferences/[^"]+)"', html))
    text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert link in text  # the plain-text part links it too
    return str(link)


async def test_links_follow_the_http_port_when_no_public_address_is_set(
    make_settings: SettingsFactory, smtp: SmtpServer, caplog: pytest.LogCaptureFixture
) -> None:
    # port 0: the edge listens on a port only known once it binds, never 8080
    with caplog.at_level(logging.WARNING, logger="sendtime"):
        async with (
            Sendtime(make_settings(config(smtp_relay(smtp.port)))) as app,
            channel_to(app) as channel,
            aiohttp.ClientSession() as http,
        ):
            base = f"http://127.0.0.1:{app.http_port}"
            assert app.public_base_url == base
            await ingest(channel, identify("i1"), add_to_cart("a1"))
            (message,) = await asyncio.to_thread(smtp.inbox.wait_for, 1)
            unsubscribe = message["List-Unsubscribe"].split(",")[0].strip("<> ")
            assert unsubscribe.startswith(f"{base}/v1/unsubscribe/")
            preferences = preferences_link(message)
            assert preferences.startswith(f"{base}/v1/preferences/")
            for link in (unsubscribe, preferences):  # as they are in the email, unchanged
                async with http.get(link) as page:
                    assert page.status == 200, await page.text()
    # a real relay (SMTP) with links only this machine can open: said at start
    (warning,) = [r for r in caplog.records if "only this machine can open" in r.getMessage()]
    assert base in warning.getMessage()
    assert "smtp relay" in warning.getMessage()


async def test_a_send_due_at_start_links_to_the_port_the_restarted_edge_listens_on(
    make_settings: SettingsFactory, smtp: SmtpServer
) -> None:
    # planned, then the server stops before it is due: the next start finds it due at once,
    # and its links must name the new HTTP port, known only once that edge listens
    settings = make_settings(config(smtp_relay(smtp.port), delay_s=0.5))
    async with Sendtime(settings) as app, channel_to(app) as channel:
        await ingest(channel, identify("i1"), add_to_cart("a1"))
        (scheduled,) = (
            await deliveries(channel).ListDeliveries(
                D.ListDeliveriesRequest(user_id="ada"), metadata=DEV_AUTH
            )
        ).deliveries
    # down until it is due (the wait is the time left to its due time, read from the ledger)
    due = scheduled.due_time.ToDatetime(tzinfo=dt.UTC)
    await asyncio.sleep(max((due - dt.datetime.now(dt.UTC)).total_seconds(), 0) + 0.01)
    async with Sendtime(settings) as restarted:
        (message,) = await asyncio.to_thread(smtp.inbox.wait_for, 1)
        unsubscribe = message["List-Unsubscribe"].split(",")[0].strip("<> ")
        assert unsubscribe.startswith(f"http://127.0.0.1:{restarted.http_port}/v1/unsubscribe/")


async def test_no_loopback_warning_with_a_public_address_or_the_outbox(
    make_settings: SettingsFactory, smtp: SmtpServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="sendtime"):
        public = make_settings(config(smtp_relay(smtp.port), public_base_url="https://mail.example.com/"))
        async with Sendtime(public) as app:
            assert app.public_base_url == "https://mail.example.com"
        async with Sendtime(make_settings(config('kind = "outbox"\ndirectory = "outbox"'))):
            pass
    assert not [r for r in caplog.records if "only this machine can open" in r.getMessage()]


async def test_preferences_page_turns_groups_off_and_on_durably(
    make_settings: SettingsFactory, smtp: SmtpServer
) -> None:
    settings = make_settings(config(smtp_relay(smtp.port)))
    json_accept = {"Accept": "application/json"}
    async with (
        Sendtime(settings) as app,
        channel_to(app) as channel,
        aiohttp.ClientSession() as http,
    ):
        await ingest(channel, identify("i1"), add_to_cart("a1"))
        (first,) = await asyncio.to_thread(smtp.inbox.wait_for, 1)
        link = preferences_link(first)
        unsubscribe = first["List-Unsubscribe"].split(",")[0].strip("<> ")

        async with http.get(link) as page:  # what a person sees: a GET changes nothing
            body = await page.text()
            assert page.status == 200
            assert re.search(r'<input type="checkbox" name="on" value="marketing" checked>', body), body
        async with http.get(link, headers=json_accept) as page:
            assert (await page.json())["groups"] == [
                {"group": "marketing", "subscribed": True, "why_not": "", "changeable": True}
            ]

        # the form with the box unticked: marketing off
        async with http.post(link, data={"shown": "marketing"}) as saved:
            body = await saved.text()
            assert saved.status == 200, body
            assert "Saved." in body
            assert 'value="marketing" checked' not in body
        async with http.get(
            f"http://127.0.0.1:{app.http_port}/v1/profiles/ada", headers={"Authorization": "Bearer dev-key"}
        ) as profile:
            assert (await profile.json())["traits"]["consent"] == {"marketing": "CONSENT_STATE_OPTED_OUT"}
        await ingest(channel, add_to_cart("a2", cart="c2"))
        skipped = await wait_for_status(channel, {D.DELIVERY_STATUS_SKIPPED})
        assert skipped.reason == "opted out of marketing"

        # a one-click unsubscribe on top, then the page turns marketing back on:
        # both the consent and the link's suppression are lifted
        async with http.post(unsubscribe, data=b"List-Unsubscribe=One-Click") as response:
            assert response.status == 200
        async with http.post(link, data="on=marketing&shown=marketing", headers=json_accept) as saved:
            assert (await saved.json()) == {
                "saved": True,
                "groups": [{"group": "marketing", "subscribed": True, "why_not": "", "changeable": True}],
            }
        await ingest(channel, add_to_cart("a3", cart="c3"))
        await asyncio.to_thread(smtp.inbox.wait_for, 2)

        # off once more, then a restart: the choice was stored, not held in memory
        async with http.post(link, data={"shown": "marketing"}) as saved:
            assert saved.status == 200
    async with Sendtime(settings) as again, aiohttp.ClientSession() as http:
        moved = re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{again.http_port}", link)
        async with http.get(moved, headers=json_accept) as page:
            (group,) = (await page.json())["groups"]
    assert (group["subscribed"], group["why_not"]) == (False, "you turned it off")
    assert len(smtp.inbox.messages) == 2


async def test_preferences_refuses_forged_and_wrong_purpose_tokens(
    make_settings: SettingsFactory, smtp: SmtpServer
) -> None:
    async with (
        Sendtime(make_settings(config(smtp_relay(smtp.port)))) as app,
        channel_to(app) as channel,
        aiohttp.ClientSession() as http,
    ):
        await ingest(channel, identify("i1"), add_to_cart("a1"))
        (message,) = await asyncio.to_thread(smtp.inbox.wait_for, 1)
        preferences = preferences_link(message)
        unsubscribe = message["List-Unsubscribe"].split(",")[0].strip("<> ")
        base = f"http://127.0.0.1:{app.http_port}"
        preferences_token = preferences.rsplit("/", 1)[1]
        unsubscribe_token = unsubscribe.rsplit("/", 1)[1]
        # altered; an unsubscribe token as a preferences token; and the reverse
        for url in (
            preferences + "x",
            f"{base}/v1/preferences/{unsubscribe_token}",
            f"{base}/v1/unsubscribe/{preferences_token}",
        ):
            async with http.get(url) as page:
                assert page.status == 403, url
                assert "This link does not work" in await page.text()
        async with http.post(
            f"{base}/v1/preferences/{unsubscribe_token}", data={"shown": "marketing"}
        ) as post:
            assert post.status == 403
        # a group these emails do not have, and a form that names no group
        async with http.post(
            preferences, data={"shown": "sms"}, headers={"Accept": "application/json"}
        ) as wrong:
            assert wrong.status == 400
            assert "sms" in (await wrong.json())["error"]["message"]
        async with http.post(preferences, data=b"", headers={"Accept": "application/json"}) as empty:
            assert empty.status == 400
        async with http.get(preferences, headers={"Accept": "application/json"}) as page:
            assert (await page.json())["groups"][0]["subscribed"] is True  # nothing was changed
