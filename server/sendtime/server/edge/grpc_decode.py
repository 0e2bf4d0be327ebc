"""Request decoding, so that bytes that are not the message they claim to be
get INVALID_ARGUMENT with the reason (UNDECODABLE_REQUEST), and, for the event
RPCs, one bad event in a batch is rejected in its place instead of failing the
call.

grpc's generated handlers decode with ``FromString``, and an exception there
ends the call as UNKNOWN. These decoders never raise: they answer the message,
or an ``InvalidInput`` the servicer raises as the call's status. A batch whose
envelope is sound but one of whose events is not (a string field that is not
UTF-8, say, which fails protobuf's decoding of the whole batch) is split on
the wire and each event decoded on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from sendtime.server.domain.errors import InvalidInput
from sendtime.server.edge.grpc_errors import abort
from sendtime.v1 import event_pb2, event_service_pb2

if TYPE_CHECKING:  # grpc's handler type is generic only in its stubs
    MethodHandler = grpc.RpcMethodHandler[Any, Any]

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


# -- every other service: the generated registration, decoding made safe ---------


class _Registrar:
    """Stands in for the server while a generated ``add_..._to_server``
    registers a service, to take its handlers."""

    def __init__(self) -> None:
        self.name = ""
        self.handlers: dict[str, MethodHandler] = {}

    def add_generic_rpc_handlers(self, _handlers: object) -> None:
        pass  # the same handlers come again, by name, just below

    def add_registered_method_handlers(self, name: str, handlers: Mapping[str, MethodHandler]) -> None:
        self.name, self.handlers = name, dict(handlers)


def add_service(add_to_server: Callable[[Any, Any], None], servicer: object, server: grpc.aio.Server) -> None:
    """Registers ``servicer`` as the generated ``add_to_server`` would, except
    that a unary request that is not its message answers INVALID_ARGUMENT
    (UNDECODABLE_REQUEST) instead of UNKNOWN."""
    registrar = _Registrar()
    add_to_server(servicer, registrar)
    handlers = {
        method: _decoding_safely(f"{registrar.name}/{method}", handler)
        for method, handler in registrar.handlers.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(registrar.name, handlers),))
    server.add_registered_method_handlers(registrar.name, handlers)  # type: ignore[attr-defined]


def _decoding_safely(method: str, handler: MethodHandler) -> MethodHandler:
    parse = handler.request_deserializer
    # a grpc.aio servicer's coroutine, though grpc's stubs type it as a plain function
    behavior: Any = handler.unary_unary
    if handler.request_streaming or handler.response_streaming or parse is None or behavior is None:
        return handler  # sendtime has no such methods beyond the event stream, decoded on its own

    def decode(data: bytes) -> object:
        try:
            return parse(data)
        except DecodeError as exc:
            return InvalidInput(f"the request is not a valid {method} request: {exc}", reason=UNDECODABLE)

    async def answer(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> object:
        if isinstance(request, InvalidInput):
            await abort(context, request)
        return await behavior(request, context)

    return grpc.unary_unary_rpc_method_handler(
        answer, request_deserializer=decode, response_serializer=handler.response_serializer
    )
