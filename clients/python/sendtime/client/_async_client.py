"""The async client: one grpc.aio channel, the API key on every call, a
deadline on every call, retries on UNAVAILABLE, typed errors."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, Self

import grpc
import grpc.aio

from sendtime.client import _config
from sendtime.client._broadcasts import (
    Broadcast,
    Segment,
    SegmentCount,
    SegmentMember,
    broadcast_from_proto,
    count_from_proto,
    create_broadcast_request,
    members_from_proto,
    segment_from_proto,
)
from sendtime.client._content import (
    Content,
    RenderedEmail,
    content_from_proto,
    content_request,
    email_from_proto,
    render_request,
)
from sendtime.client._delivery import (
    Delivery,
    DeliveryPage,
    FlowSummary,
    delivery_from_proto,
    flow_from_proto,
    get_request,
    list_request,
    page_from_proto,
    send_request,
)
from sendtime.client._events import Ack, ack_from_proto, identify_event, track_event
from sendtime.client._retry import RetryPolicy, retry_async
from sendtime.client._stream import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_LINGER,
    DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_RECONNECT_TIMEOUT,
    EventStream,
    StreamCall,
)
from sendtime.v1 import broadcast_service_pb2 as pb
from sendtime.v1 import (
    broadcast_service_pb2_grpc,
    content_service_pb2,
    content_service_pb2_grpc,
    delivery_service_pb2,
    delivery_service_pb2_grpc,
    event_pb2,
    event_service_pb2,
    event_service_pb2_grpc,
    profile_service_pb2,
    profile_service_pb2_grpc,
)


class AsyncClient:
    """An async client for one sendtime server.

        async with AsyncClient("127.0.0.1:50051", api_key) as client:
            await client.track("Product Viewed", {"product_id": "p1"}, user_id="u1")

    Every call has a deadline (``default_timeout`` seconds unless the call
    gives ``timeout``), and is retried with backoff on UNAVAILABLE within that
    deadline. Failures raise ``SendtimeError`` subclasses. The channel opens
    on first use, inside the running event loop.
    """

    def __init__(
        self,
        target: str,
        api_key: str,
        *,
        tls: bool | grpc.ChannelCredentials = False,
        default_timeout: float = _config.DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        channel_options: _config.ChannelOptions = (),
    ) -> None:
        self.target = target
        self.default_timeout = _config.check_timeout(default_timeout)
        self._metadata = _config.auth_metadata(api_key)
        self._credentials = _config.credentials(tls)
        self._options = _config.channel_options(channel_options)
        self._retry = retry or RetryPolicy()
        self._channel: grpc.aio.Channel | None = None
        self._events: event_service_pb2_grpc.EventServiceAsyncStub | None = None
        self._profiles: profile_service_pb2_grpc.ProfileServiceAsyncStub | None = None
        self._content: content_service_pb2_grpc.ContentServiceAsyncStub | None = None
        self._deliveries: delivery_service_pb2_grpc.DeliveryServiceAsyncStub | None = None
        self._streams: set[EventStream] = set()
        self._closed = False
        self._segments: broadcast_service_pb2_grpc.SegmentServiceAsyncStub | None = None
        self._broadcasts: broadcast_service_pb2_grpc.BroadcastServiceAsyncStub | None = None

    # -------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Abort open streams (un-acked events fail with ``Cancelled``: close
        or flush streams first to keep them) and close the channel."""
        self._closed = True
        for stream in list(self._streams):
            await stream.abort()
        if self._channel is not None:
            await self._channel.close(None)
            self._channel = None

    def _stubs(
        self,
    ) -> tuple[
        event_service_pb2_grpc.EventServiceAsyncStub,
        profile_service_pb2_grpc.ProfileServiceAsyncStub,
        content_service_pb2_grpc.ContentServiceAsyncStub,
        delivery_service_pb2_grpc.DeliveryServiceAsyncStub,
    ]:
        if self._closed:
            raise RuntimeError("the client is closed")
        if (
            self._events is None
            or self._profiles is None
            or self._content is None
            or self._deliveries is None
        ):
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(self.target, options=self._options)
            else:
                self._channel = grpc.aio.secure_channel(self.target, self._credentials, options=self._options)
            self._events = event_service_pb2_grpc.EventServiceStub(self._channel)
            self._profiles = profile_service_pb2_grpc.ProfileServiceStub(self._channel)
            self._content = content_service_pb2_grpc.ContentServiceStub(self._channel)
            self._deliveries = delivery_service_pb2_grpc.DeliveryServiceStub(self._channel)
        return self._events, self._profiles, self._content, self._deliveries

    def _timeout(self, timeout: float | None) -> float:
        return self.default_timeout if timeout is None else _config.check_timeout(timeout)

    # ------------------------------------------------------------------ ingest

    async def send_event(
        self,
        event: event_pb2.Event,
        *,
        # The timeout becomes the call's gRPC deadline, which the server sees too;
        # asyncio.timeout around the call could not tell the server.
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Ack:
        """Ingest one prepared event. A rejected event raises ``InvalidArgument``
        whose ``field_violations`` name the fields at fault."""
        stub = self._stubs()[0]
        request = event_service_pb2.IngestEventRequest(event=event)

        async def attempt(seconds: float) -> event_service_pb2.IngestEventResponse:
            return await stub.IngestEvent(request, timeout=seconds, metadata=self._metadata)

        response = await retry_async(attempt, self._timeout(timeout), self._retry)
        return ack_from_proto(response.ack)

    async def track(
        self,
        name: str,
        properties: Mapping[str, Any] | None = None,
        *,
        user_id: str | None = None,
        anonymous_id: str | None = None,
        message_id: str | None = None,
        timestamp: dt.datetime | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Ack:
        """Track an action; see ``track_event`` for the arguments."""
        event = track_event(
            name,
            properties,
            user_id=user_id,
            anonymous_id=anonymous_id,
            message_id=message_id,
            timestamp=timestamp,
        )
        return await self.send_event(event, timeout=timeout)

    async def identify(
        self,
        user_id: str | None = None,
        *,
        anonymous_id: str | None = None,
        email: str | None = None,
        first_name: str | None = None,
        last_name: str | None = None,
        locale: str | None = None,
        timezone: str | None = None,
        consent: Mapping[str, bool] | None = None,
        traits: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        timestamp: dt.datetime | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Ack:
        """Say who a user is; see ``identify_event`` for the arguments."""
        event = identify_event(
            user_id,
            anonymous_id=anonymous_id,
            email=email,
            first_name=first_name,
            last_name=last_name,
            locale=locale,
            timezone=timezone,
            consent=consent,
            traits=traits,
            message_id=message_id,
            timestamp=timestamp,
        )
        return await self.send_event(event, timeout=timeout)

    async def ingest(
        self,
        events: Iterable[event_pb2.Event],
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> list[Ack]:
        """Ingest a batch (at most 2,500 events) in one call: one ack per event,
        in order. A bad event is rejected in its ack; the good ones are stored."""
        stub = self._stubs()[0]
        request = event_service_pb2.IngestEventsRequest(events=events)

        async def attempt(seconds: float) -> event_service_pb2.IngestEventsResponse:
            return await stub.IngestEvents(request, timeout=seconds, metadata=self._metadata)

        response = await retry_async(attempt, self._timeout(timeout), self._retry)
        return [ack_from_proto(ack) for ack in response.acks]

    def stream(
        self,
        *,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        batch_size: int = DEFAULT_BATCH_SIZE,
        linger: float = DEFAULT_LINGER,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        reconnect_timeout: float | None = DEFAULT_RECONNECT_TIMEOUT,
        retry: RetryPolicy | None = None,
    ) -> EventStream:
        """A stream for high-volume ingest with backpressure; see ``EventStream``.
        ``reconnect_timeout`` bounds how long it keeps reconnecting without an
        ack before failing the un-acked events with ``Unavailable``; ``retry``
        paces the reconnects (its ``max_attempts`` does not apply)."""
        stub = self._stubs()[0]

        def open_call() -> StreamCall:
            # No deadline: the stream lives as long as the caller keeps it.
            return stub.StreamEvents(None, metadata=self._metadata)

        stream = EventStream(
            open_call,
            max_in_flight=max_in_flight,
            batch_size=batch_size,
            linger=linger,
            max_batch_bytes=max_batch_bytes,
            reconnect_timeout=reconnect_timeout,
            retry=retry,
            on_finish=self._streams.discard,
        )
        self._streams.add(stream)
        return stream

    # --------------------------------------------------------------- profiles

    async def get_profile(
        self,
        user_id: str | None = None,
        *,
        anonymous_id: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> profile_service_pb2.Profile:
        """The profile folded from a user's events (give exactly one of the
        ids). Raises ``NotFound`` when no event was ever seen for them."""
        stub = self._stubs()[1]
        request = profile_service_pb2.GetProfileRequest(
            user_id=user_id or "", anonymous_id=anonymous_id or ""
        )

        async def attempt(seconds: float) -> profile_service_pb2.GetProfileResponse:
            return await stub.GetProfile(request, timeout=seconds, metadata=self._metadata)

        response = await retry_async(attempt, self._timeout(timeout), self._retry)
        return response.profile

    # ---------------------------------------------------------------- content

    async def get_content(
        self,
        user_id: str | None = None,
        *,
        anonymous_id: str | None = None,
        blocks: Iterable[str] = (),
        campaign: str | None = None,
        locale: str | None = None,
        cart_id: str | None = None,
        # The deadline is the server's time budget for the blocks: set what the
        # send can wait (e.g. 0.2), not the client's generous default.
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Content:
        """Named content blocks for a user (give exactly one of the ids); every
        built-in block when ``blocks`` is empty. A block the server could not
        fetch in time comes back stale or as a fallback, never as an error."""
        stub = self._stubs()[2]
        request = content_request(user_id, anonymous_id, blocks, campaign, locale, cart_id)

        async def attempt(seconds: float) -> content_service_pb2.GetContentResponse:
            return await stub.GetContent(request, timeout=seconds, metadata=self._metadata)

        return content_from_proto(await retry_async(attempt, self._timeout(timeout), self._retry))

    async def render_email(
        self,
        template_id: str,
        user_id: str | None = None,
        *,
        anonymous_id: str | None = None,
        campaign: str | None = None,
        locale: str | None = None,
        cart_id: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> RenderedEmail:
        """A whole email for a user from the server's template ``template_id``;
        the deadline is its budget, as for ``get_content``. Raises ``NotFound``
        for an unknown template."""
        stub = self._stubs()[2]
        request = render_request(template_id, user_id, anonymous_id, campaign, locale, cart_id)

        async def attempt(seconds: float) -> content_service_pb2.RenderEmailResponse:
            return await stub.RenderEmail(request, timeout=seconds, metadata=self._metadata)

        return email_from_proto(await retry_async(attempt, self._timeout(timeout), self._retry))

    # ------------------------------------------------------------- deliveries

    async def send_email(
        self,
        template_id: str,
        *,
        user_id: str | None = None,
        anonymous_id: str | None = None,
        idempotency_key: str,
        transactional: bool = False,
        subscription_group: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Delivery:
        """Send the server's template ``template_id`` to a user now (give
        exactly one of the ids); needs the "send" scope. The delivery comes
        back scheduled: follow it with ``get_delivery``. The same
        ``idempotency_key`` (at most 100 characters) is the same send: asking
        again returns the first delivery and never sends twice, which is also
        why retrying this call is safe. Marketing sends need consent for
        ``subscription_group`` (default "marketing"); transactional ones skip
        consent, suppression, caps and quiet hours. Raises ``NotFound`` for an
        unknown template."""
        stub = self._stubs()[3]
        request = send_request(
            template_id, user_id, anonymous_id, idempotency_key, transactional, subscription_group
        )

        async def attempt(seconds: float) -> delivery_service_pb2.SendEmailResponse:
            return await stub.SendEmail(request, timeout=seconds, metadata=self._metadata)

        response = await retry_async(attempt, self._timeout(timeout), self._retry)
        return delivery_from_proto(response.delivery)

    async def get_delivery(
        self,
        id: int | None = None,
        *,
        idempotency_key: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Delivery:
        """One delivery by its id or its idempotency key (give exactly one):
        the key given to ``send_email``, or a ledger key. Raises ``NotFound``."""
        stub = self._stubs()[3]
        request = get_request(id, idempotency_key)

        async def attempt(seconds: float) -> delivery_service_pb2.GetDeliveryResponse:
            return await stub.GetDelivery(request, timeout=seconds, metadata=self._metadata)

        response = await retry_async(attempt, self._timeout(timeout), self._retry)
        return delivery_from_proto(response.delivery)

    async def list_deliveries(
        self,
        *,
        user_id: str | None = None,
        flow_id: str | None = None,
        page_size: int | None = None,
        page_token: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> DeliveryPage:
        """One page of deliveries, newest first, for a user, a flow, both or
        all; ``page_size`` at most 500 (default: the server's, 50). Pass the
        page's ``next_page_token`` as ``page_token`` for the next one."""
        stub = self._stubs()[3]
        request = list_request(user_id, flow_id, page_size, page_token)

        async def attempt(seconds: float) -> delivery_service_pb2.ListDeliveriesResponse:
            return await stub.ListDeliveries(request, timeout=seconds, metadata=self._metadata)

        return page_from_proto(await retry_async(attempt, self._timeout(timeout), self._retry))

    async def list_flows(
        self,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> list[FlowSummary]:
        """The server's configured flows with their deliveries counted by status."""
        stub = self._stubs()[3]
        request = delivery_service_pb2.ListFlowsRequest()

        async def attempt(seconds: float) -> delivery_service_pb2.ListFlowsResponse:
            return await stub.ListFlows(request, timeout=seconds, metadata=self._metadata)

        response = await retry_async(attempt, self._timeout(timeout), self._retry)
        return [flow_from_proto(flow) for flow in response.flows]

    # -- segments and broadcasts

    def _broadcast_stubs(
        self,
    ) -> tuple[
        broadcast_service_pb2_grpc.SegmentServiceAsyncStub,
        broadcast_service_pb2_grpc.BroadcastServiceAsyncStub,
    ]:
        self._stubs()  # the channel, opened on first use
        channel = self._channel
        assert channel is not None
        if self._segments is None or self._broadcasts is None:
            self._segments = broadcast_service_pb2_grpc.SegmentServiceStub(channel)
            self._broadcasts = broadcast_service_pb2_grpc.BroadcastServiceStub(channel)
        return self._segments, self._broadcasts

    async def create_segment(
        self,
        name: str,
        expression: str,
        *,
        description: str = "",
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Segment:
        """Make or replace a segment made through the API (not one from the server's settings). A bad expression raises ``InvalidArgument`` naming the bad part of it."""
        stub = self._broadcast_stubs()[0]
        request = pb.CreateSegmentRequest(
            segment=pb.Segment(name=name, expression=expression, description=description)
        )

        async def attempt(seconds: float) -> pb.CreateSegmentResponse:
            return await stub.CreateSegment(request, timeout=seconds, metadata=self._metadata)

        response = await retry_async(attempt, self._timeout(timeout), self._retry)
        return segment_from_proto(response.segment)

    async def get_segment(
        self,
        name: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Segment:
        """A segment by name."""
        stub = self._broadcast_stubs()[0]
        request = pb.GetSegmentRequest(name=name)

        async def attempt(seconds: float) -> pb.GetSegmentResponse:
            return await stub.GetSegment(request, timeout=seconds, metadata=self._metadata)

        response = await retry_async(attempt, self._timeout(timeout), self._retry)
        return segment_from_proto(response.segment)

    async def list_segments(
        self,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> list[Segment]:
        """Every segment, those from the server's settings and those made through the API, by name."""
        stub = self._broadcast_stubs()[0]
        request = pb.ListSegmentsRequest()

        async def attempt(seconds: float) -> pb.ListSegmentsResponse:
            return await stub.ListSegments(request, timeout=seconds, metadata=self._metadata)

        response = await retry_async(attempt, self._timeout(timeout), self._retry)
        return [segment_from_proto(s) for s in response.segments]

    async def count_segment(
        self,
        *,
        segment: str | None = None,
        expression: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> SegmentCount:
        """How many stored profiles are in a segment (by name) or an expression, now."""
        stub = self._broadcast_stubs()[0]
        request = pb.CountSegmentRequest(segment=segment or "", expression=expression or "")

        async def attempt(seconds: float) -> pb.CountSegmentResponse:
            return await stub.CountSegment(request, timeout=seconds, metadata=self._metadata)

        response = await retry_async(attempt, self._timeout(timeout), self._retry)
        return count_from_proto(response)

    async def sample_segment(
        self,
        *,
        segment: str | None = None,
        expression: str | None = None,
        limit: int = 10,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> list[SegmentMember]:
        """A few users in a segment or an expression (at most ``limit``, 1 to 100)."""
        stub = self._broadcast_stubs()[0]
        request = pb.SampleSegmentRequest(segment=segment or "", expression=expression or "", limit=limit)

        async def attempt(seconds: float) -> pb.SampleSegmentResponse:
            return await stub.SampleSegment(request, timeout=seconds, metadata=self._metadata)

        response = await retry_async(attempt, self._timeout(timeout), self._retry)
        return members_from_proto(response)

    async def create_broadcast(
        self,
        template_id: str,
        *,
        idempotency_key: str,
        segment: str | None = None,
        expression: str | None = None,
        name: str | None = None,
        transactional: bool = False,
        subscription_group: str | None = None,
        sender: str | None = None,
        send_time: dt.datetime | None = None,
        local_time: str | None = None,
        fallback_time_zone: str | None = None,
        rate_limit: float = 0.0,
        end_time: dt.datetime | None = None,
        require_blocks: Iterable[str] = (),
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Broadcast:
        """Send ``template_id`` to a segment (by name) or an expression's users: now, at ``send_time`` (aware), or at ``local_time`` ("2026-12-04T19:00") in each user's zone (``fallback_time_zone`` when unknown), at most ``rate_limit`` emails/s, none after ``end_time``. The same ``idempotency_key`` returns the first broadcast."""
        stub = self._broadcast_stubs()[1]
        request = create_broadcast_request(
            template_id,
            idempotency_key,
            segment=segment,
            expression=expression,
            name=name,
            transactional=transactional,
            subscription_group=subscription_group,
            sender=sender,
            send_time=send_time,
            local_time=local_time,
            fallback_time_zone=fallback_time_zone,
            rate_limit=rate_limit,
            end_time=end_time,
            require_blocks=require_blocks,
        )

        async def attempt(seconds: float) -> pb.CreateBroadcastResponse:
            return await stub.CreateBroadcast(request, timeout=seconds, metadata=self._metadata)

        response = await retry_async(attempt, self._timeout(timeout), self._retry)
        return broadcast_from_proto(response.broadcast)

    async def get_broadcast(
        self,
        id: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Broadcast:
        """A broadcast and its progress."""
        stub = self._broadcast_stubs()[1]
        request = pb.GetBroadcastRequest(id=id)

        async def attempt(seconds: float) -> pb.GetBroadcastResponse:
            return await stub.GetBroadcast(request, timeout=seconds, metadata=self._metadata)

        response = await retry_async(attempt, self._timeout(timeout), self._retry)
        return broadcast_from_proto(response.broadcast)

    async def list_broadcasts(
        self,
        *,
        active_only: bool = False,
        page_size: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> list[Broadcast]:
        """Broadcasts, newest first, with their progress."""
        stub = self._broadcast_stubs()[1]
        request = pb.ListBroadcastsRequest(active_only=active_only, page_size=page_size or 0)

        async def attempt(seconds: float) -> pb.ListBroadcastsResponse:
            return await stub.ListBroadcasts(request, timeout=seconds, metadata=self._metadata)

        response = await retry_async(attempt, self._timeout(timeout), self._retry)
        return [broadcast_from_proto(b) for b in response.broadcasts]

    async def pause_broadcast(
        self,
        id: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Broadcast:
        """No more of its emails go out (within a second) until resumed."""
        stub = self._broadcast_stubs()[1]
        request = pb.PauseBroadcastRequest(id=id)

        async def attempt(seconds: float) -> pb.PauseBroadcastResponse:
            return await stub.PauseBroadcast(request, timeout=seconds, metadata=self._metadata)

        response = await retry_async(attempt, self._timeout(timeout), self._retry)
        return broadcast_from_proto(response.broadcast)

    async def resume_broadcast(
        self,
        id: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Broadcast:
        """The rest go at their own times again, at the same rate, from now."""
        stub = self._broadcast_stubs()[1]
        request = pb.ResumeBroadcastRequest(id=id)

        async def attempt(seconds: float) -> pb.ResumeBroadcastResponse:
            return await stub.ResumeBroadcast(request, timeout=seconds, metadata=self._metadata)

        response = await retry_async(attempt, self._timeout(timeout), self._retry)
        return broadcast_from_proto(response.broadcast)

    async def cancel_broadcast(
        self,
        id: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Broadcast:
        """The rest are cancelled; what was sent stays sent."""
        stub = self._broadcast_stubs()[1]
        request = pb.CancelBroadcastRequest(id=id)

        async def attempt(seconds: float) -> pb.CancelBroadcastResponse:
            return await stub.CancelBroadcast(request, timeout=seconds, metadata=self._metadata)

        response = await retry_async(attempt, self._timeout(timeout), self._retry)
        return broadcast_from_proto(response.broadcast)
