"""The async client against a real sendtime on 127.0.0.1 port 0: unary calls,
typed errors from the google.rpc.Status details, and the event stream's
batching, backpressure and reconnect-and-resend."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import trustme

from sendtime.client import (
    Ack,
    AsyncClient,
    Cancelled,
    InvalidArgument,
    NotFound,
    Outcome,
    PermissionDenied,
    RetryPolicy,
    Unauthenticated,
    Unavailable,
    track_event,
)
from sendtime.server.app import Sendtime
from sendtime.server.settings import hash_key
from sendtime.v1 import event_pb2
from tests.conftest import SettingsFactory


def target(app: Sendtime) -> str:
    return f"127.0.0.1:{app.grpc_port}"


@pytest.fixture
async def client(server: Sendtime) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(target(server), "dev-key") as client:
        yield client


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A loopback port that is bound but never listens: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def viewed(i: int, users: int = 10) -> event_pb2.Event:
    return track_event("Product Viewed", {"product_id": f"p{i}", "price": 1.5}, user_id=f"u{i % users}")


async def total_events(client: AsyncClient, users: int = 10) -> int:
    return sum([(await client.get_profile(f"u{u}")).event_count for u in range(users)])


# --------------------------------------------------------------------- unary


async def test_identify_track_and_read_the_profile(client: AsyncClient) -> None:
    ack = await client.identify(
        "u1",
        email="ada@example.com",
        first_name="Ada",
        last_name="Lovelace",
        locale="en-GB",
        timezone="Europe/London",
        consent={"marketing": True, "sms": False},
        traits={"plan": "pro"},
    )
    assert ack.outcome is Outcome.ACCEPTED
    cart_line = {"product_id": "p1", "cart_id": "c1", "name": "Socks", "price": 9.5, "quantity": 2}
    await client.track("Product Added", {**cart_line, "currency": "EUR"}, user_id="u1")
    await client.track("Product Viewed", {"product_id": "p2", "name": "Hat"}, user_id="u1")

    profile = await client.get_profile("u1")

    assert profile.user_id == "u1"
    assert (profile.traits.email, profile.traits.first_name, profile.traits.last_name) == (
        "ada@example.com",
        "Ada",
        "Lovelace",
    )
    assert (profile.traits.locale, profile.traits.timezone) == ("en-GB", "Europe/London")
    assert dict(profile.traits.consent) == {
        "marketing": event_pb2.CONSENT_STATE_OPTED_IN,
        "sms": event_pb2.CONSENT_STATE_OPTED_OUT,
    }
    assert json.loads(profile.extra_traits_json) == {"plan": "pro"}
    (cart,) = profile.carts
    assert cart.cart_id == "c1"
    assert [(line.product_id, line.quantity, line.price) for line in cart.lines] == [("p1", 2, 9.5)]
    assert profile.recently_viewed[0].product_id == "p2"
    assert profile.event_count == 3


async def test_anonymous_visitor_has_a_profile(client: AsyncClient) -> None:
    await client.track("Product Viewed", {"product_id": "p9"}, anonymous_id="anon-1")
    profile = await client.get_profile(anonymous_id="anon-1")
    assert profile.anonymous_id == "anon-1"
    assert [v.product_id for v in profile.recently_viewed] == ["p9"]


async def test_the_same_message_id_is_a_duplicate(client: AsyncClient) -> None:
    first = await client.track("Signed Up", user_id="u1", message_id="signup-u1")
    again = await client.track("Signed Up", user_id="u1", message_id="signup-u1")
    assert (first, again) == (
        Ack("signup-u1", Outcome.ACCEPTED),
        Ack("signup-u1", Outcome.DUPLICATE),
    )
    assert (await client.get_profile("u1")).event_count == 1


async def test_a_rejected_event_raises_invalid_argument_naming_the_field(client: AsyncClient) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await client.track("Product Added", {"product_id": "p1", "price": -3}, user_id="u1")
    error = caught.value
    assert [v.field for v in error.field_violations] == ["event.track.properties_json.price"]
    assert error.field_violations[0].description
    assert error.reason
    assert "price" in str(error)
    with pytest.raises(NotFound):
        await client.get_profile("u1")  # nothing was half-applied


async def test_an_event_without_identity_is_rejected(client: AsyncClient) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await client.track("Signed Up")
    assert caught.value.field_violations
    assert any("user_id" in v.field for v in caught.value.field_violations)


async def test_a_batch_rejects_the_bad_event_and_keeps_the_good(client: AsyncClient) -> None:
    good = track_event("Product Viewed", {"product_id": "p1"}, user_id="u1")
    bad = track_event("Product Added", {"product_id": "p2", "quantity": "two"}, user_id="u1")
    acks = await client.ingest([good, bad])
    assert [ack.outcome for ack in acks] == [Outcome.ACCEPTED, Outcome.REJECTED]
    assert acks[1].message_id == bad.message_id
    assert [v.field for v in acks[1].field_violations] == ["track.properties_json.quantity"]
    assert acks[1].reason
    assert (await client.get_profile("u1")).event_count == 1


async def test_an_unknown_user_is_not_found(client: AsyncClient) -> None:
    with pytest.raises(NotFound) as caught:
        await client.get_profile("nobody")
    assert "nobody" in caught.value.message


async def test_asking_for_two_identities_is_invalid(client: AsyncClient) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await client.get_profile("u1", anonymous_id="a1")
    assert [v.field for v in caught.value.field_violations] == ["user_id"]


async def test_an_unknown_key_is_unauthenticated(server: Sendtime) -> None:
    async with AsyncClient(target(server), "not-a-key") as client:
        with pytest.raises(Unauthenticated) as caught:
            await client.track("Signed Up", user_id="u1")
        assert caught.value.reason == "UNAUTHENTICATED"
        stream = client.stream()
        ack = await stream.send(viewed(1))
        with pytest.raises(Unauthenticated):
            await stream.flush()
        with pytest.raises(Unauthenticated):
            await ack
        with pytest.raises(Unauthenticated):
            await stream.send(viewed(2))


async def test_a_key_without_the_scope_is_permission_denied(make_settings: SettingsFactory) -> None:
    config = (
        "[auth]\ndev_key = false\n[[auth.keys]]\n"
        f'name = "ingester"\nhash = "{hash_key("ingest-key")}"\nscopes = ["ingest"]\n'
    )
    async with Sendtime(make_settings(config)) as app, AsyncClient(target(app), "ingest-key") as client:
        assert (await client.track("Signed Up", user_id="u1")).outcome is Outcome.ACCEPTED
        with pytest.raises(PermissionDenied) as caught:
            await client.get_profile("u1")
        assert "content" in caught.value.message


async def test_tls_with_given_credentials(tmp_path: Path, make_settings: SettingsFactory) -> None:
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "server.pem", tmp_path / "server.key"
    certificate.cert_chain_pems[0].write_to_path(str(cert_file))
    certificate.private_key_pem.write_to_path(str(key_file))
    config = f'[grpc.tls]\ncert_file = "{cert_file}"\nkey_file = "{key_file}"\n'
    credentials = grpc.ssl_channel_credentials(root_certificates=authority.cert_pem.bytes())
    async with (
        Sendtime(make_settings(config)) as app,
        AsyncClient(target(app), "dev-key", tls=credentials) as client,
    ):
        assert (await client.track("Signed Up", user_id="u1")).outcome is Outcome.ACCEPTED
        async with client.stream() as stream:
            ack = await stream.send(viewed(1))
        assert (await ack).outcome is Outcome.ACCEPTED
        async with AsyncClient(target(app), "dev-key", default_timeout=1) as plaintext:
            with pytest.raises(Unavailable):
                await plaintext.get_profile("u1")


@pytest.mark.slow  # timing: retries against the clock
async def test_unavailable_is_retried_until_the_deadline(refusing_port: int) -> None:
    retry = RetryPolicy(initial_backoff=0.02, max_backoff=0.1)
    async with AsyncClient(f"127.0.0.1:{refusing_port}", "dev-key", retry=retry) as client:
        started = time.monotonic()
        with pytest.raises(Unavailable):
            await client.track("Signed Up", user_id="u1", timeout=0.6)
        elapsed = time.monotonic() - started
    assert 0.3 < elapsed < 2.0, elapsed


@pytest.mark.slow  # timing: retries against the clock
async def test_a_retry_reaches_a_server_that_comes_up(make_settings: SettingsFactory) -> None:
    with socket.socket() as sock:  # find a free port, then let the server take it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with AsyncClient(f"127.0.0.1:{port}", "dev-key", default_timeout=10) as client:
        call = asyncio.create_task(client.track("Signed Up", user_id="u1"))
        await asyncio.sleep(0.5)
        assert not call.done()
        async with Sendtime(make_settings(grpc__port=str(port))):
            assert (await call).outcome is Outcome.ACCEPTED


# -------------------------------------------------------------------- stream


async def test_stream_acks_5000_events_exactly_once_and_resends_as_duplicates(client: AsyncClient) -> None:
    events = [viewed(i) for i in range(5000)]
    resolved: Counter[str] = Counter()

    async with client.stream(max_in_flight=1000, batch_size=200) as stream:
        futures = [await stream.send(event) for event in events]
        for future in futures:
            future.add_done_callback(lambda f: resolved.update([f.result().message_id]))
        await stream.flush()
        assert stream.in_flight == 0
    await asyncio.sleep(0)  # let the done callbacks run

    acks = [future.result() for future in futures]
    assert [ack.message_id for ack in acks] == [event.message_id for event in events]
    assert {ack.outcome for ack in acks} == {Outcome.ACCEPTED}
    assert len(resolved) == 5000
    assert set(resolved.values()) == {1}
    assert await total_events(client) == 5000

    async with client.stream() as stream:
        again = [await stream.send(event) for event in events]
    assert {future.result().outcome for future in again} == {Outcome.DUPLICATE}
    assert await total_events(client) == 5000


async def test_stream_reports_a_rejected_event_and_keeps_going(client: AsyncClient) -> None:
    async with client.stream() as stream:
        good = await stream.send(viewed(1))
        bad = await stream.send(track_event("Product Added", {"price": "free"}, user_id="u1"))
        after = await stream.send(viewed(2))
    assert (await good).outcome is Outcome.ACCEPTED
    rejected = await bad
    assert rejected.outcome is Outcome.REJECTED
    assert [v.field for v in rejected.field_violations] == ["track.properties_json.price"]
    assert (await after).outcome is Outcome.ACCEPTED


async def test_a_closed_stream_refuses_more_events(client: AsyncClient) -> None:
    stream = client.stream()
    ack = await stream.send(viewed(1))
    await stream.close()
    assert (await ack).outcome is Outcome.ACCEPTED
    with pytest.raises(RuntimeError, match="closed"):
        await stream.send(viewed(2))
    aborted = client.stream()
    await aborted.abort()
    await aborted.close()  # nothing left to do
    with pytest.raises(RuntimeError, match="closed"):
        await aborted.send(viewed(3))


async def test_stream_never_has_more_than_max_in_flight_unacked(client: AsyncClient) -> None:
    most = 0
    async with client.stream(max_in_flight=64, batch_size=16) as stream:
        for i in range(3000):
            await stream.send(viewed(i))
            most = max(most, stream.in_flight)
    assert most == 64  # reached, never passed
    assert await total_events(client) == 3000


async def test_send_blocks_while_max_in_flight_events_are_unacked(refusing_port: int) -> None:
    async with AsyncClient(f"127.0.0.1:{refusing_port}", "dev-key") as client:
        stream = client.stream(max_in_flight=10, reconnect_timeout=None)
        futures = [await stream.send(viewed(i)) for i in range(10)]
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(stream.send(viewed(10)), 0.5)
        assert stream.in_flight == 10
        await stream.abort()
    for future in futures:
        with pytest.raises(Cancelled):
            future.result()


async def test_stream_gives_up_after_its_reconnect_timeout(refusing_port: int) -> None:
    async with AsyncClient(f"127.0.0.1:{refusing_port}", "dev-key") as client:
        stream = client.stream(
            reconnect_timeout=0.5, retry=RetryPolicy(initial_backoff=0.05, max_backoff=0.1)
        )
        ack = await stream.send(viewed(1))
        with pytest.raises(Unavailable):
            await stream.close()
    with pytest.raises(Unavailable):
        await ack


@pytest.mark.slow  # timing: retries against the clock
async def test_stream_reconnects_to_a_restarted_server_and_every_event_is_acked(
    make_settings: SettingsFactory,
) -> None:
    first = Sendtime(make_settings())
    await first.start()
    port = first.grpc_port
    events = [viewed(i) for i in range(4000)]
    second: Sendtime | None = None
    try:
        async with AsyncClient(f"127.0.0.1:{port}", "dev-key") as client:
            stream = client.stream(max_in_flight=500, batch_size=50)

            sent: list[asyncio.Future[Ack]] = []

            async def produce() -> list[asyncio.Future[Ack]]:
                for event in events:  # one by one, so the test sees acks arrive meanwhile
                    sent.append(await stream.send(event))  # noqa: PERF401
                return sent

            producer = asyncio.create_task(produce())
            while sum(future.done() for future in sent) < 500:  # mid-stream, acks flowing
                await asyncio.sleep(0.01)
            await first.stop()  # mid-stream: acks what it read, then ends the stream UNAVAILABLE
            assert not producer.done()
            await asyncio.sleep(0.5)  # meanwhile the client's reconnects are refused
            # the same data dir (make_settings' tmp_path) and the same port
            second = Sendtime(make_settings(grpc__port=str(port)))
            await second.start()

            futures = await asyncio.wait_for(producer, 30)
            await asyncio.wait_for(stream.close(), 30)

            assert stream.reconnects >= 1
            acks = [future.result() for future in futures]
            assert [ack.message_id for ack in acks] == [event.message_id for event in events]
            assert {ack.outcome for ack in acks} <= {Outcome.ACCEPTED, Outcome.DUPLICATE}
            assert Outcome.ACCEPTED in {ack.outcome for ack in acks}
            assert await total_events(client) == len(events)  # none lost, none applied twice
    finally:
        if second is not None:
            await second.stop()
