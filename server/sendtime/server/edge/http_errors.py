"""The one place that turns domain errors into HTTP JSON errors.

The body keeps Segment's ``success`` flag (its clients look for it) and adds
the same content as the gRPC status details: a code, a stable reason, a
message, and the fields at fault.
"""

from __future__ import annotations

from typing import Final

import msgspec
from aiohttp import web

from sendtime.server.domain.errors import (
    InvalidInput,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    PermissionDenied,
    SendtimeError,
    Unauthenticated,
    Unavailable,
)
from sendtime.server.edge.http_limits import RequestTimeout

_STATUS: Final[dict[type[SendtimeError], tuple[int, str]]] = {
    InvalidInput: (400, "INVALID_ARGUMENT"),
    PayloadTooLarge: (413, "PAYLOAD_TOO_LARGE"),
    RequestTimeout: (408, "REQUEST_TIMEOUT"),
    Unauthenticated: (401, "UNAUTHENTICATED"),
    PermissionDenied: (403, "PERMISSION_DENIED"),
    NotFound: (404, "NOT_FOUND"),
    Overloaded: (429, "RESOURCE_EXHAUSTED"),
    Unavailable: (503, "UNAVAILABLE"),
}
_json = msgspec.json.Encoder()


def _status(error: SendtimeError) -> tuple[int, str]:
    return next((s for t, s in _STATUS.items() if isinstance(error, t)), (500, "INTERNAL"))


def error_body(error: SendtimeError) -> dict[str, object]:
    _, code = _status(error)
    body: dict[str, object] = {"code": code, "reason": error.reason, "message": error.message}
    if isinstance(error, InvalidInput) and error.violations:
        body["fieldViolations"] = [{"field": v.field, "description": v.description} for v in error.violations]
    return {"success": False, "error": body}


def error_response(error: SendtimeError) -> web.Response:
    status, _ = _status(error)
    headers = {}
    if isinstance(error, Unauthenticated):
        headers["WWW-Authenticate"] = 'Bearer realm="sendtime", Basic realm="sendtime"'
    elif isinstance(error, Overloaded | Unavailable):
        headers["Retry-After"] = "1"
    return web.Response(
        body=_json.encode(error_body(error)), status=status, content_type="application/json", headers=headers
    )
