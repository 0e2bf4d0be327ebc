"""One aiohttp middleware records every HTTP request: metrics by route
pattern, the access log line and the server span, with the caller's
X-Request-Id (echoed back) and W3C trace context.

Routes are labelled by their pattern ("/v1/content/{user_id}"), never by the
path, which may hold a user id; a path no route matches is "unmatched".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Middleware
from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind, StatusCode, set_span_in_context

from sendtime.server.observe import Telemetry
from sendtime.server.observe.logs import REQUEST_ID_HEADER, request_id
from sendtime.server.observe.metrics import RpcMetrics

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

UNMATCHED: Final = "unmatched"
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: Probes and scrapes, counted but not written to the access log.
_QUIET_ROUTES: Final = frozenset({"/healthz", "/readyz", "/metrics"})
#: What a client that went away is logged as (nginx's custom code for it).
CLIENT_CLOSED: Final = 499


def observe_middleware(telemetry: Telemetry) -> Middleware:
    recorders: dict[tuple[str, str], RpcMetrics] = {}
    metrics = telemetry.metrics

    def recorder(route: str, method: str) -> RpcMetrics | None:
        if metrics is None:
            return None
        found = recorders.get((route, method))
        if found is None:
            # bounded: route patterns as registered, and a fixed set of methods
            found = recorders[route, method] = metrics.http_route(route, method)
        return found

    @web.middleware
    async def observed(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else UNMATCHED
        method = request.method if request.method in _METHODS else "OTHER"
        access = telemetry.access_log
        if telemetry.tracing is None and (access is None or not access.enabled):
            # metrics alone: no request id, span or log line to make
            status = 500
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as exc:
                status = exc.status
                raise
            except asyncio.CancelledError:
                status = CLIENT_CLOSED
                raise
            finally:
                recorded = recorder(route, method)
                if recorded is not None:
                    recorded.finished(str(status), time.perf_counter() - started)
        rid = telemetry.request_ids.take(request.headers.get(REQUEST_ID_HEADER))
        token = request_id.set(rid)
        tracing = telemetry.tracing
        span = attached = None
        if tracing is not None:
            span = tracing.tracer.start_span(
                f"{method} {route}",
                context=tracing.extract(request.headers),
                kind=SpanKind.SERVER,
                attributes={
                    "http.request.method": method,
                    "http.route": route,
                    "sendtime.request_id": rid,
                },
            )
            attached = otel_context.attach(set_span_in_context(span))
        status = 500
        try:
            response = await handler(request)
            status = response.status
            if not response.prepared:
                response.headers["X-Request-Id"] = rid
            return response
        except web.HTTPException as exc:
            status = exc.status
            exc.headers["X-Request-Id"] = rid
            raise
        except asyncio.CancelledError:
            status = CLIENT_CLOSED
            raise
        finally:
            seconds = time.perf_counter() - started
            request_id.reset(token)
            if span is not None:
                otel_context.detach(attached)  # type: ignore[arg-type]
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(StatusCode.ERROR)
                span.end()
            recorded = recorder(route, method)
            if recorded is not None:
                recorded.finished(str(status), seconds)
            if access is not None and route not in _QUIET_ROUTES and access.enabled:
                access.request(
                    transport="http",
                    method=method,
                    route=route,
                    outcome=str(status),
                    seconds=seconds,
                    request_id=rid,
                    user_id=request.match_info.get("user_id") or request.query.get("anonymous_id", ""),
                    peer=request.remote or "",
                )

    return observed
