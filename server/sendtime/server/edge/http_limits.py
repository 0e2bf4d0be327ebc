"""What keeps the HTTP edge answering when clients are many, slow or hostile.

- ``ConnectionLimiter``: at most ``http.max_connections`` open connections (so
  a flood of sockets cannot use up the process's file descriptors and take the
  gRPC edge down with it). At the bound a new connection closes the one that
  has waited longest for a request (an idle keep-alive connection, or a slow
  sender still short of a complete request head): slowloris connections cannot
  lock out the health check. When every connection is inside a request, the
  new one is closed instead.
- The request head must arrive within ``http.header_timeout_s`` of connecting
  or of the previous answer (aiohttp's keep-alive timer, which also closes a
  connection whose head is incomplete), and the body within
  ``http.body_timeout_s`` of the head (``read_body``).
- ``IngestAdmission``: intake requests are admitted before their body is read,
  by the bytes they bring (Content-Length, or the route's limit for a chunked
  body): beyond ``http.max_ingest_bytes_in_flight`` being read, decoded or
  stored at once, or while the store has as many events queued as it will
  take, the answer is 429 with Retry-After at once, before a byte of the body
  is read or decoded. Decoding runs on the event loop, so this bound is what
  keeps health checks and content calls answered during an intake flood. A key
  in the Authorization header is checked then too, so a wrong key is refused
  before its body is buffered.
- When a request's first bytes were read (``arrived``): the time a request
  waits for its handler while the event loop serves others (a loop iteration
  running many calls) counts against its deadline, so content calls see it at
  admission and are shed rather than answered late.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from sendtime.server.domain.errors import InvalidInput, Overloaded, PayloadTooLarge, SendtimeError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_CHUNK: Final = 64 * 1024


class RequestTimeout(SendtimeError):
    """The body did not arrive in time (HTTP 408)."""

    reason = "REQUEST_TIMEOUT"


async def read_body(request: web.Request, limit: int, timeout_s: float) -> bytes:
    """The body, read as it comes: refused (413) as soon as it passes ``limit``
    (a chunked body too, without buffering the rest), and cut (408) when it
    takes longer than ``timeout_s``."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"the body is {request.content_length} bytes; the limit is {limit}")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            while chunk := await request.content.read(_CHUNK):
                body += chunk
                if len(body) > limit:
                    raise PayloadTooLarge(f"the body is larger than {limit} bytes, the limit")
    except TimeoutError:
        raise RequestTimeout(f"the body did not arrive within {timeout_s:g} s") from None
    except (RequestPayloadError, HttpProcessingError, ValueError) as exc:
        # A body aiohttp cannot decode: Content-Encoding deflate or gzip with
        # bytes that are not, or a broken chunked encoding.
        raise InvalidInput.field("body", f"cannot be read: {exc}") from None
    return bytes(body)


class IngestAdmission:
    """Admits an intake request before its body is read (see the module doc)."""

    def __init__(self, max_bytes_in_flight: int, backlogged: Callable[[], bool]) -> None:
        self._max_bytes = max_bytes_in_flight
        self._backlogged = backlogged
        #: Bytes of the intake bodies admitted and not yet answered.
        self.bytes_in_flight = 0

    def wrap(self, handler: Handler, check_key: Callable[[web.Request], None], limit: int) -> Handler:
        """``handler`` behind admission; ``limit`` is its route's body limit."""

        async def admitted(request: web.Request) -> web.StreamResponse:
            size = min(request.content_length, limit) if request.content_length is not None else limit
            # one request is always let in, whatever its size: the bound sheds, never starves
            if self.bytes_in_flight and self.bytes_in_flight + size > self._max_bytes:
                raise Overloaded(f"{self.bytes_in_flight} bytes of intake are being handled; retry shortly")
            if self._backlogged():
                raise Overloaded("the store has as many events queued as it takes; retry shortly")
            check_key(request)
            self.bytes_in_flight += size
            try:
                return await handler(request)
            finally:
                self.bytes_in_flight -= size

        return admitted


#: Where the limiter's middleware leaves when the request's first bytes were
#: read (time.monotonic), for the handlers.
_ARRIVED: Final = web.RequestKey("sendtime.arrived", float)


def arrived(request: web.Request) -> float | None:
    """When the request's first bytes were read (time.monotonic), if known."""
    return request.get(_ARRIVED)


class ConnectionLimiter:
    """Bounds the open connections of one listening socket (see the module doc)."""

    def __init__(self, max_connections: int) -> None:
        self._max = max_connections
        self._open = 0
        #: Connections waiting for their next request, longest waiting first.
        self._idle: collections.OrderedDict[asyncio.BaseTransport, _Counted] = collections.OrderedDict()
        self.evicted = 0
        self.refused = 0

    @property
    def open(self) -> int:
        return self._open

    @property
    def max_connections(self) -> int:
        return self._max

    def protocol_factory(self, inner: Callable[[], asyncio.BaseProtocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: _Counted(self, inner())

    def _admit(self, connection: _Counted, transport: asyncio.BaseTransport) -> bool:
        if self._open >= self._max:
            if not self._idle:
                self.refused += 1
                return False
            _, victim = self._idle.popitem(last=False)
            self.evicted += 1
            victim.evict()
        self._open += 1
        self._idle[transport] = connection
        return True

    def _gone(self, transport: asyncio.BaseTransport) -> None:
        self._idle.pop(transport, None)
        self._open -= 1

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Marks the connection busy while its request is handled: never evicted then."""
        transport = request.transport
        connection = self._idle.pop(transport, None) if transport is not None else None
        if connection is not None and connection.arrived is not None:
            request[_ARRIVED] = connection.arrived
            connection.arrived = None  # the next bytes are the next request's
        try:
            response = await handler(request)
        finally:
            if connection is not None:
                # bytes read while it was handled were its body's: the next
                # request's come after its answer
                connection.arrived = None
                if connection.counted and connection.transport is not None:
                    self._idle[connection.transport] = connection
        if not request.content.is_eof():
            # Refused before its body was read (429, 401, 413...): close rather
            # than read and discard the rest of it.
            response.force_close()
        return response


class _Counted(asyncio.Protocol):
    """Forwards everything to aiohttp's protocol, telling the limiter of each
    connection's start and end."""

    __slots__ = ("_inner", "_limiter", "arrived", "counted", "transport")

    def __init__(self, limiter: ConnectionLimiter, inner: asyncio.BaseProtocol) -> None:
        self._limiter = limiter
        self._inner: asyncio.Protocol = inner  # type: ignore[assignment]
        #: Counted among the open connections (not yet lost, nor evicted).
        self.counted = False
        self.transport: asyncio.BaseTransport | None = None
        #: When the first bytes of the request not yet handled were read.
        self.arrived: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._limiter._admit(self, transport):
            transport.close()
            return
        self.counted = True
        self.transport = transport
        self._inner.connection_made(transport)

    def evict(self) -> None:
        """Closed to make room: no longer counted from now on."""
        assert self.transport is not None
        self.counted = False
        self._limiter._gone(self.transport)
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is None:
            return  # refused: never counted, never handed on
        if self.counted:
            self.counted = False
            self._limiter._gone(self.transport)
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.arrived is None:
            self.arrived = time.monotonic()
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()
