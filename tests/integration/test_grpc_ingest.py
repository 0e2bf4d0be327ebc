"""gRPC ingestion against a real server on 127.0.0.1:0: unary, batch, stream,
error details, auth scopes, health and reflection."""

from __future__ import annotations

import json

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from sendtime.server.app import Sendtime
from sendtime.server.settings import hash_key
from sendtime.v1 import (
    event_pb2,
    event_service_pb2,
    event_service_pb2_grpc,
    profile_service_pb2,
    profile_service_pb2_grpc,
)
from tests.conftest import DEV_AUTH, SettingsFactory, event_stub, profile_stub


def track(message_id: str, name: str, properties: dict[str, object], user: str = "u1") -> event_pb2.Event:
    return event_pb2.Event(
        message_id=message_id,
        user_id=user,
        track=event_pb2.TrackPayload(name=name, properties_json=json.dumps(properties).encode()),
    )


def details(error: grpc.aio.AioRpcError) -> tuple[error_details_pb2.ErrorInfo, list[tuple[str, str]]]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "the error carries google.rpc.Status details"
    info = error_details_pb2.ErrorInfo()
    bad = error_details_pb2.BadRequest()
    for detail in status.details:
        if detail.Is(info.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(bad.DESCRIPTOR):
            detail.Unpack(bad)
    return info, [(v.field, v.description) for v in bad.field_violations]


async def test_unary_accept_then_duplicate(
    events: event_service_pb2_grpc.EventServiceAsyncStub,
    profiles: profile_service_pb2_grpc.ProfileServiceAsyncStub,
) -> None:
    event = track("m-1", "Product Added", {"cart_id": "c", "product_id": "p1", "price": 4.5, "quantity": 2})
    first = await events.IngestEvent(event_service_pb2.IngestEventRequest(event=event), metadata=DEV_AUTH)
    again = await events.IngestEvent(event_service_pb2.IngestEventRequest(event=event), metadata=DEV_AUTH)
    assert first.ack.outcome == event_pb2.EVENT_OUTCOME_ACCEPTED
    assert again.ack.outcome == event_pb2.EVENT_OUTCOME_DUPLICATE
    got = await profiles.GetProfile(profile_service_pb2.GetProfileRequest(user_id="u1"), metadata=DEV_AUTH)
    (cart,) = got.profile.carts
    assert [(line.product_id, line.quantity, line.price) for line in cart.lines] == [("p1", 2, 4.5)]
    assert got.profile.event_count == 1, "the duplicate was applied nowhere"


async def test_unary_rejection_names_the_field(events: event_service_pb2_grpc.EventServiceAsyncStub) -> None:
    event = track("m-2", "Order Completed", {"order_id": "o", "products": [{"price": "free"}]})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await events.IngestEvent(event_service_pb2.IngestEventRequest(event=event), metadata=DEV_AUTH)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, violations = details(caught.value)
    assert info.reason == "INVALID_EVENT"
    assert info.domain == "sendtime.v1"
    assert [field for field, _ in violations] == ["event.track.properties_json.products[0].price"]


async def test_an_alias_is_accepted_and_one_without_previous_id_is_refused_naming_it(
    events: event_service_pb2_grpc.EventServiceAsyncStub,
) -> None:
    alias = event_pb2.Event(
        message_id="al-1", user_id="ada", alias=event_pb2.AliasPayload(previous_id="anon-1")
    )
    answer = await events.IngestEvent(event_service_pb2.IngestEventRequest(event=alias), metadata=DEV_AUTH)
    assert answer.ack.outcome == event_pb2.EVENT_OUTCOME_ACCEPTED
    empty = event_pb2.Event(message_id="al-2", user_id="ada", alias=event_pb2.AliasPayload())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await events.IngestEvent(event_service_pb2.IngestEventRequest(event=empty), metadata=DEV_AUTH)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, violations = details(caught.value)
    assert [field for field, _ in violations] == ["event.alias.previous_id"]


async def test_batch_keeps_the_good_and_rejects_the_bad(
    events: event_service_pb2_grpc.EventServiceAsyncStub,
    profiles: profile_service_pb2_grpc.ProfileServiceAsyncStub,
) -> None:
    batch = [
        track("b-1", "Product Viewed", {"product_id": "p1"}),
        track("b-2", "Product Added", {"price": 3}),  # no product
        event_pb2.Event(message_id="b-3", user_id="u1"),  # neither track nor identify
        event_pb2.Event(
            message_id="b-4",
            user_id="u1",
            identify=event_pb2.IdentifyPayload(
                traits=event_pb2.Traits(
                    email="ada@example.com", consent={"marketing": event_pb2.CONSENT_STATE_OPTED_IN}
                )
            ),
        ),
        track("b-1", "Product Viewed", {"product_id": "p1"}),  # repeated inside the batch
    ]
    response = await events.IngestEvents(
        event_service_pb2.IngestEventsRequest(events=batch), metadata=DEV_AUTH
    )
    outcomes = [(a.index, a.message_id, a.outcome) for a in response.acks]
    assert outcomes == [
        (0, "b-1", event_pb2.EVENT_OUTCOME_ACCEPTED),
        (1, "b-2", event_pb2.EVENT_OUTCOME_REJECTED),
        (2, "b-3", event_pb2.EVENT_OUTCOME_REJECTED),
        (3, "b-4", event_pb2.EVENT_OUTCOME_ACCEPTED),
        (4, "b-1", event_pb2.EVENT_OUTCOME_DUPLICATE),
    ]
    assert [v.field for v in response.acks[1].field_violations] == ["track.properties_json.product_id"]
    assert [v.field for v in response.acks[2].field_violations] == ["kind"]
    got = await profiles.GetProfile(profile_service_pb2.GetProfileRequest(user_id="u1"), metadata=DEV_AUTH)
    assert got.profile.traits.email == "ada@example.com"
    assert got.profile.traits.consent["marketing"] == event_pb2.CONSENT_STATE_OPTED_IN
    assert [v.product_id for v in got.profile.recently_viewed] == ["p1"]


async def test_batch_over_the_limit_is_refused_whole(
    events: event_service_pb2_grpc.EventServiceAsyncStub,
) -> None:
    batch = [track(f"x-{i}", "Custom", {}) for i in range(2501)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await events.IngestEvents(event_service_pb2.IngestEventsRequest(events=batch), metadata=DEV_AUTH)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(caught.value)[1][0][0] == "events"


async def test_stream_acks_every_event_once(events: event_service_pb2_grpc.EventServiceAsyncStub) -> None:
    call = events.StreamEvents(None, metadata=DEV_AUTH)
    sent: list[str] = []
    for message in range(20):
        batch = [
            track(f"s-{message}-{i}", "Product Viewed", {"product_id": f"p{i}"}, f"u{i}") for i in range(50)
        ]
        batch.append(track(f"s-{message}-bad", "Order Completed", {}))
        sent.extend(e.message_id for e in batch)
        await call.write(event_service_pb2.StreamEventsRequest(events=batch))
    await call.done_writing()
    acks = [ack async for response in call for ack in response.acks]
    assert sorted(a.message_id for a in acks) == sorted(sent)
    rejected = {a.message_id for a in acks if a.outcome == event_pb2.EVENT_OUTCOME_REJECTED}
    assert rejected == {f"s-{m}-bad" for m in range(20)}
    assert await call.code() == grpc.StatusCode.OK


async def test_missing_unknown_and_underscoped_keys(make_settings: SettingsFactory) -> None:
    config = f'[[auth.keys]]\nname = "reader"\nhash = "{hash_key("reader-key")}"\nscopes = ["content"]\n'
    async with (
        Sendtime(make_settings(config)) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel,
    ):
        stub = event_stub(channel)
        request = event_service_pb2.IngestEventRequest(event=track("k-1", "Custom", {}))
        cases = [
            ((), grpc.StatusCode.UNAUTHENTICATED),
            ((("authorization", "Bearer wrong"),), grpc.StatusCode.UNAUTHENTICATED),
            ((("authorization", "Bearer reader-key"),), grpc.StatusCode.PERMISSION_DENIED),
        ]
        for metadata, code in cases:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.IngestEvent(request, metadata=metadata)
            assert caught.value.code() == code
        # a stream is refused the same way
        call = stub.StreamEvents(None, metadata=(("authorization", "Bearer reader-key"),))
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.PERMISSION_DENIED
        # the reader key may read profiles
        profiles = profile_stub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await profiles.GetProfile(
                profile_service_pb2.GetProfileRequest(user_id="nobody"),
                metadata=(("authorization", "Bearer reader-key"),),
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_is_serving_and_reflection_lists_the_services(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "sendtime.v1.EventService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = reflect.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    await call.done_writing()
    names = {s.name async for reply in call for s in reply.list_services_response.service}
    assert {"sendtime.v1.EventService", "sendtime.v1.ProfileService", "grpc.health.v1.Health"} <= names
