"""Building events and reading acks: plain values in, ``event_pb2`` out.

Every event gets its message id (the idempotency key) and its timestamp when
it is built, not when it is sent, so a retried or resent event is the very
same event to the server.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from google.protobuf.timestamp_pb2 import Timestamp

from sendtime.client._errors import FieldViolation
from sendtime.v1 import event_pb2


class Outcome(enum.StrEnum):
    ACCEPTED = "accepted"
    """Stored durably and folded into the profile."""
    DUPLICATE = "duplicate"
    """The message id was seen before (maybe from an earlier attempt of this
    very event); nothing was applied."""
    REJECTED = "rejected"
    """Invalid; nothing was applied. See ``reason`` and ``field_violations``."""


@dataclass(frozen=True, slots=True)
class Ack:
    """What became of one event."""

    message_id: str
    outcome: Outcome
    reason: str = ""
    field_violations: tuple[FieldViolation, ...] = ()

    @property
    def stored(self) -> bool:
        """True when the server holds the event (now or from before)."""
        return self.outcome is not Outcome.REJECTED


_OUTCOMES: Final[Mapping[int, Outcome]] = {
    event_pb2.EVENT_OUTCOME_ACCEPTED: Outcome.ACCEPTED,
    event_pb2.EVENT_OUTCOME_DUPLICATE: Outcome.DUPLICATE,
    event_pb2.EVENT_OUTCOME_REJECTED: Outcome.REJECTED,
}


def ack_from_proto(ack: event_pb2.EventAck) -> Ack:
    outcome = _OUTCOMES.get(ack.outcome)
    if outcome is None:  # a newer server's outcome: not stored as far as we can tell
        return Ack(ack.message_id, Outcome.REJECTED, f"unknown outcome {ack.outcome}")
    if outcome is not Outcome.REJECTED:
        return Ack(ack.message_id, outcome)
    return Ack(
        ack.message_id,
        outcome,
        ack.reason,
        tuple(FieldViolation(v.field, v.description) for v in ack.field_violations),
    )


def new_message_id() -> str:
    return str(uuid.uuid4())


def _json_default(value: object) -> object:
    # The types commerce properties commonly hold that json cannot write itself.
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON: {value!r}")


# Built once: json.dumps with any non-default option builds a new encoder per call.
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=_json_default)


def encode_json(value: Mapping[str, Any] | None) -> bytes:
    """A JSON object as compact UTF-8 bytes; ``None`` and ``{}`` as empty bytes."""
    if not value:
        return b""
    return _ENCODER.encode(value).encode()


_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _timestamp(moment: dt.datetime | None) -> Timestamp:
    # Built from integers: Timestamp.FromDatetime costs more than the rest of
    # an event, and this runs once per event on the high-volume path.
    if moment is None:
        seconds, nanos = divmod(time.time_ns(), 1_000_000_000)
        return Timestamp(seconds=seconds, nanos=nanos)
    if moment.tzinfo is None:
        raise ValueError("timestamp must be timezone-aware (a naive datetime is ambiguous)")
    since = moment - _EPOCH
    return Timestamp(seconds=since.days * 86_400 + since.seconds, nanos=since.microseconds * 1000)


def track_event(
    name: str,
    properties: Mapping[str, Any] | None = None,
    *,
    user_id: str | None = None,
    anonymous_id: str | None = None,
    message_id: str | None = None,
    timestamp: dt.datetime | None = None,
) -> event_pb2.Event:
    """A tracked action ("Product Added", "Order Completed", or a custom name),
    its properties encoded as a JSON object. ``message_id`` defaults to a new
    UUID and ``timestamp`` to now."""
    return event_pb2.Event(
        message_id=message_id or new_message_id(),
        user_id=user_id or "",
        anonymous_id=anonymous_id or "",
        timestamp=_timestamp(timestamp),
        track=event_pb2.TrackPayload(name=name, properties_json=encode_json(properties)),
    )


def consent_states(consent: Mapping[str, bool]) -> dict[str, event_pb2.ConsentState.ValueType]:
    return {
        group: event_pb2.CONSENT_STATE_OPTED_IN if opted_in else event_pb2.CONSENT_STATE_OPTED_OUT
        for group, opted_in in consent.items()
    }


def identify_event(
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
) -> event_pb2.Event:
    """Who the user is: the traits sendtime uses, consent per subscription group
    (True = opted in, False = opted out) and any further ``traits``, kept on the
    profile as given. Traits left as None are not changed."""
    return event_pb2.Event(
        message_id=message_id or new_message_id(),
        user_id=user_id or "",
        anonymous_id=anonymous_id or "",
        timestamp=_timestamp(timestamp),
        identify=event_pb2.IdentifyPayload(
            traits=event_pb2.Traits(
                email=email or "",
                first_name=first_name or "",
                last_name=last_name or "",
                locale=locale or "",
                timezone=timezone or "",
                consent=consent_states(consent or {}),
            ),
            extra_traits_json=encode_json(traits),
        ),
    )
