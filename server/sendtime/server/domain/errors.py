"""Errors the domain raises. The edges map them to gRPC status and HTTP JSON in
one place each (edge/grpc_errors.py, edge/http_errors.py); nothing else decides
a status code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One field at fault, named by its path (``properties.products[0].price``)."""

    field: str
    description: str


class SendtimeError(Exception):
    """Base for errors a caller can act on. ``reason`` is a stable UPPER_SNAKE
    identifier (google.rpc.ErrorInfo.reason); the message is for people."""

    reason: str = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason


class InvalidInput(SendtimeError):
    """The request (or one event in it) breaks the contract."""

    reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        message: str,
        violations: Sequence[FieldViolation] = (),
        *,
        reason: str | None = None,
    ) -> None:
        super().__init__(message, reason=reason)
        self.violations = tuple(violations)

    @classmethod
    def field(cls, field: str, description: str, *, reason: str | None = None) -> InvalidInput:
        return cls(f"{field}: {description}", [FieldViolation(field, description)], reason=reason)


class PayloadTooLarge(SendtimeError):
    reason = "PAYLOAD_TOO_LARGE"


class Unauthenticated(SendtimeError):
    reason = "UNAUTHENTICATED"


class PermissionDenied(SendtimeError):
    reason = "PERMISSION_DENIED"


class NotFound(SendtimeError):
    reason = "NOT_FOUND"


class Unavailable(SendtimeError):
    """The service cannot take the request now (shutting down, overloaded);
    the caller may retry, elsewhere or later."""

    reason = "UNAVAILABLE"


class Overloaded(SendtimeError):
    """Too much work is queued; answered at once rather than by growing latency.
    The caller should back off and retry."""

    reason = "RESOURCE_EXHAUSTED"
