"""Errors the client raises, decoded from the server's google.rpc.Status.

The server attaches an ErrorInfo (a stable ``reason``) and, for bad input, a
BadRequest naming each field at fault; callers act on those, not on messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, cast

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One field at fault, named by its path (``event.track.properties_json.price``)."""

    field: str
    description: str

    def __str__(self) -> str:
        return f"{self.field}: {self.description}"


class SendtimeError(Exception):
    """A call failed. ``code`` is the gRPC status, ``reason`` the server's
    stable UPPER_SNAKE identifier (google.rpc.ErrorInfo.reason), ``message``
    is for people."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: tuple[FieldViolation, ...] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.reason = reason or self.code.name
        self.metadata: Mapping[str, str] = dict(metadata or {})
        self.field_violations = field_violations

    def __str__(self) -> str:
        if not self.field_violations:
            return f"{self.code.name}: {self.message}"
        fields = "; ".join(str(v) for v in self.field_violations)
        return f"{self.code.name}: {self.message} ({fields})"


class InvalidArgument(SendtimeError):
    """The request breaks the API contract; ``field_violations`` says where."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(SendtimeError):
    """No API key, or one the server does not know."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(SendtimeError):
    """The API key lacks the scope the call needs."""

    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(SendtimeError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(SendtimeError):
    """The server is overloaded and said so at once; back off before retrying."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(SendtimeError):
    """The server could not be reached or is shutting down, and retries
    within the call's deadline did not help."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(SendtimeError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(SendtimeError):
    """The call or stream was cancelled (on an aborted ``EventStream``, the
    events that were never acked)."""

    code = grpc.StatusCode.CANCELLED


_BY_CODE: Final[Mapping[grpc.StatusCode, type[SendtimeError]]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        Unauthenticated,
        PermissionDenied,
        NotFound,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
    )
}


def error_from_rpc(error: grpc.RpcError) -> SendtimeError:
    """The typed error for a failed call (sync ``grpc.RpcError`` or
    ``grpc.aio.AioRpcError``; both expose the call's status synchronously)."""
    call = cast(grpc.Call, error)  # every RpcError the client sees is also its call
    code = call.code()
    message = call.details() or ""
    reason = ""
    metadata: Mapping[str, str] = {}
    violations: list[FieldViolation] = []
    for detail in _details(call):
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations.extend(FieldViolation(v.field, v.description) for v in bad_request.field_violations)
    cls = _BY_CODE.get(code, SendtimeError)
    return cls(message, code=code, reason=reason, metadata=metadata, field_violations=tuple(violations))


def _details(call: grpc.Call) -> list[any_pb2.Any]:
    try:
        status: status_pb2.Status | None = rpc_status.from_call(call)
    except ValueError:  # a status proto that disagrees with the call's own status: ignore it
        return []
    return list(status.details) if status is not None else []
