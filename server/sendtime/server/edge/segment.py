"""Segment's HTTP Tracking API wire format -> domain IncomingEvent.

Follows Segment's spec: camelCase envelope fields, ``timestamp`` when given,
else ``originalTimestamp`` corrected for the client's clock skew by
``sentAt``; a missing messageId is derived from the event's bytes, so a
client that retries the same body is still de-duplicated.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

import msgspec

from sendtime.server.domain.errors import FieldViolation, InvalidInput, PayloadTooLarge
from sendtime.server.domain.events import (
    MAX_BATCH_EVENTS,
    MAX_EVENT_BYTES,
    MAX_JSON_DEPTH,
    ConsentState,
    EventKind,
    IncomingEvent,
    TraitsUpdate,
    nests_deeper,
)
from sendtime.server.domain.ingest import Undecodable

MAX_BATCH_BYTES: Final = 500 * 1024

Id = str | int


class Context(msgspec.Struct, gc=False):
    """The part of Segment's context object that sendtime reads (identify calls
    fall back to it). Decoding skips the rest without building it: the
    library, page, user agent... that clients send with every event."""

    locale: Any = None
    timezone: Any = None


# gc=False: decoded JSON, never part of a reference cycle; one per event.
class Message(msgspec.Struct, gc=False, kw_only=True, rename="camel"):
    type: str | None = None
    message_id: Id | None = None
    user_id: Id | None = None
    anonymous_id: Id | None = None
    event: str | None = None
    name: str | None = None
    properties: msgspec.Raw = msgspec.Raw(b"")
    traits: dict[str, Any] | None = None
    context: Context | None = None
    timestamp: datetime | None = None
    original_timestamp: datetime | None = None
    sent_at: datetime | None = None
    previous_id: Id | None = None
    group_id: Id | None = None
    write_key: str | None = None


class Batch(msgspec.Struct, gc=False, kw_only=True, rename="camel"):
    batch: list[msgspec.Raw]
    sent_at: datetime | None = None
    context: Context | None = None
    write_key: str | None = None


class WriteKeyOnly(msgspec.Struct, rename="camel"):
    write_key: str | None = None


class BatchProbe(msgspec.Struct):
    batch: msgspec.Raw | None = None


_MESSAGE: Final = msgspec.json.Decoder(Message)
_NO_CONTEXT: Final = Context()
_BATCH: Final = msgspec.json.Decoder(Batch)
_WRITE_KEY: Final = msgspec.json.Decoder(WriteKeyOnly)
_BATCH_PROBE: Final = msgspec.json.Decoder(BatchProbe)
_ROUTE_KINDS: Final = {kind.value: kind for kind in EventKind}
#: What msgspec raises for bytes it cannot take as JSON: malformed JSON, and
#: invalid UTF-8 inside a string (a UnicodeDecodeError, not a DecodeError).
_NOT_JSON: Final = (msgspec.DecodeError, UnicodeDecodeError)
_TOO_DEEP: Final = f"nests objects and arrays deeper than {MAX_JSON_DEPTH} levels"

#: domain field -> Segment's name for it
SEGMENT_FIELDS: Final = {
    "message_id": "messageId",
    "user_id": "userId",
    "anonymous_id": "anonymousId",
    "previous_id": "previousId",
    "group_id": "groupId",
    "extra_traits": "traits",
    "traits.first_name": "traits.firstName",
    "traits.last_name": "traits.lastName",
}
_TRAIT_ALIASES: Final = {
    "email": "email",
    "firstName": "first_name",
    "first_name": "first_name",
    "lastName": "last_name",
    "last_name": "last_name",
    "locale": "locale",
    "timezone": "timezone",
}


def segment_field(field: str, kind: EventKind | None) -> str:
    if field == "name" and kind is EventKind.TRACK:
        return "event"
    for domain, segment in SEGMENT_FIELDS.items():
        if field == domain or field.startswith(domain + "."):
            return segment + field[len(domain) :]
    return field


def write_key_in_body(body: bytes) -> str | None:
    """analytics clients also put the write key in the body; used when no header is set."""
    try:
        return _WRITE_KEY.decode(body).write_key
    # invalid UTF-8 (UnicodeDecodeError) is the caller's to answer
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return None


def decode_single(body: bytes, route: str, received_at: datetime) -> IncomingEvent | Undecodable:
    """One event posted to /v1/track, /v1/identify, ... (the route names its type)."""
    if len(body) > MAX_EVENT_BYTES:
        raise PayloadTooLarge(f"the event is {len(body)} bytes; the limit is {MAX_EVENT_BYTES}")
    return _decode_message(body, _ROUTE_KINDS[route], received_at, batch_sent_at=None, batch_context=None)


def decode_batch(body: bytes, received_at: datetime) -> list[IncomingEvent | Undecodable]:
    if len(body) > MAX_BATCH_BYTES:
        raise PayloadTooLarge(f"the batch is {len(body)} bytes; the limit is {MAX_BATCH_BYTES}")
    try:
        batch = _BATCH.decode(body)
    except RecursionError:
        # msgspec recurses even to skip a value: one event nested thousands
        # deep fails the decoding of the whole batch. Split the batch here and
        # let that event be rejected alone.
        batch = _split_batch(body)
    except (msgspec.ValidationError, *_NOT_JSON) as exc:
        raise InvalidInput.field("batch", f"is not a Segment batch: {exc}") from None
    if len(batch.batch) > MAX_BATCH_EVENTS:
        raise InvalidInput.field("batch", f"holds {len(batch.batch)} events; the limit is {MAX_BATCH_EVENTS}")
    return [
        _decode_message(raw, None, received_at, batch_sent_at=batch.sent_at, batch_context=batch.context)
        for raw in batch.batch
    ]


# A JSON string (escapes included), or one of the characters that give JSON its structure.
_JSON_TOKENS: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},:]')


def _split_batch(body: bytes) -> Batch:
    """The batch, with its events cut out of the body by a scan of its
    structure instead of a parse (slower; only for bodies msgspec cannot
    decode for their depth). The envelope without them is decoded as usual."""
    depth = 0
    previous = b""
    key = b""
    start = end = -1
    cuts: list[int] = []  # where each event of the batch array ends (a comma, or the closing bracket)
    for match in _JSON_TOKENS.finditer(body):
        token = match.group()
        if token == b":" and depth == 1:
            key = previous
        elif token in (b"[", b"{"):
            if depth == 1 and start < 0 and token == b"[" and previous == b":" and key == b'"batch"':
                start = match.start()
            depth += 1
        elif token in (b"]", b"}"):
            depth -= 1
            if depth == 1 and start >= 0 and end < 0:
                end = match.start()
                cuts.append(end)
        elif token == b"," and depth == 2 and start >= 0 and end < 0:
            cuts.append(match.start())
        previous = token
    if end < 0:
        raise InvalidInput.field("batch", f"is not a Segment batch: the body {_TOO_DEEP}")
    events = [body[a + 1 : b].strip() for a, b in zip([start, *cuts], cuts, strict=False)]
    try:
        envelope = _BATCH.decode(body[:start] + b"[]" + body[end + 1 :])
    except RecursionError:
        raise InvalidInput.field("batch", f"is not a Segment batch: the body {_TOO_DEEP}") from None
    except (msgspec.ValidationError, *_NOT_JSON) as exc:
        raise InvalidInput.field("batch", f"is not a Segment batch: {exc}") from None
    return Batch(
        batch=[msgspec.Raw(event) for event in events if event],
        sent_at=envelope.sent_at,
        context=envelope.context,
        write_key=envelope.write_key,
    )


def decode_webhook(body: bytes, received_at: datetime) -> list[IncomingEvent | Undecodable]:
    """A webhook body: a Segment batch, or one Segment message naming its type."""
    try:
        is_batch = _BATCH_PROBE.decode(body).batch is not None
    except RecursionError:
        is_batch = b'"batch"' in body  # decode_batch tells the rest
    except (msgspec.ValidationError, *_NOT_JSON) as exc:
        raise InvalidInput.field("body", f"is not a JSON object: {exc}") from None
    if is_batch:
        return decode_batch(body, received_at)
    if len(body) > MAX_EVENT_BYTES:
        raise PayloadTooLarge(f"the event is {len(body)} bytes; the limit is {MAX_EVENT_BYTES}")
    return [_decode_message(body, None, received_at, batch_sent_at=None, batch_context=None)]


def _decode_message(
    raw: bytes | msgspec.Raw,
    route_kind: EventKind | None,
    received_at: datetime,
    *,
    batch_sent_at: datetime | None,
    batch_context: Context | None,
) -> IncomingEvent | Undecodable:
    raw_bytes = bytes(raw)
    if len(raw_bytes) > MAX_EVENT_BYTES:
        return _undecodable(
            _derived_id(raw_bytes), "event", f"is {len(raw_bytes)} bytes; the limit is {MAX_EVENT_BYTES}"
        )
    if nests_deeper(raw_bytes):
        return _undecodable(_derived_id(raw_bytes), "event", _TOO_DEEP)
    try:
        message = _MESSAGE.decode(raw_bytes)
    except msgspec.ValidationError as exc:
        return _undecodable(_derived_id(raw_bytes), "event", str(exc).replace("`$.", "`"))
    except _NOT_JSON as exc:
        return _undecodable(_derived_id(raw_bytes), "event", f"is not valid JSON: {exc}")
    message_id = str(message.message_id) if message.message_id is not None else _derived_id(raw_bytes)
    kind = route_kind or _ROUTE_KINDS.get(message.type or "")
    if kind is None:
        return _undecodable(message_id, "type", f"must be one of {', '.join(_ROUTE_KINDS)}")
    context = message.context if message.context is not None else batch_context or _NO_CONTEXT
    traits: TraitsUpdate | None = None
    if kind is EventKind.IDENTIFY:
        try:
            traits = _traits(message.traits or {}, context)
        except InvalidInput as error:
            return Undecodable(message_id, error)
    properties = bytes(message.properties)
    if properties == b"null":
        properties = b""
    if kind is EventKind.GROUP and message.traits:
        properties = msgspec.json.encode(message.traits)
    try:
        timestamp = _event_time(message, received_at, batch_sent_at)
    except InvalidInput as error:
        return Undecodable(message_id, error)
    return IncomingEvent(
        message_id=message_id,
        kind=kind,
        user_id=_text(message.user_id),
        anonymous_id=_text(message.anonymous_id),
        name=(message.event if kind is EventKind.TRACK else message.name) or "",
        timestamp=timestamp,
        properties=properties,
        traits=traits,
        previous_id=_text(message.previous_id),
        group_id=_text(message.group_id),
    )


def _derived_id(raw: bytes) -> str:
    """The message id of an event that names none: the same bytes, the same id.
    Made only then, not for every event: hashing costs."""
    return "h-" + hashlib.sha256(raw).hexdigest()[:40]


def _undecodable(message_id: str, field: str, description: str) -> Undecodable:
    return Undecodable(
        message_id, InvalidInput(f"{field}: {description}", [FieldViolation(field, description)])
    )


def _text(value: Id | None) -> str:
    return "" if value is None else str(value)


def _event_time(message: Message, received_at: datetime, batch_sent_at: datetime | None) -> datetime | None:
    if message.timestamp is not None:
        return message.timestamp
    sent_at = message.sent_at or batch_sent_at
    if message.original_timestamp is not None and sent_at is not None:
        try:
            return message.original_timestamp + (received_at - sent_at)
        except TypeError:  # one of them is naive: no skew correction
            return message.original_timestamp
        except OverflowError:
            raise InvalidInput.field(
                "originalTimestamp", "corrected by the clock skew sentAt shows, falls outside the calendar"
            ) from None
    return message.original_timestamp


def _traits(raw: dict[str, Any], context: Context) -> TraitsUpdate:
    known: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    violations: list[FieldViolation] = []
    for key, value in raw.items():
        target = _TRAIT_ALIASES.get(key)
        if target is None:
            if key != "consent":
                extra[key] = value
        elif isinstance(value, str):
            known[target] = value
        elif value is not None:
            violations.append(FieldViolation(f"traits.{key}", "must be a string"))
    for key in ("locale", "timezone"):
        if key not in known and isinstance(fallback := getattr(context, key), str):
            known[key] = fallback
    consent = _consent(raw.get("consent"), violations)
    if violations:
        raise InvalidInput(f"invalid traits: {violations[0].field}: {violations[0].description}", violations)
    return TraitsUpdate(**known, consent=consent, extra=extra)


def _consent(raw: object, violations: list[FieldViolation]) -> dict[str, ConsentState]:
    """Consent per subscription group: {"marketing": true} or {"marketing": "opted_out"}."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        violations.append(FieldViolation("traits.consent", "must be an object of group -> consent"))
        return {}
    consent: dict[str, ConsentState] = {}
    for group, state in raw.items():
        if state is True or state in ("opted_in", "granted", "subscribed"):
            consent[group] = ConsentState.OPTED_IN
        elif state is False or state in ("opted_out", "denied", "unsubscribed"):
            consent[group] = ConsentState.OPTED_OUT
        else:
            violations.append(
                FieldViolation(f"traits.consent.{group}", "must be true, false, 'opted_in' or 'opted_out'")
            )
    return consent


def rename_violations(violations: Sequence[FieldViolation], kind: EventKind | None) -> list[FieldViolation]:
    return [FieldViolation(segment_field(v.field, kind), v.description) for v in violations]
