"""The gRPC intake under hostile and broken input (issue 16 items 1-3, issue 15
item 6): a stream message too large to ack, a client that resets the stream,
bytes that are not protobuf, and one bad event among good ones. Each against a
real server; the crash tests run it as a child process, since a crash there
must fail the test rather than end the test run."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterable, AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sendtime.server.edge.grpc_decode import UNDECODABLE
from sendtime.v1 import event_pb2, event_service_pb2, event_service_pb2_grpc, profile_service_pb2
from tests.conftest import DEV_AUTH, event_stub, profile_stub
from tests.integration.server_process import ServerProcess, start_server
from tests.integration.test_grpc_ingest import details, track

INGEST_EVENT = "/sendtime.v1.EventService/IngestEvent"
INGEST_EVENTS = "/sendtime.v1.EventService/IngestEvents"
STREAM_EVENTS = "/sendtime.v1.EventService/StreamEvents"


@pytest.fixture
async def child(tmp_path: Path) -> AsyncIterator[ServerProcess]:
    server = await start_server(tmp_path / "data")
    try:
        yield server
    finally:
        if server.process.returncode is None:
            server.terminate()
        await server.wait()


async def acks_until_error(
    call: AsyncIterable[Any], decode: Callable[[Any], event_service_pb2.StreamEventsResponse] = lambda r: r
) -> tuple[list[event_pb2.EventAck], grpc.aio.AioRpcError]:
    """The acks a stream sent before it ended with an error, and the error."""
    acks: list[event_pb2.EventAck] = []
    try:
        async for response in call:
            acks.extend(decode(response).acks)
    except grpc.aio.AioRpcError as error:
        return acks, error
    raise AssertionError("the stream ended without an error")


async def assert_serving(server: ServerProcess, message_id: str) -> None:
    """The process is alive, says SERVING, and stores an event."""
    assert server.process.returncode is None, f"the server died with {server.process.returncode}"
    async with grpc.aio.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        ack = await event_stub(channel).IngestEvent(
            event_service_pb2.IngestEventRequest(event=track(message_id, "Custom", {})),
            metadata=DEV_AUTH,
            timeout=5,
        )
        assert ack.ack.outcome == event_pb2.EVENT_OUTCOME_ACCEPTED


@pytest.mark.slow
async def test_a_stream_message_over_the_event_limit_is_refused_and_the_server_lives(
    child: ServerProcess,
) -> None:
    """The probe's message: 250,000 events, 6.1 MB, from a client with grpcio's
    default 4 MiB receive limit. Its ack (4.6 MB) used to reset the stream and
    the server died of SIGSEGV; the message now breaks the per-message limit."""
    message = event_service_pb2.StreamEventsRequest(
        events=[
            event_pb2.Event(
                message_id=f"msg-{i:08d}",
                user_id=f"u{i % 100}",
                track=event_pb2.TrackPayload(name="X", properties_json=b"{}"),
            )
            for i in range(250_000)
        ]
    )
    assert message.ByteSize() > 6_000_000
    first = event_service_pb2.StreamEventsRequest(events=[track("before-the-big-one", "Custom", {})])
    async with grpc.aio.insecure_channel(child.target) as channel:
        call = event_stub(channel).StreamEvents(None, metadata=DEV_AUTH)
        await call.write(first)
        await call.write(message)
        acks, error = await acks_until_error(call)
    assert [a.message_id for a in acks] == ["before-the-big-one"], "the messages before it are acked"
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error.details()
    info, violations = details(error)
    assert info.reason == "TOO_MANY_EVENTS"
    assert violations == [("events", "holds 250000 events; the limit is 2500 in one message")]
    await assert_serving(child, "after-the-big-one")


@pytest.mark.slow
async def test_a_client_resetting_the_stream_does_not_crash_the_server(child: ServerProcess) -> None:
    """Within the per-message limit, an ack can still exceed what a client takes
    (rejected events echo their message ids): the client resets the stream. The
    server used to read the call's peer after that, from freed memory: SIGSEGV
    on the first reset."""
    async with grpc.aio.insecure_channel(
        child.target, options=[("grpc.max_receive_message_length", 1024 * 1024)]
    ) as channel:
        for attempt in range(3):
            message = event_service_pb2.StreamEventsRequest(
                events=[
                    track(f"reset-{attempt}-{i:05d}".ljust(1500, "x"), "Custom", {}, user=f"u{i}")
                    for i in range(2500)
                ]
            )
            call = event_stub(channel).StreamEvents(None, metadata=DEV_AUTH)
            await call.write(message)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in call:
                    pass
            assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
            await asyncio.sleep(0.3)  # what the server does after the reset
            await assert_serving(child, f"after-reset-{attempt}")


def _raw(channel: grpc.aio.Channel, method: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    return channel.unary_unary(method, None, None)


async def test_garbage_bytes_are_invalid_argument_with_the_reason(channel: grpc.aio.Channel) -> None:
    for method in (INGEST_EVENT, INGEST_EVENTS):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _raw(channel, method)(b"\xff\xff\xff\xff", metadata=DEV_AUTH)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT, (method, caught.value.details())
        info, _ = details(caught.value)
        assert info.reason == UNDECODABLE
    stream = channel.stream_stream(STREAM_EVENTS, None, None)(None, metadata=DEV_AUTH)
    good = event_service_pb2.StreamEventsRequest(events=[track("s-good", "Custom", {})]).SerializeToString()
    await stream.write(good)
    await stream.write(b"\x0a\xff\xff")  # an events field longer than the message
    acks, error = await acks_until_error(stream, event_service_pb2.StreamEventsResponse.FromString)
    assert [a.message_id for a in acks] == ["s-good"]
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert details(error)[0].reason == UNDECODABLE


def _far_timestamp() -> Timestamp:
    return Timestamp(seconds=2**62)  # beyond year 9999: not a datetime at all


async def test_one_bad_event_in_a_batch_is_rejected_alone(channel: grpc.aio.Channel) -> None:
    """Each bad event is rejected in its place, naming its field; the good ones
    are stored. This call used to fail whole with UNKNOWN."""
    year_9999 = Timestamp()
    year_9999.FromJsonString("9999-12-31T23:59:00Z")
    year_0001 = Timestamp()
    year_0001.FromJsonString("0001-01-01T00:00:00Z")
    deep = ("[" * 5000 + "]" * 5000).encode()
    cart: dict[str, object] = {"cart_id": "c1", "product_id": "p1"}
    batch = [
        track("good-1", "Product Added", cart, user="ada"),
        event_pb2.Event(
            message_id="far", user_id="u", timestamp=_far_timestamp(), track=event_pb2.TrackPayload(name="X")
        ),
        event_pb2.Event(
            message_id="deep", user_id="u", track=event_pb2.TrackPayload(name="X", properties_json=deep)
        ),
        event_pb2.Event(
            message_id="deep-traits",
            user_id="u",
            identify=event_pb2.IdentifyPayload(extra_traits_json=b'{"a":' + b"[" * 40 + b"]" * 40 + b"}"),
        ),
        event_pb2.Event(
            message_id="BADUTF8", user_id="u", track=event_pb2.TrackPayload(name="X", properties_json=b"{}")
        ),
        event_pb2.Event(
            message_id="y9999",
            user_id="u",
            timestamp=year_9999,
            track=event_pb2.TrackPayload(name="Product Added", properties_json=json.dumps(cart).encode()),
        ),
        event_pb2.Event(
            message_id="y0001", user_id="u", timestamp=year_0001, track=event_pb2.TrackPayload(name="X")
        ),
        track("nul", "Custom", {}, user="a\x00b"),
        track("price", "Product Added", {**cart, "price": 2**200}),
        track("utf8-in-properties", "Product Added", {**cart, "note": "PLACEHOLDER"}),
        track("good-2", "Custom", {}, user="bob"),
    ]
    body = event_service_pb2.IngestEventsRequest(events=batch).SerializeToString()
    # what a client in another language can send: a string field that is not UTF-8
    body = body.replace(b"BADUTF8", b"BAD\xff\xfe88").replace(b"PLACEHOLDER", b"PLACE\xffOLDER")
    response = event_service_pb2.IngestEventsResponse.FromString(
        await _raw(channel, INGEST_EVENTS)(body, metadata=DEV_AUTH)
    )
    outcomes = {a.index: (a.outcome, [v.field for v in a.field_violations]) for a in response.acks}
    rejected = event_pb2.EVENT_OUTCOME_REJECTED
    assert outcomes == {
        0: (event_pb2.EVENT_OUTCOME_ACCEPTED, []),
        1: (rejected, ["timestamp"]),
        2: (rejected, ["track.properties_json"]),
        3: (rejected, ["identify.extra_traits_json"]),
        4: (rejected, ["event"]),
        5: (rejected, ["timestamp"]),
        6: (rejected, ["timestamp"]),
        7: (rejected, ["user_id"]),
        8: (rejected, ["track.properties_json.price"]),
        9: (rejected, ["track.properties_json"]),
        10: (event_pb2.EVENT_OUTCOME_ACCEPTED, []),
    }
    reasons = {a.index: a.reason for a in response.acks}
    assert all("32 levels" in reasons[i] for i in (2, 3))
    assert all("UTF-8" in reasons[i] for i in (4, 9))
    assert "ahead of the server's clock" in reasons[5]
    assert "before the server's clock" in reasons[6]
    assert "control character" in reasons[7]
    profiles = profile_stub(channel)
    ada = await profiles.GetProfile(profile_service_pb2.GetProfileRequest(user_id="ada"), metadata=DEV_AUTH)
    assert [line.product_id for cart in ada.profile.carts for line in cart.lines] == ["p1"]
    bob = await profiles.GetProfile(profile_service_pb2.GetProfileRequest(user_id="bob"), metadata=DEV_AUTH)
    assert bob.profile.event_count == 1


async def test_a_single_bad_event_names_its_field(
    events: event_service_pb2_grpc.EventServiceAsyncStub,
) -> None:
    cases = [
        (track("nul-id", "Custom", {}, user="a\x00b"), "event.user_id"),
        (
            track("price", "Product Added", {"cart_id": "c", "product_id": "p", "price": 1e13}),
            "event.track.properties_json.price",
        ),
        (
            track("qty", "Product Added", {"cart_id": "c", "product_id": "p", "quantity": 10**7}),
            "event.track.properties_json.quantity",
        ),
        (
            event_pb2.Event(
                message_id="far",
                user_id="u",
                timestamp=_far_timestamp(),
                track=event_pb2.TrackPayload(name="X"),
            ),
            "event.timestamp",
        ),
    ]
    for event, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await events.IngestEvent(event_service_pb2.IngestEventRequest(event=event), metadata=DEV_AUTH)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        assert [f for f, _ in details(caught.value)[1]] == [field]
