"""The gRPC edge of segments and broadcasts: decode, call the service, encode."""

from __future__ import annotations

from typing import Any

import grpc
import grpc.aio
from google.protobuf.duration_pb2 import Duration

from sendtime.server.broadcasting import Segments
from sendtime.server.domain.errors import InvalidInput
from sendtime.server.domain.segments import Segment
from sendtime.server.edge import grpc_decode as decode
from sendtime.server.edge.grpc_errors import mapped_errors
from sendtime.v1 import broadcast_service_pb2 as pb
from sendtime.v1 import broadcast_service_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]

SERVICE_NAMES = (pb.DESCRIPTOR.services_by_name["SegmentService"].full_name,)


def segment_message(segment: Segment) -> pb.Segment:
    return pb.Segment(
        name=segment.name,
        expression=segment.expression,
        description=segment.description,
        source=segment.source,
    )


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


class SegmentService(broadcast_service_pb2_grpc.SegmentServiceServicer):
    def __init__(self, segments: Segments) -> None:
        self._segments = segments

    @mapped_errors
    async def CreateSegment(
        self, request: pb.CreateSegmentRequest, context: Context
    ) -> pb.CreateSegmentResponse:
        if not request.HasField("segment"):
            raise InvalidInput.field("segment", "is required")
        given = request.segment
        segment = await self._segments.save(given.name, given.expression, given.description)
        return pb.CreateSegmentResponse(segment=segment_message(segment))

    @mapped_errors
    async def GetSegment(self, request: pb.GetSegmentRequest, context: Context) -> pb.GetSegmentResponse:
        return pb.GetSegmentResponse(segment=segment_message(await self._segments.get(request.name)))

    @mapped_errors
    async def ListSegments(
        self, request: pb.ListSegmentsRequest, context: Context
    ) -> pb.ListSegmentsResponse:
        return pb.ListSegmentsResponse(segments=[segment_message(s) for s in await self._segments.all()])

    @mapped_errors
    async def CountSegment(
        self, request: pb.CountSegmentRequest, context: Context
    ) -> pb.CountSegmentResponse:
        scan = await self._segments.count(request.segment, request.expression)
        return pb.CountSegmentResponse(
            count=scan.matched,
            scanned=scan.scanned,
            errors=scan.errors,
            first_error=scan.first_error,
            elapsed=_duration(scan.elapsed_s),
        )

    @mapped_errors
    async def SampleSegment(
        self, request: pb.SampleSegmentRequest, context: Context
    ) -> pb.SampleSegmentResponse:
        _, users = await self._segments.sample(request.segment, request.expression, request.limit or 10)
        return pb.SampleSegmentResponse(
            members=[
                pb.SegmentMember(
                    user_id=u.user_id, anonymous_id=u.anonymous_id, email=u.email, timezone=u.timezone
                )
                for u in users
            ]
        )


def add_broadcast_services(server: grpc.aio.Server, segments: Segments) -> None:
    decode.add_service(
        broadcast_service_pb2_grpc.add_SegmentServiceServicer_to_server, SegmentService(segments), server
    )
