"""Request decoding for the event RPCs, so that bytes that are not the message
they claim to be get INVALID_ARGUMENT with the reason, and one bad event in a
batch is rejected in its place instead of failing the call.

grpc's generated handlers decode with ``FromString``, and an exception there
ends the call as UNKNOWN. These decoders never raise: they answer the message,
or an ``InvalidInput`` the servicer raises as the call's status. A batch whose
envelope is sound but one of whose events is not (a string field that is not
UTF-8, say, which fails protobuf's decoding of the whole batch) is split on
the wire and each event decoded on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from google.protobuf.message import DecodeError

from sendtime.server.domain.errors import InvalidInput
from sendtime.v1 import event_pb2, event_service_pb2

#: The stable reason of a request that is not the protobuf message it should be.
UNDECODABLE: Final = "UNDECODABLE_REQUEST"
_EVENTS_FIELD: Final = 1  # `repeated Event events = 1` in IngestEventsRequest and StreamEventsRequest


@dataclass(frozen=True, slots=True)
class EventBatch:
    """The events of an IngestEventsRequest or a StreamEventsRequest message,
    each decoded, or the reason it could not be."""

    events: Sequence[event_pb2.Event | InvalidInput]


def event_request(data: bytes) -> event_service_pb2.IngestEventRequest | InvalidInput:
    try:
        return event_service_pb2.IngestEventRequest.FromString(data)
    except DecodeError as exc:
        return _undecodable("sendtime.v1.IngestEventRequest", exc)


def event_batch(data: bytes) -> EventBatch | InvalidInput:
    """An IngestEventsRequest or StreamEventsRequest (the same wire shape)."""
    try:
        return EventBatch(event_service_pb2.IngestEventsRequest.FromString(data).events)
    except DecodeError:
        pass  # find which events are at fault
    try:
        return EventBatch(_split_events(data))
    except _Corrupt as exc:
        return InvalidInput.field(
            "events", f"the message is not a valid list of events: {exc}", reason=UNDECODABLE
        )


def _undecodable(message: str, exc: DecodeError) -> InvalidInput:
    return InvalidInput(
        f"the request is not a valid {message}: {exc}",
        reason=UNDECODABLE,
    )


class _Corrupt(Exception):
    """The message's own framing is broken: no event can be told apart."""


def _split_events(data: bytes) -> list[event_pb2.Event | InvalidInput]:
    """Walk the message's fields (protobuf wire format), decoding each
    ``events`` entry alone; other fields are skipped, as protobuf would."""
    events: list[event_pb2.Event | InvalidInput] = []
    position, end = 0, len(data)
    while position < end:
        key, position = _varint(data, position)
        field, wire_type = key >> 3, key & 7
        if field == 0:
            raise _Corrupt(f"field number 0 at byte {position}")
        if wire_type == 0:
            _, position = _varint(data, position)
        elif wire_type == 1:
            position += 8
        elif wire_type == 5:
            position += 4
        elif wire_type == 2:
            length, position = _varint(data, position)
            if position + length > end:
                raise _Corrupt(f"a field of {length} bytes runs past the end at byte {position}")
            if field == _EVENTS_FIELD:
                events.append(_event(data[position : position + length], len(events)))
            position += length
        else:
            raise _Corrupt(f"wire type {wire_type} at byte {position}")
        if position > end:
            raise _Corrupt("the message ends inside a field")
    return events


def _event(data: bytes, index: int) -> event_pb2.Event | InvalidInput:
    try:
        return event_pb2.Event.FromString(data)
    except DecodeError as exc:
        description = (
            f"events[{index}] is not a valid sendtime.v1.Event (a string field that is not UTF-8,"
            f" or a corrupt encoding): {exc}"
        )
        return InvalidInput.field("event", description, reason=UNDECODABLE)


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    for _ in range(10):
        if position >= len(data):
            raise _Corrupt("the message ends inside a varint")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
    raise _Corrupt(f"a varint longer than 10 bytes ends at byte {position}")
