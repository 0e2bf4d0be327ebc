"""Protobuf messages to domain values and back. No decisions here: validation
lives in domain.events, this only moves fields across."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Final

import msgspec
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from sendtime.server.domain.content import Block, ContentContext
from sendtime.server.domain.errors import FieldViolation, InvalidInput
from sendtime.server.domain.events import ConsentState, EventKind, IncomingEvent, TraitsUpdate
from sendtime.server.domain.flows import Flow
from sendtime.server.domain.ingest import Ack, Outcome, Undecodable
from sendtime.server.domain.profile import Line, ProfileView
from sendtime.server.domain.provenance import Reason, Source
from sendtime.server.domain.sends import SendRecord, SendStatus
from sendtime.v1 import content_service_pb2, delivery_service_pb2, event_pb2, profile_service_pb2

_OUTCOMES: Final = {
    Outcome.ACCEPTED: event_pb2.EVENT_OUTCOME_ACCEPTED,
    Outcome.DUPLICATE: event_pb2.EVENT_OUTCOME_DUPLICATE,
    Outcome.REJECTED: event_pb2.EVENT_OUTCOME_REJECTED,
}
_CONSENT_FROM_PROTO: Final = {
    event_pb2.CONSENT_STATE_OPTED_IN: ConsentState.OPTED_IN,
    event_pb2.CONSENT_STATE_OPTED_OUT: ConsentState.OPTED_OUT,
}
_CONSENT_TO_PROTO: Final = {str(v): k for k, v in _CONSENT_FROM_PROTO.items()}

# Domain field paths -> the proto's, so a violation names the field the caller set.
_FIELD_PREFIXES: Final = (
    ("properties", "track.properties_json"),
    ("name", "track.name"),
    ("traits", "identify.traits"),
    ("extra_traits", "identify.extra_traits_json"),
    ("previous_id", "alias.previous_id"),
)


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
#: google.protobuf.Timestamp's range, 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z;
#: beyond it a time is not a datetime (and the arithmetic below overflows).
_TIMESTAMP_SECONDS: Final = range(-62_135_596_800, 253_402_300_800)
_TIMESTAMP_RANGE: Final = (
    "is outside google.protobuf.Timestamp's range (0001-01-01 to 9999-12-31, nanos 0 to 999999999)"
)


def incoming_event(event: event_pb2.Event | InvalidInput) -> IncomingEvent | Undecodable:
    """The event as the domain takes it; an event whose bytes or timestamp
    cannot be read is rejected in its place (see grpc_decode)."""
    if isinstance(event, InvalidInput):
        return Undecodable("", event)
    kind = event.WhichOneof("kind")
    timestamp = None
    if event.HasField("timestamp"):
        stamp = event.timestamp
        seconds, nanos = stamp.seconds, stamp.nanos  # each read of a upb field costs
        if seconds not in _TIMESTAMP_SECONDS or not 0 <= nanos < 1_000_000_000:
            return Undecodable(event.message_id, InvalidInput.field("timestamp", _TIMESTAMP_RANGE))
        # protobuf's ToDatetime is pure Python and costs ~2 us; this is the same
        # arithmetic, to the microsecond, at a fraction of it.
        timestamp = _EPOCH + timedelta(0, seconds, nanos // 1000)  # (days, seconds, microseconds)
    if kind == "track":
        return IncomingEvent(
            message_id=event.message_id,
            kind=EventKind.TRACK,
            user_id=event.user_id,
            anonymous_id=event.anonymous_id,
            name=event.track.name,
            timestamp=timestamp,
            properties=event.track.properties_json,
        )
    if kind == "identify":
        traits = event.identify.traits
        return IncomingEvent(
            message_id=event.message_id,
            kind=EventKind.IDENTIFY,
            user_id=event.user_id,
            anonymous_id=event.anonymous_id,
            timestamp=timestamp,
            traits=TraitsUpdate(
                email=traits.email or None,
                first_name=traits.first_name or None,
                last_name=traits.last_name or None,
                locale=traits.locale or None,
                timezone=traits.timezone or None,
                consent={
                    group: _CONSENT_FROM_PROTO[state]
                    for group, state in traits.consent.items()
                    if state in _CONSENT_FROM_PROTO
                },
            ),
            extra_traits=event.identify.extra_traits_json,
        )
    if kind == "alias":
        return IncomingEvent(
            message_id=event.message_id,
            kind=EventKind.ALIAS,
            user_id=event.user_id,
            anonymous_id=event.anonymous_id,
            timestamp=timestamp,
            previous_id=event.alias.previous_id,
        )
    return IncomingEvent(
        message_id=event.message_id,
        kind=None,
        user_id=event.user_id,
        anonymous_id=event.anonymous_id,
        timestamp=timestamp,
    )


def proto_field(field: str) -> str:
    for domain_prefix, proto_prefix in _FIELD_PREFIXES:
        if field == domain_prefix or field.startswith((domain_prefix + ".", domain_prefix + "[")):
            return proto_prefix + field[len(domain_prefix) :]
    return field


def violations(items: Iterable[FieldViolation]) -> list[event_pb2.FieldViolation]:
    return [event_pb2.FieldViolation(field=proto_field(v.field), description=v.description) for v in items]


def event_ack(ack: Ack) -> event_pb2.EventAck:
    if ack.error is None:
        return event_pb2.EventAck(message_id=ack.message_id, outcome=_OUTCOMES[ack.outcome], index=ack.index)
    return event_pb2.EventAck(
        message_id=ack.message_id,
        outcome=_OUTCOMES[ack.outcome],
        index=ack.index,
        reason=ack.error.message,
        field_violations=violations(ack.error.violations),
    )


def event_acks(acks: Sequence[Ack]) -> list[event_pb2.EventAck]:
    return [event_ack(ack) for ack in acks]


def timestamp(moment: datetime | None) -> Timestamp | None:
    """A protobuf Timestamp of ``moment`` (None: the field left unset)."""
    if moment is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _line(line: Line) -> profile_service_pb2.CartLine:
    return profile_service_pb2.CartLine(
        product_id=line.product_id,
        sku=line.sku,
        name=line.name,
        price=line.price or 0.0,
        currency=line.currency,
        quantity=line.quantity,
        url=line.url,
        image_url=line.image_url,
        category=line.category,
    )


def profile(view: ProfileView, extra_traits_json: bytes) -> profile_service_pb2.Profile:
    traits = view.traits
    return profile_service_pb2.Profile(
        user_id=view.user_id,
        anonymous_id=view.anonymous_id,
        traits=event_pb2.Traits(
            email=traits.get("email", ""),
            first_name=traits.get("first_name", ""),
            last_name=traits.get("last_name", ""),
            locale=traits.get("locale", ""),
            timezone=traits.get("timezone", ""),
            consent={group: _CONSENT_TO_PROTO[state] for group, state in view.consent.items()},
        ),
        extra_traits_json=extra_traits_json,
        carts=[
            profile_service_pb2.Cart(
                cart_id=cart.cart_id,
                lines=[_line(line) for line in cart.lines],
                update_time=timestamp(cart.updated_at),
            )
            for cart in view.carts
        ],
        recently_viewed=[
            profile_service_pb2.ViewedProduct(
                product_id=v.product.product_id,
                sku=v.product.sku,
                name=v.product.name,
                price=v.product.price or 0.0,
                currency=v.product.currency,
                url=v.product.url,
                image_url=v.product.image_url,
                category=v.product.category,
                view_time=timestamp(v.viewed_at),
            )
            for v in view.recently_viewed
        ],
        orders=[
            profile_service_pb2.Order(
                order_id=o.order_id,
                total=o.total or 0.0,
                currency=o.currency,
                product_ids=o.product_ids,
                complete_time=timestamp(o.completed_at),
                refund_time=timestamp(o.refunded_at),
                refunded_total=o.refunded_total or 0.0,
            )
            for o in view.orders
        ],
        first_seen_time=timestamp(view.first_seen_at),
        last_activity_time=timestamp(view.last_activity_at),
        event_count=view.event_count,
        linked_user_ids=view.linked_user_ids,
        linked_anonymous_ids=view.linked_anonymous_ids,
    )


# -- content ------------------------------------------------------------------

_SOURCES: Final = {
    Source.FRESH: content_service_pb2.BLOCK_SOURCE_FRESH,
    Source.CACHED: content_service_pb2.BLOCK_SOURCE_CACHED,
    Source.STALE: content_service_pb2.BLOCK_SOURCE_STALE,
    Source.FALLBACK: content_service_pb2.BLOCK_SOURCE_FALLBACK,
}
_REASONS: Final = {
    Reason.TIMEOUT: content_service_pb2.FALLBACK_REASON_TIMEOUT,
    Reason.UPSTREAM_ERROR: content_service_pb2.FALLBACK_REASON_UPSTREAM_ERROR,
    Reason.CIRCUIT_OPEN: content_service_pb2.FALLBACK_REASON_CIRCUIT_OPEN,
    Reason.MISSING_DATA: content_service_pb2.FALLBACK_REASON_MISSING_DATA,
    Reason.DEADLINE_TOO_SHORT: content_service_pb2.FALLBACK_REASON_DEADLINE_TOO_SHORT,
    Reason.OVERLOADED: content_service_pb2.FALLBACK_REASON_OVERLOADED,
    Reason.REVALIDATING: content_service_pb2.FALLBACK_REASON_REVALIDATING,
    Reason.SHUTDOWN: content_service_pb2.FALLBACK_REASON_SHUTTING_DOWN,
}
_encode_json = msgspec.json.Encoder().encode


def duration(seconds: float) -> Duration:
    # built directly: protobuf's FromNanoseconds is pure Python and shows up
    # in profiles of the warm content path
    nanos = int(max(seconds, 0.0) * 1e9)
    return Duration(seconds=nanos // 1_000_000_000, nanos=nanos % 1_000_000_000)


def content_context(context: content_service_pb2.ContentContext) -> ContentContext:
    return ContentContext(campaign=context.campaign, locale=context.locale, cart_id=context.cart_id)


def content_block(block: Block) -> content_service_pb2.ContentBlock:
    return content_service_pb2.ContentBlock(
        name=block.name,
        data_json=_encode_json(block.data),
        source=_SOURCES[block.source],
        reason=_REASONS[block.reason] if block.reason else content_service_pb2.FALLBACK_REASON_UNSPECIFIED,
        age=duration(block.age_s),
        detail=block.detail,
    )


# -- deliveries -----------------------------------------------------------------

_DELIVERY_STATUSES: Final = {
    SendStatus.SCHEDULED: delivery_service_pb2.DELIVERY_STATUS_SCHEDULED,
    SendStatus.SENDING: delivery_service_pb2.DELIVERY_STATUS_SENDING,
    SendStatus.RELAYING: delivery_service_pb2.DELIVERY_STATUS_RELAYING,
    SendStatus.SENT: delivery_service_pb2.DELIVERY_STATUS_SENT,
    SendStatus.FAILED: delivery_service_pb2.DELIVERY_STATUS_FAILED,
    SendStatus.CANCELLED: delivery_service_pb2.DELIVERY_STATUS_CANCELLED,
    SendStatus.SKIPPED: delivery_service_pb2.DELIVERY_STATUS_SKIPPED,
    SendStatus.UNCERTAIN: delivery_service_pb2.DELIVERY_STATUS_UNCERTAIN,
}


def delivery(record: SendRecord) -> delivery_service_pb2.Delivery:
    latency = record.latency
    return delivery_service_pb2.Delivery(
        id=record.id,
        # an API send shows the caller's own key; a flow's send, the key it was made under
        idempotency_key=record.send_key if record.flow_id else record.entry_key,
        flow_id=record.flow_id,
        template_id=record.template_id,
        template_version=record.template_version,
        user_id=record.user_id,
        anonymous_id=record.anonymous_id,
        entry_key=record.entry_key,
        status=_DELIVERY_STATUSES[record.status],
        reason=record.reason,
        attempts=record.attempts,
        relay=record.relay,
        esp_message_id=record.esp_message_id,
        trigger_time=timestamp(record.entry_time),
        receive_time=timestamp(record.received_at),
        due_time=timestamp(record.due_at),
        accept_time=timestamp(record.accepted_at),
        latency=duration(latency.total_seconds()) if latency is not None else None,
        create_time=timestamp(record.created_at),
        update_time=timestamp(record.updated_at),
    )


def flow_summary(flow: Flow, counts: Mapping[str, int]) -> delivery_service_pb2.FlowSummary:
    named = ("scheduled", "sent", "cancelled", "skipped", "failed")
    return delivery_service_pb2.FlowSummary(
        id=flow.id,
        template_id=flow.template,
        entry_event=flow.entry_event,
        delay=duration(flow.delay.total_seconds()),
        exit_events=list(flow.exit_events),
        subscription_group=flow.subscription_group,
        **{name: counts.get(name, 0) for name in named},
        other=sum(count for status, count in counts.items() if status not in named),
    )
