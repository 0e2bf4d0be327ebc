"""Broadcasts on a real server with a real SMTP server (aiosmtpd) and a
manual clock: local time in three zones and a fallback, the same checks as a
flow's sends (consent, no address, suppression, frequency cap), pause, resume
and cancel, and one broadcast per idempotency key."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc.aio
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from sendtime.server.app import Sendtime
from sendtime.server.domain.broadcasts import PARKED
from sendtime.v1 import broadcast_service_pb2 as B
from sendtime.v1 import (
    broadcast_service_pb2_grpc,
    delivery_service_pb2_grpc,
    event_pb2,
    event_service_pb2,
    event_service_pb2_grpc,
)
from sendtime.v1 import delivery_service_pb2 as D
from tests.conftest import DEV_AUTH, SettingsFactory, event_stub
from tests.integration.smtp_server import SmtpServer
from tests.integration.test_delivery import smtp_relay

START = datetime(2026, 12, 4, 0, 0, tzinfo=UTC)


@dataclass
class ManualClock:
    now: datetime = START

    def __call__(self) -> datetime:
        return self.now


def config(smtp_port: int, *, cap: int = 0) -> str:
    return f"""
[delivery]
public_base_url = "https://mail.example.com"
frequency_cap_count = {cap}
poll_interval_ms = 50
[delivery.relay]
{smtp_relay(smtp_port)}
[broadcasts]
progress_interval_s = 0.05
[[segments]]
name = "english"
expression = 'traits.locale == "en"'
"""


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    server = SmtpServer()
    server.start()
    yield server
    server.stop()


@dataclass
class Stubs:
    app: Sendtime
    clock: ManualClock
    events: event_service_pb2_grpc.EventServiceAsyncStub
    broadcasts: broadcast_service_pb2_grpc.BroadcastServiceAsyncStub
    deliveries: delivery_service_pb2_grpc.DeliveryServiceAsyncStub

    async def people(self, *people: event_pb2.Event) -> None:
        answer = await self.events.IngestEvents(
            event_service_pb2.IngestEventsRequest(events=list(people)), metadata=DEV_AUTH
        )
        assert all(a.outcome == event_pb2.EVENT_OUTCOME_ACCEPTED for a in answer.acks), answer

    async def create(self, **fields: Any) -> B.Broadcast:
        made = await self.broadcasts.CreateBroadcast(
            B.CreateBroadcastRequest(broadcast=B.Broadcast(**fields)), metadata=DEV_AUTH
        )
        return made.broadcast

    async def get(self, broadcast_id: str) -> B.Broadcast:
        return (
            await self.broadcasts.GetBroadcast(B.GetBroadcastRequest(id=broadcast_id), metadata=DEV_AUTH)
        ).broadcast

    async def until(self, broadcast_id: str, done: Callable[[B.Broadcast], bool]) -> B.Broadcast:
        """Poll GetBroadcast until ``done(broadcast)`` holds (no timing asserted)."""
        for _ in range(2000):
            got = await self.get(broadcast_id)
            if done(got):
                return got
            await asyncio.sleep(0.01)
        raise AssertionError(f"never reached: {got}")


def person(
    user: str, *, locale: str = "en", timezone: str = "", email: str | None = None, opted_out: bool = False
) -> event_pb2.Event:
    consent = {
        "marketing": event_pb2.CONSENT_STATE_OPTED_OUT if opted_out else event_pb2.CONSENT_STATE_OPTED_IN
    }
    traits = event_pb2.Traits(
        email=f"{user}@example.com" if email is None else email,
        locale=locale,
        timezone=timezone,
        consent=consent,
    )
    return event_pb2.Event(
        message_id=f"who-{user}", user_id=user, identify=event_pb2.IdentifyPayload(traits=traits)
    )


async def stubs_for(settings_text: str, make_settings: SettingsFactory) -> AsyncIterator[Stubs]:
    clock = ManualClock()
    async with (
        Sendtime(make_settings(settings_text), clock=clock) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel,
    ):
        yield Stubs(
            app,
            clock,
            event_stub(channel),
            broadcast_service_pb2_grpc.BroadcastServiceStub(channel),
            delivery_service_pb2_grpc.DeliveryServiceStub(channel),
        )


@pytest.fixture
async def stubs(smtp: SmtpServer, make_settings: SettingsFactory) -> AsyncIterator[Stubs]:
    async for s in stubs_for(config(smtp.port), make_settings):
        yield s


def stamp(moment: datetime) -> Timestamp:
    value = Timestamp()
    value.FromDatetime(moment)
    return value


async def recipients(smtp: SmtpServer, count: int) -> list[str]:
    """The recipients once ``count`` emails arrived (waited for in a thread)."""
    return [str(m["To"]) for m in await asyncio.to_thread(smtp.inbox.wait_for, count)]


async def test_local_time_in_three_zones_and_a_fallback(stubs: Stubs, smtp: SmtpServer) -> None:
    await stubs.people(
        person("tokyo", timezone="Asia/Tokyo"),
        person("berlin", timezone="Europe/Berlin"),
        person("newyork", timezone="America/New_York"),
        person("nozone"),
        person("french", locale="fr", timezone="Europe/Paris"),
    )
    made = await stubs.create(
        idempotency_key="evening-sale",
        template_id="post_purchase",
        segment="english",
        local_time="2026-12-05T19:00",
        fallback_time_zone="America/Los_Angeles",
    )
    assert made.state == B.BROADCAST_STATE_SCHEDULED
    # it starts when 19:00 first comes anywhere (UTC+14): 05:00 UTC on the 5th
    stubs.clock.now = datetime(2026, 12, 5, 5, 0, tzinfo=UTC)
    stubs.app.broadcasts_runner.wake()
    planned = await stubs.until(made.id, lambda b: b.state == B.BROADCAST_STATE_SENDING)
    assert (planned.progress.audience, planned.progress.scheduled) == (4, 4)

    moments = [
        (datetime(2026, 12, 5, 10, 0, tzinfo=UTC), "tokyo"),  # 19:00 in Tokyo (UTC+9)
        (datetime(2026, 12, 5, 18, 0, tzinfo=UTC), "berlin"),  # UTC+1
        (datetime(2026, 12, 6, 0, 0, tzinfo=UTC), "newyork"),  # UTC-5
        (datetime(2026, 12, 6, 3, 0, tzinfo=UTC), "nozone"),  # the fallback, Los Angeles (UTC-8)
    ]
    for count, (moment, user) in enumerate(moments, start=1):
        stubs.clock.now = moment - timedelta(minutes=1)
        progress = (await stubs.get(made.id)).progress
        assert progress.sent == count - 1  # nobody's 19:00 came early
        stubs.clock.now = moment
        assert (await recipients(smtp, count))[-1].endswith(f"{user}@example.com")
        await stubs.until(made.id, lambda b, sent=count: b.progress.sent == sent)  # type: ignore[misc]
    done = await stubs.until(made.id, lambda b: b.state == B.BROADCAST_STATE_DONE)
    assert done.progress.sent == 4
    assert len(smtp.inbox.messages) == 4


async def test_the_checks_flows_have_hold_for_broadcasts(
    smtp: SmtpServer, make_settings: SettingsFactory
) -> None:
    async for stubs in stubs_for(config(smtp.port, cap=1), make_settings):
        await stubs.people(
            person("ok"),
            person("optedout", opted_out=True),
            person("noemail", email=""),
            person("suppressed"),
            person("capped"),
        )
        await stubs.app.storage.suppressions.suppress("u:suppressed", "marketing", "unsubscribe", "test")
        # capped already had its one marketing email today
        await stubs.deliveries.SendEmail(
            D.SendEmailRequest(template_id="post_purchase", user_id="capped", idempotency_key="earlier"),
            metadata=DEV_AUTH,
        )
        assert await recipients(smtp, 1) == ["capped@example.com"]
        made = await stubs.create(idempotency_key="checks", template_id="post_purchase", segment="english")
        done = await stubs.until(made.id, lambda b: b.state == B.BROADCAST_STATE_DONE)
        progress = done.progress
        assert (progress.audience, progress.sent) == (5, 1)
        assert dict(progress.skipped) == {"opted_out": 1, "no_email": 1, "suppressed": 1, "capped": 1}
        assert (await recipients(smtp, 2))[1].endswith("ok@example.com")
        # one broadcast per key: asking again returns the first, nothing is sent again
        again = await stubs.broadcasts.CreateBroadcast(
            B.CreateBroadcastRequest(
                broadcast=B.Broadcast(
                    idempotency_key="checks", template_id="abandoned_cart", segment="english"
                )
            ),
            metadata=DEV_AUTH,
        )
        assert not again.created
        assert (again.broadcast.id, again.broadcast.template_id) == (made.id, "post_purchase")


async def test_pause_resume_and_cancel(stubs: Stubs, smtp: SmtpServer) -> None:
    await stubs.people(*(person(f"user{i}") for i in range(6)))
    # one email a second of the manual clock: one goes now, the others wait for it
    made = await stubs.create(
        idempotency_key="paced", template_id="post_purchase", segment="english", rate_limit=1.0
    )
    assert len(await recipients(smtp, 1)) == 1
    paused = await stubs.broadcasts.PauseBroadcast(B.PauseBroadcastRequest(id=made.id), metadata=DEV_AUTH)
    assert paused.broadcast.state == B.BROADCAST_STATE_PAUSED
    # every remaining send is parked: none is due, however far the clock goes
    store = stubs.app.storage.broadcasts
    flow_id = f"broadcast:{made.id}"
    assert len(await store.parked_sends(flow_id, PARKED)) == 5
    stubs.clock.now += timedelta(hours=1)
    progress = (await stubs.get(made.id)).progress
    assert (progress.sent, progress.scheduled) == (1, 5)

    resumed = await stubs.broadcasts.ResumeBroadcast(B.ResumeBroadcastRequest(id=made.id), metadata=DEV_AUTH)
    assert resumed.broadcast.state == B.BROADCAST_STATE_SENDING
    assert await store.parked_sends(flow_id, PARKED) == []
    # paced again from the resume, one a second: due then, one and two seconds later
    stubs.clock.now += timedelta(seconds=2)
    assert len(await recipients(smtp, 4)) == 4
    cancelled = await stubs.broadcasts.CancelBroadcast(
        B.CancelBroadcastRequest(id=made.id), metadata=DEV_AUTH
    )
    assert cancelled.broadcast.state == B.BROADCAST_STATE_CANCELLED
    stubs.clock.now += timedelta(hours=1)
    final = await stubs.until(made.id, lambda b: b.progress.in_flight == 0)
    assert (final.progress.sent, final.progress.cancelled) == (4, 2)
    assert len(smtp.inbox.messages) == final.progress.sent
    # a cancelled broadcast cannot be resumed
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stubs.broadcasts.ResumeBroadcast(B.ResumeBroadcastRequest(id=made.id), metadata=DEV_AUTH)
    assert "cancelled" in (refused.value.details() or "")


async def test_bad_broadcasts_are_refused_naming_the_field(stubs: Stubs) -> None:
    cases = [
        ({"template_id": "post_purchase", "segment": "english"}, "idempotency_key"),
        ({"idempotency_key": "k", "template_id": "nope", "segment": "english"}, "nope"),
        ({"idempotency_key": "k", "template_id": "post_purchase", "segment": "nobody"}, "nobody"),
        ({"idempotency_key": "k", "template_id": "post_purchase", "expression": "order_count >"}, "column"),
        (
            {
                "idempotency_key": "k",
                "template_id": "post_purchase",
                "segment": "english",
                "local_time": "7pm",
            },
            "local_time",
        ),
        (
            {
                "idempotency_key": "k",
                "template_id": "post_purchase",
                "segment": "english",
                "local_time": "2026-12-05T19:00",
                "fallback_time_zone": "Mars/Olympus",
            },
            "fallback_time_zone",
        ),
    ]
    for fields, says in cases:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stubs.create(**fields)
        assert says in (refused.value.details() or ""), fields
