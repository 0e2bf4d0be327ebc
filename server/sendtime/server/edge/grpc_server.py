"""The gRPC edge: servicers, the API-key interceptor, health and reflection.

Thin by design: decode, call the domain, encode. Errors go through
grpc_errors; scopes are decided by the table below, not by each method.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import grpc
import grpc.aio
import msgspec
from grpc_health.v1 import _async as health_aio  # the asyncio servicer, re-exported as health.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from sendtime.server.auth import Authenticator
from sendtime.server.broadcasting import Broadcasts, Segments
from sendtime.server.deliveries import Deliveries
from sendtime.server.domain.content import ContentPipeline
from sendtime.server.domain.errors import (
    FieldViolation,
    InvalidInput,
    PermissionDenied,
    SendtimeError,
    Unavailable,
)
from sendtime.server.domain.events import MAX_BATCH_EVENTS, Identity
from sendtime.server.domain.ingest import Ack, Ingestor, Outcome
from sendtime.server.domain.queries import ProfileQueries
from sendtime.server.edge import grpc_broadcasts
from sendtime.server.edge import grpc_convert as convert
from sendtime.server.edge import grpc_decode as decode
from sendtime.server.edge.grpc_errors import abort, mapped_errors, status_for
from sendtime.server.edge.grpc_observe import ObserveInterceptor
from sendtime.server.observe import Telemetry
from sendtime.server.settings import GrpcSettings, Scope
from sendtime.v1 import (
    broadcast_service_pb2,
    content_service_pb2,
    content_service_pb2_grpc,
    delivery_service_pb2,
    delivery_service_pb2_grpc,
    event_service_pb2,
    profile_service_pb2,
    profile_service_pb2_grpc,
)

log = logging.getLogger(__name__)

SERVICE_NAMES: Final = (
    event_service_pb2.DESCRIPTOR.services_by_name["EventService"].full_name,
    profile_service_pb2.DESCRIPTOR.services_by_name["ProfileService"].full_name,
    content_service_pb2.DESCRIPTOR.services_by_name["ContentService"].full_name,
    delivery_service_pb2.DESCRIPTOR.services_by_name["DeliveryService"].full_name,
    *grpc_broadcasts.SERVICE_NAMES,
)
#: Which scope each of our services needs. Methods of our package that are not
#: listed here are refused; health and reflection are open, as probes expect.
SCOPES: Final[Mapping[str, Scope]] = {
    "sendtime.v1.EventService": Scope.INGEST,
    "sendtime.v1.ProfileService": Scope.CONTENT,
    "sendtime.v1.ContentService": Scope.CONTENT,
    "sendtime.v1.DeliveryService": Scope.SEND,
    "sendtime.v1.SegmentService": Scope.SEND,
    "sendtime.v1.BroadcastService": Scope.SEND,
}
_OUR_PACKAGE: Final = "/sendtime."

Context = grpc.aio.ServicerContext[Any, Any]
if TYPE_CHECKING:  # grpc's handler type is generic only in its stubs
    MethodHandler = grpc.RpcMethodHandler[Any, Any]


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, authenticator: Authenticator) -> None:
        self._auth = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[MethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> MethodHandler:
        method: str = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or not method.startswith(_OUR_PACKAGE):
            # no such method: UNIMPLEMENTED, as for any gRPC server (reflection
            # lists the methods openly, so this tells a caller nothing new)
            return handler
        service = method[1:].split("/", 1)[0]
        try:
            scope = SCOPES.get(service)
            if scope is None:
                raise PermissionDenied(f"no API key may call {method}")
            self._auth.authorize(_bearer(handler_call_details.invocation_metadata), scope)
        except SendtimeError as error:
            return _refusal(handler, error)
        return handler


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def _refusal(handler: MethodHandler, error: SendtimeError) -> MethodHandler:
    """A handler of the same shape as ``handler`` that fails with ``error``."""

    async def refuse(_request: object, context: Context) -> None:
        await abort(context, error)

    codecs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **codecs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **codecs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **codecs)
    return grpc.unary_unary_rpc_method_handler(refuse, **codecs)


class _Window:
    """Bounds the events one stream has read but not yet acked, so a fast
    producer is slowed by flow control instead of filling memory."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._used = 0
        self._freed = asyncio.Event()

    async def acquire(self, n: int) -> None:
        # A message larger than the whole window still passes when nothing else is in flight.
        while self._used and self._used + n > self._limit:
            self._freed.clear()
            await self._freed.wait()
        self._used += n

    def release(self, n: int) -> None:
        self._used -= n
        self._freed.set()


class EventService:
    """Its requests arrive through grpc_decode's decoders (see add_event_service),
    as the message or the InvalidInput that says why it is not one."""

    def __init__(self, ingestor: Ingestor, settings: GrpcSettings) -> None:
        self._ingestor = ingestor
        self._window = settings.stream_window_events
        self._stream_readers: set[asyncio.Task[None]] = set()
        self._draining = False

    @mapped_errors
    async def IngestEvent(
        self, request: event_service_pb2.IngestEventRequest | InvalidInput, context: Context
    ) -> event_service_pb2.IngestEventResponse:
        if isinstance(request, InvalidInput):
            raise request
        (ack,) = await self._ingestor.ingest([convert.incoming_event(request.event)])
        if ack.outcome is Outcome.REJECTED and ack.error is not None:
            raise InvalidInput(
                ack.error.message,
                [
                    FieldViolation(f"event.{convert.proto_field(v.field)}", v.description)
                    for v in ack.error.violations
                ],
                reason=ack.error.reason,
            )
        return event_service_pb2.IngestEventResponse(ack=convert.event_ack(ack))

    @mapped_errors
    async def IngestEvents(
        self, request: decode.EventBatch | InvalidInput, context: Context
    ) -> event_service_pb2.IngestEventsResponse:
        events = _checked(request).events
        acks = await self._ingestor.ingest([convert.incoming_event(e) for e in events])
        return event_service_pb2.IngestEventsResponse(acks=convert.event_acks(acks))

    async def StreamEvents(
        self,
        request_iterator: AsyncIterator[decode.EventBatch | InvalidInput],
        context: Context,
    ) -> AsyncIterator[event_service_pb2.StreamEventsResponse]:
        """Reads and acks concurrently: a reader task hands each message to the
        ingestor as it arrives, and this generator sends acks in order as each
        message's events become durable."""
        if self.is_draining():
            await abort(context, Unavailable("the server is shutting down; reconnect"))
        window = _Window(self._window)
        pending: asyncio.Queue[tuple[int, asyncio.Future[list[Ack]]] | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    # ends the stream with this status once the messages before it are acked
                    events = _checked(request, "in one message").events
                    incoming = [convert.incoming_event(e) for e in events]
                    await window.acquire(len(incoming))
                    pending.put_nowait(
                        (len(incoming), asyncio.ensure_future(self._ingestor.ingest(incoming)))
                    )
            finally:
                pending.put_nowait(None)

        reader = asyncio.create_task(read())
        self._stream_readers.add(reader)
        reader.add_done_callback(self._stream_readers.discard)
        try:
            while (item := await pending.get()) is not None:
                count, acks = item
                try:
                    response = event_service_pb2.StreamEventsResponse(acks=convert.event_acks(await acks))
                except SendtimeError as error:
                    reader.cancel()
                    await abort(context, error)
                window.release(count)
                yield response
            if reader.cancelled() and self.is_draining():
                # Every event read so far is acked above; the client resends the rest elsewhere.
                await abort(context, Unavailable("the server is shutting down; reconnect"))
            try:
                reader.result()  # surface an error from reading the stream
            except SendtimeError as error:
                await abort(context, error)
        finally:
            reader.cancel()

    def is_draining(self) -> bool:
        # a method, not an attribute, so type checkers do not assume it stays as first read
        return self._draining

    def drain(self) -> None:
        """Stop reading from open streams; each flushes its acks and ends."""
        self._draining = True
        for reader in list(self._stream_readers):
            reader.cancel()


def _checked(request: decode.EventBatch | InvalidInput, where: str = "") -> decode.EventBatch:
    """The batch, if it is one within the limit."""
    if isinstance(request, InvalidInput):
        raise request
    if len(request.events) > MAX_BATCH_EVENTS:
        raise InvalidInput.field(
            "events",
            f"holds {len(request.events)} events; the limit is {MAX_BATCH_EVENTS}{' ' + where if where else ''}",
            reason="TOO_MANY_EVENTS",
        )
    return request


def add_event_service(servicer: EventService, server: grpc.aio.Server) -> None:
    """Registers EventService by hand, not with the generated add_..._to_server:
    its handlers decode with FromString, which ends a call as UNKNOWN on bytes
    that are not the message, and fails a whole batch for one bad event."""
    name = event_service_pb2.DESCRIPTOR.services_by_name["EventService"].full_name
    handlers = {
        "IngestEvent": grpc.unary_unary_rpc_method_handler(
            servicer.IngestEvent,
            request_deserializer=decode.event_request,
            response_serializer=event_service_pb2.IngestEventResponse.SerializeToString,
        ),
        "IngestEvents": grpc.unary_unary_rpc_method_handler(
            servicer.IngestEvents,
            request_deserializer=decode.event_batch,
            response_serializer=event_service_pb2.IngestEventsResponse.SerializeToString,
        ),
        "StreamEvents": grpc.stream_stream_rpc_method_handler(
            servicer.StreamEvents,
            request_deserializer=decode.event_batch,
            response_serializer=event_service_pb2.StreamEventsResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    # as the generated code does (grpc's stubs do not know this method yet)
    server.add_registered_method_handlers(name, handlers)  # type: ignore[attr-defined]


class ProfileService(profile_service_pb2_grpc.ProfileServiceServicer):
    def __init__(self, queries: ProfileQueries) -> None:
        self._queries = queries

    @mapped_errors
    async def GetProfile(
        self, request: profile_service_pb2.GetProfileRequest, context: Context
    ) -> profile_service_pb2.GetProfileResponse:
        view = await self._queries.get(user_id=request.user_id, anonymous_id=request.anonymous_id)
        extra = msgspec.json.encode(view.extra_traits) if view.extra_traits else b""
        return profile_service_pb2.GetProfileResponse(profile=convert.profile(view, extra))


class ContentService(content_service_pb2_grpc.ContentServiceServicer):
    """The caller's remaining deadline is the budget; without one, the default."""

    def __init__(self, pipeline: ContentPipeline, default_deadline_s: float) -> None:
        self._pipeline = pipeline
        self._default_deadline_s = default_deadline_s

    def _budget(self, context: Context) -> float:
        remaining = context.time_remaining()
        return self._default_deadline_s if remaining is None else remaining

    @mapped_errors
    async def GetContent(
        self, request: content_service_pb2.GetContentRequest, context: Context
    ) -> content_service_pb2.GetContentResponse:
        budget = self._budget(context)
        answer = await self._pipeline.content(
            Identity.exactly_one(request.user_id, request.anonymous_id),
            list(request.blocks),
            convert.content_context(request.context),
            budget,
        )
        response = content_service_pb2.GetContentResponse(
            blocks=[convert.content_block(b) for b in answer.blocks],
            server_time=convert.duration(answer.elapsed_s),
            budget=convert.duration(budget),
        )
        self._pipeline.left("content", answer.deadline)
        return response

    @mapped_errors
    async def RenderEmail(
        self, request: content_service_pb2.RenderEmailRequest, context: Context
    ) -> content_service_pb2.RenderEmailResponse:
        if not request.template_id:
            raise InvalidInput.field("template_id", "is required")
        budget = self._budget(context)
        answer = await self._pipeline.email(
            request.template_id,
            Identity.exactly_one(request.user_id, request.anonymous_id),
            convert.content_context(request.context),
            budget,
        )
        email = answer.email
        response = content_service_pb2.RenderEmailResponse(
            subject=email.subject,
            preheader=email.preheader,
            html=email.html,
            text=email.text,
            template_id=email.template_id,
            template_version=email.version,
            blocks=[convert.content_block(b) for b in answer.blocks],
            server_time=convert.duration(answer.elapsed_s),
            budget=convert.duration(budget),
        )
        self._pipeline.left("email", answer.deadline)
        return response


class DeliveryService(delivery_service_pb2_grpc.DeliveryServiceServicer):
    def __init__(self, deliveries: Deliveries) -> None:
        self._deliveries = deliveries

    @mapped_errors
    async def SendEmail(
        self, request: delivery_service_pb2.SendEmailRequest, context: Context
    ) -> delivery_service_pb2.SendEmailResponse:
        record = await self._deliveries.send_now(
            template_id=request.template_id,
            identity=Identity.exactly_one(request.user_id, request.anonymous_id),
            idempotency_key=request.idempotency_key,
            transactional=request.transactional,
            subscription_group=request.subscription_group,
        )
        return delivery_service_pb2.SendEmailResponse(delivery=convert.delivery(record))

    @mapped_errors
    async def GetDelivery(
        self, request: delivery_service_pb2.GetDeliveryRequest, context: Context
    ) -> delivery_service_pb2.GetDeliveryResponse:
        record = await self._deliveries.get(send_id=request.id, idempotency_key=request.idempotency_key)
        return delivery_service_pb2.GetDeliveryResponse(delivery=convert.delivery(record))

    @mapped_errors
    async def ListDeliveries(
        self, request: delivery_service_pb2.ListDeliveriesRequest, context: Context
    ) -> delivery_service_pb2.ListDeliveriesResponse:
        records, token = await self._deliveries.list_deliveries(
            identity=Identity(request.user_id) if request.user_id else None,
            flow_id=request.flow_id,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return delivery_service_pb2.ListDeliveriesResponse(
            deliveries=[convert.delivery(r) for r in records], next_page_token=token
        )

    @mapped_errors
    async def ListFlows(
        self, request: delivery_service_pb2.ListFlowsRequest, context: Context
    ) -> delivery_service_pb2.ListFlowsResponse:
        flows = await self._deliveries.flows()
        return delivery_service_pb2.ListFlowsResponse(
            flows=[convert.flow_summary(f.flow, f.counts) for f in flows]
        )


def _method_names() -> list[str]:
    """Every method this server serves, as "/package.Service/Method"."""
    files = (
        event_service_pb2.DESCRIPTOR,
        profile_service_pb2.DESCRIPTOR,
        content_service_pb2.DESCRIPTOR,
        delivery_service_pb2.DESCRIPTOR,
        broadcast_service_pb2.DESCRIPTOR,
        health_pb2.DESCRIPTOR,
        reflection_pb2.DESCRIPTOR,
    )
    return [
        f"/{service.full_name}/{method.name}"
        for descriptor in files
        for service in descriptor.services_by_name.values()
        for method in service.methods
    ]


@dataclass
class GrpcEdge:
    server: grpc.aio.Server
    health: health_aio.HealthServicer
    events: EventService
    port: int

    async def start(self) -> None:
        await self.server.start()
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        self.events.drain()
        await self.server.stop(grace)


def _limits(settings: GrpcSettings) -> list[tuple[str, int]]:
    """Bounds on connections and streams, so that many idle or slow clients
    cannot hold the server's memory and file descriptors."""
    return [
        ("grpc.max_allowed_incoming_connections", settings.max_connections),
        ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
        ("grpc.server_handshake_timeout_ms", round(settings.handshake_timeout_s * 1000)),
        ("grpc.max_connection_idle_ms", round(settings.idle_timeout_s * 1000)),
        ("grpc.keepalive_time_ms", round(settings.keepalive_interval_s * 1000)),
        ("grpc.keepalive_timeout_ms", round(settings.keepalive_timeout_s * 1000)),
    ]


def build_grpc_edge(
    settings: GrpcSettings,
    *,
    ingestor: Ingestor,
    queries: ProfileQueries,
    pipeline: ContentPipeline,
    default_deadline_s: float,
    deliveries: Deliveries,
    segments: Segments,
    broadcasts: Broadcasts,
    authenticator: Authenticator,
    telemetry: Telemetry,
) -> GrpcEdge:
    interceptors: list[grpc.aio.ServerInterceptor] = [AuthInterceptor(authenticator)]  # type: ignore[type-arg]
    if telemetry.records_requests():
        # first: it sees every call, the ones the key check refuses too
        interceptors.insert(0, ObserveInterceptor(telemetry, _method_names()))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            # a second server on the same port must fail loudly, not share it,
            # unless it is one of the workers of `serve --workers`
            ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
            *_limits(settings),
        ],
        # beyond it a call is answered RESOURCE_EXHAUSTED at once
        maximum_concurrent_rpcs=settings.max_concurrent_calls,
    )
    events = EventService(ingestor, settings)
    add_event_service(events, server)
    decode.add_service(
        profile_service_pb2_grpc.add_ProfileServiceServicer_to_server, ProfileService(queries), server
    )
    decode.add_service(
        content_service_pb2_grpc.add_ContentServiceServicer_to_server,
        ContentService(pipeline, default_deadline_s),
        server,
    )
    decode.add_service(
        delivery_service_pb2_grpc.add_DeliveryServiceServicer_to_server, DeliveryService(deliveries), server
    )
    grpc_broadcasts.add_broadcast_services(server, segments, broadcasts)
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{settings.host}:{settings.port}"
    try:
        if settings.tls is not None:
            credentials = grpc.ssl_server_credentials(
                [(settings.tls.key_file.read_bytes(), settings.tls.cert_file.read_bytes())]
            )
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise Unavailable(f"cannot listen for gRPC on {address}: {exc}") from None
    if port == 0:
        raise Unavailable(f"cannot listen for gRPC on {address}")
    return GrpcEdge(server=server, health=health_servicer, events=events, port=port)


__all__ = ["GrpcEdge", "build_grpc_edge", "status_for"]
