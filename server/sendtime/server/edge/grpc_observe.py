"""One interceptor records every gRPC call: metrics, the access log line and
the server span, with the caller's x-request-id and W3C trace context.

It wraps the method's handler once per method (not per call) and keeps the
wrapper; per call it reads the metadata, times the call and reads its status
code from the context (None after a normal return: OK; None after an
exception that is not an abort: UNKNOWN, as grpc answers it).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

import grpc
import grpc.aio
from opentelemetry import context as otel_context
from opentelemetry.trace import Span, SpanKind, StatusCode, set_span_in_context

from sendtime.server.observe import Telemetry
from sendtime.server.observe.logs import REQUEST_ID_HEADER, request_id
from sendtime.server.observe.metrics import UNKNOWN, RpcMetrics

if TYPE_CHECKING:
    MethodHandler = grpc.RpcMethodHandler[Any, Any]

Context = grpc.aio.ServicerContext[Any, Any]

#: Probes and tools, counted but not written to the access log.
_QUIET_SERVICES: Final = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)


class _Method:
    """What is known of one method before any call: its labels and children."""

    __slots__ = ("full_name", "logged", "method", "metrics", "service")

    def __init__(self, telemetry: Telemetry, service: str, method: str) -> None:
        self.service = service
        self.method = method
        self.full_name = f"{service}/{method}"
        self.metrics: RpcMetrics | None = (
            telemetry.metrics.grpc_method(service, method) if telemetry.metrics is not None else None
        )
        self.logged = service not in _QUIET_SERVICES


class ObserveInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, telemetry: Telemetry, methods: Iterable[str]) -> None:
        """``methods``: the full names ("/pkg.Service/Method") the server serves;
        any other is recorded as service and method "unknown"."""
        self._telemetry = telemetry
        self._known = frozenset(methods)
        self._unknown_method: _Method | None = None
        self._wrapped: dict[str, tuple[MethodHandler, MethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[MethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> MethodHandler:
        # None for a method nobody serves (grpc's stubs say otherwise): grpc
        # then answers UNIMPLEMENTED, with no handler to wrap
        handler: MethodHandler | None = await continuation(handler_call_details)
        name: str = handler_call_details.method
        if handler is None:
            unknown = self._unknown()
            if unknown.metrics is not None:
                unknown.metrics.finished("UNIMPLEMENTED", 0.0)
            return None  # type: ignore[return-value]
        if name not in self._known:
            return self._wrap(self._unknown(), handler)
        cached = self._wrapped.get(name)
        if cached is not None and cached[0] is handler:
            return cached[1]
        service, _, method = name[1:].partition("/")
        wrapped = self._wrap(_Method(self._telemetry, service, method), handler)
        # the last handler seen per method (an auth refusal is a new handler each call)
        self._wrapped[name] = (handler, wrapped)
        return wrapped

    def _unknown(self) -> _Method:
        """Any method not served by name (labels must not take whatever a caller sends)."""
        if self._unknown_method is None:
            self._unknown_method = _Method(self._telemetry, UNKNOWN, UNKNOWN)
        return self._unknown_method

    def _wrap(self, method: _Method, handler: MethodHandler) -> MethodHandler:
        codecs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._unary(method, handler.unary_unary), **codecs)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(method, handler.unary_stream), **codecs
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(self._unary(method, handler.stream_unary), **codecs)
        assert handler.stream_stream is not None
        return grpc.stream_stream_rpc_method_handler(self._streaming(method, handler.stream_stream), **codecs)

    def _unary(
        self, method: _Method, behavior: Callable[..., Any]
    ) -> Callable[[Any, Context], Awaitable[Any]]:
        telemetry = self._telemetry
        metrics = method.metrics

        async def observed(request: Any, context: Context) -> Any:
            if not _wants_call(telemetry):
                # metrics alone (the usual case in production, at log level
                # WARNING): no request id, no span, no log line to make
                started = time.perf_counter()
                failure: BaseException | None = None
                try:
                    return await behavior(request, context)
                except BaseException as error:
                    failure = error
                    raise
                finally:
                    if metrics is not None:
                        metrics.finished(_status(context, failure), time.perf_counter() - started)
            call = _Call(telemetry, method, request, context)
            try:
                return await behavior(request, context)
            except BaseException as error:
                call.error = error
                raise
            finally:
                call.finish()

        return observed

    def _streaming(
        self, method: _Method, behavior: Callable[..., Any]
    ) -> Callable[[Any, Context], AsyncIterator[Any]]:
        telemetry = self._telemetry

        async def observed(request: Any, context: Context) -> AsyncIterator[Any]:
            call = _Call(telemetry, method, request, context)
            try:
                responses = behavior(request, context)
                if inspect.isawaitable(responses):
                    # a coroutine that writes with context.write (or aborts at
                    # once, as the key check's refusal does)
                    await responses
                else:
                    async for response in responses:
                        yield response
            except BaseException as error:
                call.error = error
                raise
            finally:
                call.finish()

        return observed


class _Call:
    """One call being recorded: its request id (and the context variable that
    carries it to every log line meanwhile), its span, its clock."""

    __slots__ = (
        "_context",
        "_method",
        "_peer",
        "_request",
        "_span",
        "_started",
        "_telemetry",
        "_tokens",
        "error",
        "request_id",
    )

    def __init__(self, telemetry: Telemetry, method: _Method, request: Any, context: Context) -> None:
        self._started = time.perf_counter()
        self._telemetry = telemetry
        self._method = method
        self._request = request
        self._context = context
        # Read now, not at finish: once a stream is reset (a client refusing an
        # ack over its receive limit) grpc may free the call, and peer() on a
        # freed call dereferences it (the server died of SIGSEGV there).
        self._peer: str = context.peer()
        self.error: BaseException | None = None
        metadata = context.invocation_metadata() or ()
        given = None
        for key, value in metadata:
            if key == REQUEST_ID_HEADER and isinstance(value, str):
                given = value
                break
        self.request_id = telemetry.request_ids.take(given)
        self._tokens: tuple[contextvars.Token[str], object | None] = (request_id.set(self.request_id), None)
        self._span: Span | None = None
        tracing = telemetry.tracing
        if tracing is not None:
            carrier = {key: value for key, value in metadata if isinstance(value, str)}
            self._span = tracing.tracer.start_span(
                method.full_name,
                context=tracing.extract(carrier),
                kind=SpanKind.SERVER,
                attributes={
                    "rpc.system": "grpc",
                    "rpc.service": method.service,
                    "rpc.method": method.method,
                    "sendtime.request_id": self.request_id,
                },
            )
            self._tokens = (self._tokens[0], otel_context.attach(set_span_in_context(self._span)))

    def finish(self) -> None:
        seconds = time.perf_counter() - self._started
        code = _status(self._context, self.error)
        variable, attached = self._tokens
        with contextlib.suppress(ValueError):  # a stream closed from elsewhere
            request_id.reset(variable)
        span = self._span
        if span is not None:
            if attached is not None:
                otel_context.detach(attached)  # type: ignore[arg-type]
            span.set_attribute("rpc.grpc.status_code", _CODE_NUMBERS.get(code, 2))
            if code != "OK":
                span.set_status(StatusCode.ERROR, code)
            span.end()
        method = self._method
        if method.metrics is not None:
            method.metrics.finished(code, seconds)
        access = self._telemetry.access_log
        if access is not None and method.logged and access.enabled:
            access.request(
                transport="grpc",
                method=method.full_name,
                route="",
                outcome=code,
                seconds=seconds,
                request_id=self.request_id,
                user_id=_user_id(self._request),
                peer=self._peer,
            )


def _wants_call(telemetry: Telemetry) -> bool:
    """Whether a call needs more than counting: a span, or an access log line."""
    access = telemetry.access_log
    return telemetry.tracing is not None or (access is not None and access.enabled)


def _status(context: Context, error: BaseException | None) -> str:
    """The call's status code as grpc answers it."""
    # None until the servicer aborts or sets one (grpc's stubs say otherwise)
    code: grpc.StatusCode | None = context.code()
    if code is not None:
        return str(code.name)
    if error is None:
        return "OK"
    if isinstance(error, asyncio.CancelledError):
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    return "UNKNOWN"  # what grpc answers for an exception that is not an abort


def _user_id(request: Any) -> str:
    for field in ("user_id", "anonymous_id"):
        value = getattr(request, field, "")
        if value and isinstance(value, str):
            return value
    return ""


_CODE_NUMBERS: Final = {code.name: code.value[0] for code in grpc.StatusCode}
