"""The blocking client: the unary calls of ``AsyncClient`` over a grpc sync
channel, for plain code (scripts, WSGI apps, the CLI)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, Self

import grpc

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
from sendtime.client._retry import RetryPolicy, retry_sync
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


class Client:
    """A blocking client for one sendtime server; same calls, deadlines,
    retries and errors as ``AsyncClient`` (without streams).

        with Client("127.0.0.1:50051", api_key) as client:
            client.identify("u1", email="ada@example.com", consent={"marketing": True})
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
        self._retry = retry or RetryPolicy()
        credentials = _config.credentials(tls)
        options = _config.channel_options(channel_options)
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._events = event_service_pb2_grpc.EventServiceStub(self._channel)
        self._profiles = profile_service_pb2_grpc.ProfileServiceStub(self._channel)
        self._content = content_service_pb2_grpc.ContentServiceStub(self._channel)
        self._deliveries = delivery_service_pb2_grpc.DeliveryServiceStub(self._channel)
        self._segments = broadcast_service_pb2_grpc.SegmentServiceStub(self._channel)
        self._broadcasts = broadcast_service_pb2_grpc.BroadcastServiceStub(self._channel)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _timeout(self, timeout: float | None) -> float:
        return self.default_timeout if timeout is None else _config.check_timeout(timeout)

    def send_event(self, event: event_pb2.Event, *, timeout: float | None = None) -> Ack:
        """Ingest one prepared event; a rejected one raises ``InvalidArgument``."""
        request = event_service_pb2.IngestEventRequest(event=event)

        def attempt(seconds: float) -> event_service_pb2.IngestEventResponse:
            return self._events.IngestEvent(request, timeout=seconds, metadata=self._metadata)

        return ack_from_proto(retry_sync(attempt, self._timeout(timeout), self._retry).ack)

    def track(
        self,
        name: str,
        properties: Mapping[str, Any] | None = None,
        *,
        user_id: str | None = None,
        anonymous_id: str | None = None,
        message_id: str | None = None,
        timestamp: dt.datetime | None = None,
        timeout: float | None = None,
    ) -> Ack:
        event = track_event(
            name,
            properties,
            user_id=user_id,
            anonymous_id=anonymous_id,
            message_id=message_id,
            timestamp=timestamp,
        )
        return self.send_event(event, timeout=timeout)

    def identify(
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
        timeout: float | None = None,
    ) -> Ack:
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
        return self.send_event(event, timeout=timeout)

    def ingest(self, events: Iterable[event_pb2.Event], *, timeout: float | None = None) -> list[Ack]:
        request = event_service_pb2.IngestEventsRequest(events=events)

        def attempt(seconds: float) -> event_service_pb2.IngestEventsResponse:
            return self._events.IngestEvents(request, timeout=seconds, metadata=self._metadata)

        return [ack_from_proto(a) for a in retry_sync(attempt, self._timeout(timeout), self._retry).acks]

    def get_profile(
        self,
        user_id: str | None = None,
        *,
        anonymous_id: str | None = None,
        timeout: float | None = None,
    ) -> profile_service_pb2.Profile:
        request = profile_service_pb2.GetProfileRequest(
            user_id=user_id or "", anonymous_id=anonymous_id or ""
        )

        def attempt(seconds: float) -> profile_service_pb2.GetProfileResponse:
            return self._profiles.GetProfile(request, timeout=seconds, metadata=self._metadata)

        return retry_sync(attempt, self._timeout(timeout), self._retry).profile

    def get_content(
        self,
        user_id: str | None = None,
        *,
        anonymous_id: str | None = None,
        blocks: Iterable[str] = (),
        campaign: str | None = None,
        locale: str | None = None,
        cart_id: str | None = None,
        timeout: float | None = None,
    ) -> Content:
        """See ``AsyncClient.get_content``: the deadline is the server's budget."""
        request = content_request(user_id, anonymous_id, blocks, campaign, locale, cart_id)

        def attempt(seconds: float) -> content_service_pb2.GetContentResponse:
            return self._content.GetContent(request, timeout=seconds, metadata=self._metadata)

        return content_from_proto(retry_sync(attempt, self._timeout(timeout), self._retry))

    def render_email(
        self,
        template_id: str,
        user_id: str | None = None,
        *,
        anonymous_id: str | None = None,
        campaign: str | None = None,
        locale: str | None = None,
        cart_id: str | None = None,
        timeout: float | None = None,
    ) -> RenderedEmail:
        """See ``AsyncClient.render_email``."""
        request = render_request(template_id, user_id, anonymous_id, campaign, locale, cart_id)

        def attempt(seconds: float) -> content_service_pb2.RenderEmailResponse:
            return self._content.RenderEmail(request, timeout=seconds, metadata=self._metadata)

        return email_from_proto(retry_sync(attempt, self._timeout(timeout), self._retry))

    def send_email(
        self,
        template_id: str,
        *,
        user_id: str | None = None,
        anonymous_id: str | None = None,
        idempotency_key: str,
        transactional: bool = False,
        subscription_group: str | None = None,
        timeout: float | None = None,
    ) -> Delivery:
        """See ``AsyncClient.send_email``: the same key is the same send."""
        request = send_request(
            template_id, user_id, anonymous_id, idempotency_key, transactional, subscription_group
        )

        def attempt(seconds: float) -> delivery_service_pb2.SendEmailResponse:
            return self._deliveries.SendEmail(request, timeout=seconds, metadata=self._metadata)

        return delivery_from_proto(retry_sync(attempt, self._timeout(timeout), self._retry).delivery)

    def get_delivery(
        self,
        id: int | None = None,
        *,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> Delivery:
        """See ``AsyncClient.get_delivery``."""
        request = get_request(id, idempotency_key)

        def attempt(seconds: float) -> delivery_service_pb2.GetDeliveryResponse:
            return self._deliveries.GetDelivery(request, timeout=seconds, metadata=self._metadata)

        return delivery_from_proto(retry_sync(attempt, self._timeout(timeout), self._retry).delivery)

    def list_deliveries(
        self,
        *,
        user_id: str | None = None,
        flow_id: str | None = None,
        page_size: int | None = None,
        page_token: str | None = None,
        timeout: float | None = None,
    ) -> DeliveryPage:
        """See ``AsyncClient.list_deliveries``: newest first, one page."""
        request = list_request(user_id, flow_id, page_size, page_token)

        def attempt(seconds: float) -> delivery_service_pb2.ListDeliveriesResponse:
            return self._deliveries.ListDeliveries(request, timeout=seconds, metadata=self._metadata)

        return page_from_proto(retry_sync(attempt, self._timeout(timeout), self._retry))

    def list_flows(self, *, timeout: float | None = None) -> list[FlowSummary]:
        """See ``AsyncClient.list_flows``."""
        request = delivery_service_pb2.ListFlowsRequest()

        def attempt(seconds: float) -> delivery_service_pb2.ListFlowsResponse:
            return self._deliveries.ListFlows(request, timeout=seconds, metadata=self._metadata)

        return [flow_from_proto(f) for f in retry_sync(attempt, self._timeout(timeout), self._retry).flows]

    # -- segments and broadcasts

    def create_segment(
        self, name: str, expression: str, *, description: str = "", timeout: float | None = None
    ) -> Segment:
        """See ``AsyncClient.create_segment``."""
        request = pb.CreateSegmentRequest(
            segment=pb.Segment(name=name, expression=expression, description=description)
        )

        def attempt(seconds: float) -> pb.CreateSegmentResponse:
            return self._segments.CreateSegment(request, timeout=seconds, metadata=self._metadata)

        response = retry_sync(attempt, self._timeout(timeout), self._retry)
        return segment_from_proto(response.segment)

    def get_segment(self, name: str, *, timeout: float | None = None) -> Segment:
        """See ``AsyncClient.get_segment``."""
        request = pb.GetSegmentRequest(name=name)

        def attempt(seconds: float) -> pb.GetSegmentResponse:
            return self._segments.GetSegment(request, timeout=seconds, metadata=self._metadata)

        response = retry_sync(attempt, self._timeout(timeout), self._retry)
        return segment_from_proto(response.segment)

    def list_segments(self, *, timeout: float | None = None) -> list[Segment]:
        """See ``AsyncClient.list_segments``."""
        request = pb.ListSegmentsRequest()

        def attempt(seconds: float) -> pb.ListSegmentsResponse:
            return self._segments.ListSegments(request, timeout=seconds, metadata=self._metadata)

        response = retry_sync(attempt, self._timeout(timeout), self._retry)
        return [segment_from_proto(s) for s in response.segments]

    def count_segment(
        self, *, segment: str | None = None, expression: str | None = None, timeout: float | None = None
    ) -> SegmentCount:
        """See ``AsyncClient.count_segment``."""
        request = pb.CountSegmentRequest(segment=segment or "", expression=expression or "")

        def attempt(seconds: float) -> pb.CountSegmentResponse:
            return self._segments.CountSegment(request, timeout=seconds, metadata=self._metadata)

        response = retry_sync(attempt, self._timeout(timeout), self._retry)
        return count_from_proto(response)

    def sample_segment(
        self,
        *,
        segment: str | None = None,
        expression: str | None = None,
        limit: int = 10,
        timeout: float | None = None,
    ) -> list[SegmentMember]:
        """See ``AsyncClient.sample_segment``."""
        request = pb.SampleSegmentRequest(segment=segment or "", expression=expression or "", limit=limit)

        def attempt(seconds: float) -> pb.SampleSegmentResponse:
            return self._segments.SampleSegment(request, timeout=seconds, metadata=self._metadata)

        response = retry_sync(attempt, self._timeout(timeout), self._retry)
        return members_from_proto(response)

    def create_broadcast(
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
        timeout: float | None = None,
    ) -> Broadcast:
        """See ``AsyncClient.create_broadcast``."""
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

        def attempt(seconds: float) -> pb.CreateBroadcastResponse:
            return self._broadcasts.CreateBroadcast(request, timeout=seconds, metadata=self._metadata)

        response = retry_sync(attempt, self._timeout(timeout), self._retry)
        return broadcast_from_proto(response.broadcast)

    def get_broadcast(self, id: str, *, timeout: float | None = None) -> Broadcast:
        """See ``AsyncClient.get_broadcast``."""
        request = pb.GetBroadcastRequest(id=id)

        def attempt(seconds: float) -> pb.GetBroadcastResponse:
            return self._broadcasts.GetBroadcast(request, timeout=seconds, metadata=self._metadata)

        response = retry_sync(attempt, self._timeout(timeout), self._retry)
        return broadcast_from_proto(response.broadcast)

    def list_broadcasts(
        self, *, active_only: bool = False, page_size: int | None = None, timeout: float | None = None
    ) -> list[Broadcast]:
        """See ``AsyncClient.list_broadcasts``."""
        request = pb.ListBroadcastsRequest(active_only=active_only, page_size=page_size or 0)

        def attempt(seconds: float) -> pb.ListBroadcastsResponse:
            return self._broadcasts.ListBroadcasts(request, timeout=seconds, metadata=self._metadata)

        response = retry_sync(attempt, self._timeout(timeout), self._retry)
        return [broadcast_from_proto(b) for b in response.broadcasts]

    def pause_broadcast(self, id: str, *, timeout: float | None = None) -> Broadcast:
        """See ``AsyncClient.pause_broadcast``."""
        request = pb.PauseBroadcastRequest(id=id)

        def attempt(seconds: float) -> pb.PauseBroadcastResponse:
            return self._broadcasts.PauseBroadcast(request, timeout=seconds, metadata=self._metadata)

        response = retry_sync(attempt, self._timeout(timeout), self._retry)
        return broadcast_from_proto(response.broadcast)

    def resume_broadcast(self, id: str, *, timeout: float | None = None) -> Broadcast:
        """See ``AsyncClient.resume_broadcast``."""
        request = pb.ResumeBroadcastRequest(id=id)

        def attempt(seconds: float) -> pb.ResumeBroadcastResponse:
            return self._broadcasts.ResumeBroadcast(request, timeout=seconds, metadata=self._metadata)

        response = retry_sync(attempt, self._timeout(timeout), self._retry)
        return broadcast_from_proto(response.broadcast)

    def cancel_broadcast(self, id: str, *, timeout: float | None = None) -> Broadcast:
        """See ``AsyncClient.cancel_broadcast``."""
        request = pb.CancelBroadcastRequest(id=id)

        def attempt(seconds: float) -> pb.CancelBroadcastResponse:
            return self._broadcasts.CancelBroadcast(request, timeout=seconds, metadata=self._metadata)

        response = retry_sync(attempt, self._timeout(timeout), self._retry)
        return broadcast_from_proto(response.broadcast)
