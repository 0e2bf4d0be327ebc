"""SegmentService on a real server: segments from the settings and the API,
counted and sampled over the stored profiles (evaluated in a worker process),
and expressions refused with an error that points at the bad part."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from sendtime.server.app import Sendtime
from sendtime.server.domain.errors import InvalidInput
from sendtime.v1 import broadcast_service_pb2 as B
from sendtime.v1 import broadcast_service_pb2_grpc, event_pb2, event_service_pb2
from tests.conftest import DEV_AUTH, SettingsFactory, event_stub
from tests.integration.test_grpc_ingest import details

CONFIG = """
[[segments]]
name = "germany"
expression = 'traits.locale == "de-DE"'
description = "everyone in Germany"
"""


def person(n: int, country: str, *, timezone: str = "Europe/Berlin") -> event_pb2.Event:
    traits = event_pb2.Traits(
        email=f"user{n}@example.com", timezone=timezone, locale=f"{country.lower()}-{country}"
    )
    return event_pb2.Event(
        message_id=f"id-{n}", user_id=f"user{n}", identify=event_pb2.IdentifyPayload(traits=traits)
    )


@pytest.fixture
async def app(make_settings: SettingsFactory) -> AsyncIterator[Sendtime]:
    # pages of 100 profiles: the walk goes through several, several in flight
    async with Sendtime(make_settings(CONFIG, broadcasts__segment_batch="100")) as server:
        yield server


@pytest.fixture
async def segments(app: Sendtime) -> AsyncIterator[broadcast_service_pb2_grpc.SegmentServiceAsyncStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        people = [person(n, "DE" if n % 3 == 0 else "FR") for n in range(450)]
        answer = await event_stub(channel).IngestEvents(
            event_service_pb2.IngestEventsRequest(events=people), metadata=DEV_AUTH
        )
        assert all(ack.outcome == event_pb2.EVENT_OUTCOME_ACCEPTED for ack in answer.acks)
        yield broadcast_service_pb2_grpc.SegmentServiceStub(channel)


async def test_count_and_sample_a_configured_segment(
    segments: broadcast_service_pb2_grpc.SegmentServiceAsyncStub,
) -> None:
    listed = await segments.ListSegments(B.ListSegmentsRequest(), metadata=DEV_AUTH)
    assert [(s.name, s.source) for s in listed.segments] == [("germany", "config")]
    # counted right after the events were acked: profiles not saved yet count too
    counted = await segments.CountSegment(B.CountSegmentRequest(segment="germany"), metadata=DEV_AUTH)
    assert (counted.count, counted.scanned, counted.errors) == (150, 450, 0)
    sample = await segments.SampleSegment(
        B.SampleSegmentRequest(segment="germany", limit=5), metadata=DEV_AUTH
    )
    assert len(sample.members) == 5
    for member in sample.members:
        assert int(member.user_id.removeprefix("user")) % 3 == 0
        assert member.email == f"{member.user_id}@example.com"
        assert member.timezone == "Europe/Berlin"


async def test_an_expression_can_be_counted_and_saved_as_a_segment(
    segments: broadcast_service_pb2_grpc.SegmentServiceAsyncStub,
) -> None:
    france = 'traits.locale.endsWith("-FR")'
    counted = await segments.CountSegment(B.CountSegmentRequest(expression=france), metadata=DEV_AUTH)
    assert counted.count == 300
    made = await segments.CreateSegment(
        B.CreateSegmentRequest(segment=B.Segment(name="france", expression=france)), metadata=DEV_AUTH
    )
    assert made.segment.source == "api"
    got = await segments.GetSegment(B.GetSegmentRequest(name="france"), metadata=DEV_AUTH)
    assert got.segment.expression == france
    listed = await segments.ListSegments(B.ListSegmentsRequest(), metadata=DEV_AUTH)
    assert [s.name for s in listed.segments] == ["france", "germany"]
    erring = await segments.CountSegment(
        B.CountSegmentRequest(expression='traits.loyalty == "gold"'), metadata=DEV_AUTH
    )
    assert (erring.count, erring.errors) == (0, 450)
    assert "loyalty" in erring.first_error


async def test_segment_errors_point_at_the_bad_part(
    segments: broadcast_service_pb2_grpc.SegmentServiceAsyncStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as syntax:
        await segments.CreateSegment(
            B.CreateSegmentRequest(segment=B.Segment(name="broken", expression="order_count > ")),
            metadata=DEV_AUTH,
        )
    assert syntax.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, violations = details(syntax.value)
    assert violations[0][0] == "segment.expression"
    assert "column 14" in violations[0][1]
    assert violations[0][1].endswith("^")

    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await segments.CountSegment(B.CountSegmentRequest(expression='contry == "DE"'), metadata=DEV_AUTH)
    assert "unknown name 'contry'" in (unknown.value.details() or "")

    with pytest.raises(grpc.aio.AioRpcError) as both:
        await segments.CountSegment(
            B.CountSegmentRequest(segment="germany", expression="true"), metadata=DEV_AUTH
        )
    assert details(both.value)[1][0][0] == "segment"

    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await segments.CountSegment(B.CountSegmentRequest(segment="nobody"), metadata=DEV_AUTH)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    with pytest.raises(grpc.aio.AioRpcError) as configured:
        await segments.CreateSegment(
            B.CreateSegmentRequest(segment=B.Segment(name="germany", expression="true")), metadata=DEV_AUTH
        )
    assert "defined in the settings" in (configured.value.details() or "")


async def test_a_bad_configured_segment_stops_the_server_at_start(make_settings: SettingsFactory) -> None:
    settings = make_settings('[[segments]]\nname = "bad"\nexpression = "order_count >"\n')
    with pytest.raises(InvalidInput, match=r"segments\[0\]\.expression: .* at line 1, column 14"):
        async with Sendtime(settings):
            pass
