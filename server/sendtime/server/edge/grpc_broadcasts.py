"""The gRPC edge of segments and broadcasts: decode, call the service, encode."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import grpc
import grpc.aio
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from sendtime.server.broadcasting import BroadcastRequest, Broadcasts, Segments
from sendtime.server.domain.broadcasts import Broadcast, BroadcastState, Progress
from sendtime.server.domain.errors import InvalidInput
from sendtime.server.domain.segments import Segment
from sendtime.server.edge import grpc_decode as decode
from sendtime.server.edge.grpc_convert import timestamp
from sendtime.server.edge.grpc_errors import mapped_errors
from sendtime.v1 import broadcast_service_pb2 as pb
from sendtime.v1 import broadcast_service_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["SegmentService"].full_name,
    pb.DESCRIPTOR.services_by_name["BroadcastService"].full_name,
)
_STATES = {state: pb.BroadcastState.Value(f"BROADCAST_STATE_{state.name}") for state in BroadcastState}
_MAX_PAGE = 500


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


def _moment(message: pb.Broadcast, name: str) -> datetime | None:
    if not message.HasField(name):  # type: ignore[arg-type]
        return None
    stamp: Timestamp = getattr(message, name)
    try:
        return stamp.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidInput.field(f"broadcast.{name}", "is not a valid time") from None


def broadcast_message(broadcast: Broadcast, progress: Progress | None = None) -> pb.Broadcast:
    message = pb.Broadcast(
        id=broadcast.id,
        idempotency_key=broadcast.idempotency_key,
        name=broadcast.name,
        template_id=broadcast.template_id,
        segment=broadcast.segment,
        expression=broadcast.expression,
        subscription_group=broadcast.subscription_group,
        sender=broadcast.sender,
        send_time=timestamp(broadcast.send_at),
        local_time=broadcast.local_time,
        fallback_time_zone=broadcast.fallback_zone,
        rate_limit=broadcast.rate_per_s,
        end_time=timestamp(broadcast.end_at),
        require_blocks=list(broadcast.require_blocks),
        state=_STATES[broadcast.state],
        create_time=timestamp(broadcast.created_at),
        start_time=timestamp(broadcast.started_at),
        plan_time=timestamp(broadcast.planned_at),
        transactional=broadcast.transactional,
    )
    if progress is not None:
        message.progress.CopyFrom(
            pb.BroadcastProgress(
                audience=progress.audience,
                planned=progress.planned,
                scheduled=progress.scheduled,
                in_flight=progress.in_flight,
                sent=progress.sent,
                skipped=progress.skipped,
                failed=progress.failed,
                uncertain=progress.uncertain,
                cancelled=progress.cancelled,
                segment_errors=broadcast.segment_errors,
            )
        )
    return message


class BroadcastService(broadcast_service_pb2_grpc.BroadcastServiceServicer):
    def __init__(self, broadcasts: Broadcasts) -> None:
        self._broadcasts = broadcasts

    @mapped_errors
    async def CreateBroadcast(
        self, request: pb.CreateBroadcastRequest, context: Context
    ) -> pb.CreateBroadcastResponse:
        if not request.HasField("broadcast"):
            raise InvalidInput.field("broadcast", "is required")
        given = request.broadcast
        broadcast, created = await self._broadcasts.create(
            BroadcastRequest(
                idempotency_key=given.idempotency_key,
                template_id=given.template_id,
                segment=given.segment,
                expression=given.expression,
                name=given.name,
                transactional=given.transactional,
                subscription_group=given.subscription_group,
                sender=given.sender,
                send_at=_moment(given, "send_time"),
                local_time=given.local_time,
                fallback_zone=given.fallback_time_zone,
                rate_per_s=given.rate_limit,
                end_at=_moment(given, "end_time"),
                require_blocks=tuple(given.require_blocks),
            )
        )
        progress = await self._broadcasts.progress_of(broadcast)
        return pb.CreateBroadcastResponse(broadcast=broadcast_message(broadcast, progress), created=created)

    @mapped_errors
    async def GetBroadcast(
        self, request: pb.GetBroadcastRequest, context: Context
    ) -> pb.GetBroadcastResponse:
        broadcast, progress = await self._broadcasts.get(request.id)
        return pb.GetBroadcastResponse(broadcast=broadcast_message(broadcast, progress))

    @mapped_errors
    async def ListBroadcasts(
        self, request: pb.ListBroadcastsRequest, context: Context
    ) -> pb.ListBroadcastsResponse:
        if not 0 <= request.page_size <= _MAX_PAGE:
            raise InvalidInput.field("page_size", f"must be between 0 (50) and {_MAX_PAGE}")
        found = await self._broadcasts.list_broadcasts(
            active_only=request.active_only, limit=request.page_size or 50
        )
        return pb.ListBroadcastsResponse(
            broadcasts=[broadcast_message(b, await self._broadcasts.progress_of(b)) for b in found]
        )

    @mapped_errors
    async def PauseBroadcast(
        self, request: pb.PauseBroadcastRequest, context: Context
    ) -> pb.PauseBroadcastResponse:
        broadcast = await self._broadcasts.pause(request.id)
        return pb.PauseBroadcastResponse(broadcast=broadcast_message(broadcast))

    @mapped_errors
    async def ResumeBroadcast(
        self, request: pb.ResumeBroadcastRequest, context: Context
    ) -> pb.ResumeBroadcastResponse:
        broadcast = await self._broadcasts.resume(request.id)
        return pb.ResumeBroadcastResponse(broadcast=broadcast_message(broadcast))

    @mapped_errors
    async def CancelBroadcast(
        self, request: pb.CancelBroadcastRequest, context: Context
    ) -> pb.CancelBroadcastResponse:
        broadcast = await self._broadcasts.cancel(request.id)
        return pb.CancelBroadcastResponse(broadcast=broadcast_message(broadcast))


def add_broadcast_services(server: grpc.aio.Server, segments: Segments, broadcasts: Broadcasts) -> None:
    decode.add_service(
        broadcast_service_pb2_grpc.add_SegmentServiceServicer_to_server, SegmentService(segments), server
    )
    decode.add_service(
        broadcast_service_pb2_grpc.add_BroadcastServiceServicer_to_server,
        BroadcastService(broadcasts),
        server,
    )
