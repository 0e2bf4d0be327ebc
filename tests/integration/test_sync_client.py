"""The blocking client against a real sendtime. The server runs on the test's
event loop, so each blocking call runs in a worker thread meanwhile."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator

import pytest

from sendtime.client import (
    Ack,
    Client,
    InvalidArgument,
    NotFound,
    Outcome,
    RetryPolicy,
    Unauthenticated,
    Unavailable,
    identify_event,
    track_event,
)
from sendtime.server.app import Sendtime
from sendtime.v1 import event_pb2


@pytest.fixture
def client(server: Sendtime) -> Iterator[Client]:
    with Client(f"127.0.0.1:{server.grpc_port}", "dev-key") as client:
        yield client


async def test_track_identify_and_profile(client: Client) -> None:
    ack = await asyncio.to_thread(
        client.identify, "u1", email="grace@example.com", consent={"marketing": False}, traits={"vip": True}
    )
    assert ack.outcome is Outcome.ACCEPTED
    await asyncio.to_thread(
        client.track, "Product Viewed", {"product_id": "p1", "name": "Mug"}, user_id="u1", message_id="v1"
    )
    again = await asyncio.to_thread(
        client.track, "Product Viewed", {"product_id": "p1"}, user_id="u1", message_id="v1"
    )
    assert again == Ack("v1", Outcome.DUPLICATE)

    profile = await asyncio.to_thread(client.get_profile, "u1")

    assert profile.traits.email == "grace@example.com"
    assert dict(profile.traits.consent) == {"marketing": event_pb2.CONSENT_STATE_OPTED_OUT}
    assert json.loads(profile.extra_traits_json) == {"vip": True}
    assert [(v.product_id, v.name) for v in profile.recently_viewed] == [("p1", "Mug")]
    assert profile.event_count == 2


async def test_ingest_a_batch(client: Client) -> None:
    events = [
        identify_event(anonymous_id="a1", email="a1@example.com"),
        track_event("Product Viewed", {"product_id": "p1"}, anonymous_id="a1"),
        track_event("Order Completed", {"total": 3}, anonymous_id="a1"),  # order_id is required
    ]
    acks = await asyncio.to_thread(client.ingest, events)
    assert [a.outcome for a in acks] == [Outcome.ACCEPTED, Outcome.ACCEPTED, Outcome.REJECTED]
    assert [v.field for v in acks[2].field_violations] == ["track.properties_json.order_id"]
    profile = await asyncio.to_thread(client.get_profile, anonymous_id="a1")
    assert profile.event_count == 2


async def test_errors_are_typed(server: Sendtime, client: Client) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await asyncio.to_thread(client.track, "Product Added", {"quantity": -1}, user_id="u1")
    assert [v.field for v in caught.value.field_violations] == ["event.track.properties_json.quantity"]
    with pytest.raises(NotFound):
        await asyncio.to_thread(client.get_profile, "u1")
    with Client(f"127.0.0.1:{server.grpc_port}", "wrong-key") as stranger, pytest.raises(Unauthenticated):
        await asyncio.to_thread(stranger.track, "Signed Up", user_id="u1")


@pytest.mark.slow  # timing: retries against the clock
def test_unavailable_is_retried_until_the_deadline() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = sock.getsockname()[1]
        retry = RetryPolicy(initial_backoff=0.02, max_backoff=0.1)
        with Client(f"127.0.0.1:{port}", "dev-key", default_timeout=0.6, retry=retry) as client:
            started = time.monotonic()
            with pytest.raises(Unavailable):
                client.get_profile("u1")
            elapsed = time.monotonic() - started
    assert 0.3 < elapsed < 2.0, elapsed
