"""Segments and broadcasts as plain values: requests built from keyword
arguments, answers read into ``Segment``, ``SegmentCount``, ``SegmentMember``,
``Broadcast`` and ``BroadcastProgress``.

A broadcast has one idempotency key: creating it again with the same key
returns the first broadcast, and its audience gets each email once.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from google.protobuf.timestamp_pb2 import Timestamp

from sendtime.v1 import broadcast_service_pb2 as pb


class BroadcastState(enum.StrEnum):
    SCHEDULED = "scheduled"
    """Waiting for its start."""
    PLANNING = "planning"
    """Resolving its audience and writing one delivery per recipient."""
    SENDING = "sending"
    PAUSED = "paused"
    DONE = "done"
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"
    """Unspecified, or a state this client does not know (a newer server)."""


_STATES: Final[Mapping[int, BroadcastState]] = {
    pb.BROADCAST_STATE_SCHEDULED: BroadcastState.SCHEDULED,
    pb.BROADCAST_STATE_PLANNING: BroadcastState.PLANNING,
    pb.BROADCAST_STATE_SENDING: BroadcastState.SENDING,
    pb.BROADCAST_STATE_PAUSED: BroadcastState.PAUSED,
    pb.BROADCAST_STATE_DONE: BroadcastState.DONE,
    pb.BROADCAST_STATE_CANCELLED: BroadcastState.CANCELLED,
}


@dataclass(frozen=True, slots=True)
class Segment:
    name: str
    #: A CEL expression over the profile, true for the users in the segment.
    expression: str
    description: str
    #: "config" ([[segments]] in the server's settings) or "api".
    source: str


@dataclass(frozen=True, slots=True)
class SegmentCount:
    count: int
    #: Stored profiles looked at.
    scanned: int
    #: Profiles the expression could not be evaluated on (not counted), and the first error.
    errors: int
    first_error: str
    elapsed: dt.timedelta


@dataclass(frozen=True, slots=True)
class SegmentMember:
    user_id: str
    anonymous_id: str
    email: str
    timezone: str


@dataclass(frozen=True, slots=True)
class BroadcastProgress:
    #: Users in the segment when the broadcast started.
    audience: int
    #: Deliveries written (one per recipient).
    planned: int
    #: Waiting for their time (or parked while paused), and being sent.
    scheduled: int
    in_flight: int
    sent: int
    #: Skipped, by reason: no_email, opted_out, suppressed, capped, quiet_hours,
    #: missing_block, bad_address, ended, other.
    skipped: Mapping[str, int]
    failed: int
    #: The ESP may have taken them (a crash while handing over): not resent.
    uncertain: int
    cancelled: int
    segment_errors: int

    @property
    def settled(self) -> int:
        return self.sent + sum(self.skipped.values()) + self.failed + self.uncertain + self.cancelled


@dataclass(frozen=True, slots=True)
class Broadcast:
    id: str
    idempotency_key: str
    name: str
    template_id: str
    segment: str
    expression: str
    #: "" for a transactional broadcast.
    subscription_group: str
    sender: str
    send_time: dt.datetime | None
    #: A wall-clock time in each user's zone ("2026-12-04T19:00"), or "".
    local_time: str
    fallback_time_zone: str
    #: Emails per second at most; 0: no limit.
    rate_limit: float
    end_time: dt.datetime | None
    require_blocks: tuple[str, ...]
    state: BroadcastState
    create_time: dt.datetime | None
    start_time: dt.datetime | None
    plan_time: dt.datetime | None
    progress: BroadcastProgress | None


def _time(message: pb.Broadcast, name: str) -> dt.datetime | None:
    if not message.HasField(name):  # type: ignore[arg-type]
        return None
    stamp: Timestamp = getattr(message, name)
    return stamp.ToDatetime(tzinfo=dt.UTC)


def _stamp(moment: dt.datetime | None) -> Timestamp | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        raise ValueError("a broadcast's times must be timezone-aware (e.g. datetime(..., tzinfo=UTC))")
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def segment_from_proto(message: pb.Segment) -> Segment:
    return Segment(message.name, message.expression, message.description, message.source)


def count_from_proto(message: pb.CountSegmentResponse) -> SegmentCount:
    return SegmentCount(
        message.count, message.scanned, message.errors, message.first_error, message.elapsed.ToTimedelta()
    )


def members_from_proto(message: pb.SampleSegmentResponse) -> list[SegmentMember]:
    return [SegmentMember(m.user_id, m.anonymous_id, m.email, m.timezone) for m in message.members]


def broadcast_from_proto(message: pb.Broadcast) -> Broadcast:
    progress = None
    if message.HasField("progress"):
        p = message.progress
        progress = BroadcastProgress(
            audience=p.audience,
            planned=p.planned,
            scheduled=p.scheduled,
            in_flight=p.in_flight,
            sent=p.sent,
            skipped=dict(p.skipped),
            failed=p.failed,
            uncertain=p.uncertain,
            cancelled=p.cancelled,
            segment_errors=p.segment_errors,
        )
    return Broadcast(
        id=message.id,
        idempotency_key=message.idempotency_key,
        name=message.name,
        template_id=message.template_id,
        segment=message.segment,
        expression=message.expression,
        subscription_group=message.subscription_group,
        sender=message.sender,
        send_time=_time(message, "send_time"),
        local_time=message.local_time,
        fallback_time_zone=message.fallback_time_zone,
        rate_limit=message.rate_limit,
        end_time=_time(message, "end_time"),
        require_blocks=tuple(message.require_blocks),
        state=_STATES.get(message.state, BroadcastState.UNKNOWN),
        create_time=_time(message, "create_time"),
        start_time=_time(message, "start_time"),
        plan_time=_time(message, "plan_time"),
        progress=progress,
    )


def create_broadcast_request(
    template_id: str,
    idempotency_key: str,
    *,
    segment: str | None,
    expression: str | None,
    name: str | None,
    transactional: bool,
    subscription_group: str | None,
    sender: str | None,
    send_time: dt.datetime | None,
    local_time: str | None,
    fallback_time_zone: str | None,
    rate_limit: float,
    end_time: dt.datetime | None,
    require_blocks: Iterable[str],
) -> pb.CreateBroadcastRequest:
    return pb.CreateBroadcastRequest(
        broadcast=pb.Broadcast(
            idempotency_key=idempotency_key,
            template_id=template_id,
            segment=segment or "",
            expression=expression or "",
            name=name or "",
            transactional=transactional,
            subscription_group=subscription_group or "",
            sender=sender or "",
            send_time=_stamp(send_time),
            local_time=local_time or "",
            fallback_time_zone=fallback_time_zone or "",
            rate_limit=rate_limit,
            end_time=_stamp(end_time),
            require_blocks=list(require_blocks),
        )
    )
