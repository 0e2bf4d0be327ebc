"""Sends and the delivery ledger as plain values: requests built from keyword
arguments, answers read into ``Delivery``, ``DeliveryPage`` and ``FlowSummary``.

Every send has one idempotency key and the server's ledger keeps one delivery
per key: asking twice with the same key returns the first delivery, whatever
happened to it since, and never sends a second email.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from sendtime.v1 import delivery_service_pb2


class DeliveryStatus(enum.StrEnum):
    """Where a delivery is in its life; the last five are final."""

    SCHEDULED = "scheduled"
    """Waiting for its due time (a flow's delay, or quiet hours)."""
    SENDING = "sending"
    """Being checked and rendered."""
    RELAYING = "relaying"
    """Handed to the ESP, no answer yet."""
    SENT = "sent"
    """The ESP accepted it."""
    FAILED = "failed"
    """The ESP refused it, or transient failures outlasted the attempts (see ``reason``)."""
    CANCELLED = "cancelled"
    """An exit event came first (see ``reason``)."""
    SKIPPED = "skipped"
    """Not sent on purpose: no consent, suppressed, capped, no email, no data (see ``reason``)."""
    UNCERTAIN = "uncertain"
    """Interrupted while the ESP had it; not resent, so it may or may not have arrived."""
    UNKNOWN = "unknown"
    """Unspecified, or a status this client does not know (a newer server)."""

    @property
    def final(self) -> bool:
        """True when the delivery will not change any more."""
        return self in _FINAL


_FINAL: Final = frozenset(
    {
        DeliveryStatus.SENT,
        DeliveryStatus.FAILED,
        DeliveryStatus.CANCELLED,
        DeliveryStatus.SKIPPED,
        DeliveryStatus.UNCERTAIN,
    }
)
_STATUSES: Final[Mapping[int, DeliveryStatus]] = {
    delivery_service_pb2.DELIVERY_STATUS_SCHEDULED: DeliveryStatus.SCHEDULED,
    delivery_service_pb2.DELIVERY_STATUS_SENDING: DeliveryStatus.SENDING,
    delivery_service_pb2.DELIVERY_STATUS_RELAYING: DeliveryStatus.RELAYING,
    delivery_service_pb2.DELIVERY_STATUS_SENT: DeliveryStatus.SENT,
    delivery_service_pb2.DELIVERY_STATUS_FAILED: DeliveryStatus.FAILED,
    delivery_service_pb2.DELIVERY_STATUS_CANCELLED: DeliveryStatus.CANCELLED,
    delivery_service_pb2.DELIVERY_STATUS_SKIPPED: DeliveryStatus.SKIPPED,
    delivery_service_pb2.DELIVERY_STATUS_UNCERTAIN: DeliveryStatus.UNCERTAIN,
}


@dataclass(frozen=True, slots=True)
class Delivery:
    """One send in the server's ledger. Times are timezone-aware UTC, None
    when they have not happened (``accept_time`` before the ESP accepts)."""

    id: int
    #: The ledger's key for this send. For a send asked for through
    #: ``send_email`` the server reports its own key derived from the caller's;
    #: the caller's key is ``entry_key``, and either finds it with ``get_delivery``.
    idempotency_key: str
    #: Empty for a send asked for through ``send_email``.
    flow_id: str
    template_id: str
    #: The template's content hash at relay time; empty before.
    template_version: str
    user_id: str
    anonymous_id: str
    #: The flow's entry key (a cart id, an order id), or the caller's idempotency key.
    entry_key: str
    status: DeliveryStatus
    #: Why it was skipped, cancelled, failed or held; the ESP's reason on failure.
    reason: str
    attempts: int
    #: The relay it went through ("smtp", "sendgrid", "outbox", ...).
    relay: str
    esp_message_id: str
    #: When the triggering event happened, and when it reached the server.
    trigger_time: dt.datetime | None
    receive_time: dt.datetime | None
    due_time: dt.datetime | None
    accept_time: dt.datetime | None
    #: From the triggering event's arrival to the ESP's acceptance; None until accepted.
    latency: dt.timedelta | None
    create_time: dt.datetime | None
    update_time: dt.datetime | None

    @property
    def final(self) -> bool:
        """True when the delivery will not change any more."""
        return self.status.final


@dataclass(frozen=True, slots=True)
class DeliveryPage:
    """One page of ``list_deliveries``, newest first; pass ``next_page_token``
    to the next call for the following page ("" on the last)."""

    deliveries: tuple[Delivery, ...]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class FlowSummary:
    """A configured flow and how many of its deliveries are in each status."""

    id: str
    template_id: str
    entry_event: str
    delay: dt.timedelta
    exit_events: tuple[str, ...]
    #: The consent group its sends need; "" for a transactional flow.
    subscription_group: str
    scheduled: int
    sent: int
    cancelled: int
    skipped: int
    failed: int
    #: Every other status (sending, relaying, uncertain).
    other: int

    @property
    def transactional(self) -> bool:
        return not self.subscription_group


def send_request(
    template_id: str,
    user_id: str | None,
    anonymous_id: str | None,
    idempotency_key: str,
    transactional: bool,
    subscription_group: str | None,
) -> delivery_service_pb2.SendEmailRequest:
    return delivery_service_pb2.SendEmailRequest(
        template_id=template_id,
        user_id=user_id or "",
        anonymous_id=anonymous_id or "",
        idempotency_key=idempotency_key,
        transactional=transactional,
        subscription_group=subscription_group or "",
    )


def get_request(id: int | None, idempotency_key: str | None) -> delivery_service_pb2.GetDeliveryRequest:
    return delivery_service_pb2.GetDeliveryRequest(id=id or 0, idempotency_key=idempotency_key or "")


def list_request(
    user_id: str | None, flow_id: str | None, page_size: int | None, page_token: str | None
) -> delivery_service_pb2.ListDeliveriesRequest:
    return delivery_service_pb2.ListDeliveriesRequest(
        user_id=user_id or "", flow_id=flow_id or "", page_size=page_size or 0, page_token=page_token or ""
    )


def _timedelta(duration: Duration) -> dt.timedelta:
    return dt.timedelta(seconds=duration.seconds, microseconds=duration.nanos // 1000)


_TimeField = Literal["trigger_time", "receive_time", "due_time", "accept_time", "create_time", "update_time"]


def delivery_from_proto(delivery: delivery_service_pb2.Delivery) -> Delivery:
    def time(field: _TimeField) -> dt.datetime | None:
        if not delivery.HasField(field):  # unset: it has not happened (yet)
            return None
        stamp: Timestamp = getattr(delivery, field)
        return stamp.ToDatetime(tzinfo=dt.UTC)

    return Delivery(
        id=delivery.id,
        idempotency_key=delivery.idempotency_key,
        flow_id=delivery.flow_id,
        template_id=delivery.template_id,
        template_version=delivery.template_version,
        user_id=delivery.user_id,
        anonymous_id=delivery.anonymous_id,
        entry_key=delivery.entry_key,
        status=_STATUSES.get(delivery.status, DeliveryStatus.UNKNOWN),
        reason=delivery.reason,
        attempts=delivery.attempts,
        relay=delivery.relay,
        esp_message_id=delivery.esp_message_id,
        trigger_time=time("trigger_time"),
        receive_time=time("receive_time"),
        due_time=time("due_time"),
        accept_time=time("accept_time"),
        latency=_timedelta(delivery.latency) if delivery.HasField("latency") else None,
        create_time=time("create_time"),
        update_time=time("update_time"),
    )


def page_from_proto(response: delivery_service_pb2.ListDeliveriesResponse) -> DeliveryPage:
    return DeliveryPage(
        deliveries=tuple(delivery_from_proto(d) for d in response.deliveries),
        next_page_token=response.next_page_token,
    )


def flow_from_proto(flow: delivery_service_pb2.FlowSummary) -> FlowSummary:
    return FlowSummary(
        id=flow.id,
        template_id=flow.template_id,
        entry_event=flow.entry_event,
        delay=_timedelta(flow.delay),
        exit_events=tuple(flow.exit_events),
        subscription_group=flow.subscription_group,
        scheduled=flow.scheduled,
        sent=flow.sent,
        cancelled=flow.cancelled,
        skipped=flow.skipped,
        failed=flow.failed,
        other=flow.other,
    )
