"""Events: what an edge hands in, the typed schemas of Segment's e-commerce spec
v2, and validation that turns the one into the other.

The edges (gRPC, Segment HTTP, webhooks) each decode their wire format into an
``IncomingEvent``; ``validate`` is the single place that decides whether it is
acceptable and produces the typed ``Event`` the store and the profile fold use.
Field paths in errors use the snake_case names of the proto API; the HTTP edge
renames them to Segment's camelCase.
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from sendtime.server.domain.errors import FieldViolation, InvalidInput

MAX_MESSAGE_ID_CHARS: Final = 100
MAX_ID_CHARS: Final = 200
MAX_EVENT_NAME_CHARS: Final = 200
#: Segment's limit per event; applied to the properties (or traits) JSON.
MAX_EVENT_BYTES: Final = 32 * 1024
#: Events in one batch at any door: a Segment /v1/batch, an IngestEvents call,
#: a StreamEvents message (Segment's own batch limit).
MAX_BATCH_EVENTS: Final = 2500
#: Objects and arrays inside one another in an event's JSON. Real events nest
#: a handful of levels (properties > products > product > options); a bound
#: keeps every later decoding of a stored event far from Python's recursion
#: limit, which a deeper value would hit (RecursionError, not a clear error).
MAX_JSON_DEPTH: Final = 32
#: The largest money amount (price, total, revenue, ...) in any currency:
#: ten to the twelfth covers a year of a large shop's revenue even in the
#: currencies of the smallest units, and keeps sums exact in a float.
MAX_AMOUNT: Final = 1e12
#: Quantities and list positions.
MAX_COUNT: Final = 1_000_000


class EventKind(enum.StrEnum):
    TRACK = "track"
    IDENTIFY = "identify"
    PAGE = "page"
    ALIAS = "alias"
    GROUP = "group"


class ConsentState(enum.StrEnum):
    OPTED_IN = "opted_in"
    OPTED_OUT = "opted_out"


# --------------------------------------------------------------------------
# Segment e-commerce spec v2 property schemas. Unknown properties are allowed
# (real platforms send many); known ones must have the right type and range.
# Ids are accepted as strings or integers, since many platforms send numbers.
#
# Every Struct here is gc=False: events and their payloads are trees of plain
# values that can never be part of a reference cycle, and the garbage
# collector not tracking them (nor counting them towards its next run) saves
# a good part of its cost at tens of thousands of events a second.

#: ASCII and Latin-1 control characters (NUL, line breaks, escapes...): never
#: part of an id, and trouble in every log, URL and header an id reaches.
_CONTROL_CHARACTERS: Final = "\\x00-\\x1f\\x7f-\\x9f"
_CONTROL: Final = re.compile(f"[{_CONTROL_CHARACTERS}]")

Money = Annotated[float, msgspec.Meta(ge=0, le=MAX_AMOUNT)]
Quantity = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]
Position = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]
Currency = Annotated[str, msgspec.Meta(pattern="^[A-Za-z]{3}$")]
# Control characters in string ids are refused after decoding (_check_property_ids):
# a msgspec pattern would run a regex on every id of every event.
Id = (
    Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)]
    # a 64-bit integer: what every database and JSON parser can hold
    | Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
)


class ProductFields(msgspec.Struct, gc=False, kw_only=True, omit_defaults=True):
    product_id: Id | None = None
    sku: Id | None = None
    name: str | None = None
    category: str | None = None
    brand: str | None = None
    variant: str | None = None
    price: Money | None = None
    quantity: Quantity | None = None
    coupon: str | None = None
    position: Position | None = None
    url: str | None = None
    image_url: str | None = None


class ProductViewed(ProductFields, kw_only=True, omit_defaults=True):
    currency: Currency | None = None
    value: Money | None = None


class ProductListViewed(msgspec.Struct, gc=False, kw_only=True, omit_defaults=True):
    list_id: Id | None = None
    category: str | None = None
    products: list[ProductFields] = []


class ProductsSearched(msgspec.Struct, gc=False, kw_only=True, omit_defaults=True):
    query: str


class CartChange(ProductFields, kw_only=True, omit_defaults=True):
    """Product Added and Product Removed: one product, with the quantity added or removed."""

    cart_id: Id | None = None
    currency: Currency | None = None


class CartSnapshot(msgspec.Struct, gc=False, kw_only=True, omit_defaults=True):
    """Cart Viewed and Checkout Started: the whole cart as the platform sees it."""

    cart_id: Id | None = None
    checkout_id: Id | None = None
    order_id: Id | None = None
    value: Money | None = None
    revenue: Money | None = None
    currency: Currency | None = None
    products: list[ProductFields] = []


class OrderCompleted(msgspec.Struct, gc=False, kw_only=True, omit_defaults=True):
    order_id: Id
    # Not in the spec, but sent by many carts; it lets the order close exactly
    # its cart. Without it an order closes every cart opened before it.
    cart_id: Id | None = None
    checkout_id: Id | None = None
    total: Money | None = None
    subtotal: Money | None = None
    revenue: Money | None = None
    shipping: Money | None = None
    tax: Money | None = None
    discount: Money | None = None
    coupon: str | None = None
    currency: Currency | None = None
    products: list[ProductFields] = []


class OrderRefunded(msgspec.Struct, gc=False, kw_only=True, omit_defaults=True):
    order_id: Id
    total: Money | None = None
    currency: Currency | None = None
    products: list[ProductFields] = []


KnownPayload = (
    ProductViewed
    | ProductListViewed
    | ProductsSearched
    | CartChange
    | CartSnapshot
    | OrderCompleted
    | OrderRefunded
)

#: Event name -> schema of its properties.
ECOMMERCE_SCHEMAS: Final[dict[str, type[msgspec.Struct]]] = {
    "Product Viewed": ProductViewed,
    "Product Clicked": ProductViewed,
    "Product List Viewed": ProductListViewed,
    "Product List Filtered": ProductListViewed,
    "Products Searched": ProductsSearched,
    "Product Added": CartChange,
    "Product Removed": CartChange,
    "Cart Viewed": CartSnapshot,
    "Checkout Started": CartSnapshot,
    "Order Completed": OrderCompleted,
    "Order Refunded": OrderRefunded,
}

_CART_CHANGES: Final = frozenset({"Product Added", "Product Removed"})


class TraitsUpdate(msgspec.Struct, gc=False, kw_only=True, omit_defaults=True):
    """What an identify call says about the user. None means "not given"."""

    email: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    locale: str | None = None
    timezone: str | None = None
    consent: dict[str, ConsentState] = {}
    extra: dict[str, Any] = {}


class Identity(msgspec.Struct, gc=False, frozen=True):
    user_id: str = ""
    anonymous_id: str = ""

    @classmethod
    def exactly_one(cls, user_id: str, anonymous_id: str) -> Identity:
        """The identity a request names, which must be one of the two ids."""
        if bool(user_id) == bool(anonymous_id):
            raise InvalidInput.field("user_id", "give exactly one of user_id and anonymous_id")
        return cls(user_id, anonymous_id)

    @property
    def key(self) -> str:
        """The profile key: the user id when known, else the anonymous id.
        Prefixed so that a user id can never collide with an anonymous id."""
        return f"u:{self.user_id}" if self.user_id else f"a:{self.anonymous_id}"


class IncomingEvent(msgspec.Struct, gc=False, kw_only=True):
    """An event as an edge decoded it, not yet validated."""

    message_id: str
    # None when the sender named no kind (a gRPC Event with neither track nor identify).
    kind: EventKind | None
    user_id: str = ""
    anonymous_id: str = ""
    name: str = ""
    timestamp: datetime | None = None
    # A JSON object: track/page properties, or group traits.
    properties: bytes = b""
    traits: TraitsUpdate | None = None
    # Further traits of an identify call as a JSON object, merged into traits.extra.
    extra_traits: bytes = b""
    previous_id: str = ""
    group_id: str = ""


class Event(msgspec.Struct, gc=False, frozen=True, kw_only=True):
    """A validated event, ready to store and fold."""

    message_id: str
    identity: Identity
    #: identity.key, made once: every stage of ingest keys by it.
    profile_key: str
    kind: EventKind
    name: str
    timestamp: datetime
    received_at: datetime
    properties: bytes
    payload: KnownPayload | TraitsUpdate | None = None
    previous_id: str = ""
    group_id: str = ""


@dataclass(frozen=True, slots=True)
class EventWindow:
    """Which event times are believable, measured from the server's clock when
    the event arrives. A time beyond either edge is refused (a client's clock
    or a parser gone wrong: a year 9999 event would hold a profile's consent
    and last activity for ever). Within the window, a time later than the
    arrival counts as the arrival: an event cannot have happened after it was
    received, and a time ahead by clock skew must not outrank a later change
    (an opt-out) in the profile's last-writer-wins order."""

    #: How far ahead of the server's clock an event may be dated.
    max_ahead: timedelta = timedelta(days=1)
    #: How long ago an event may have happened (history imports included).
    max_age: timedelta = timedelta(days=3650)


DEFAULT_WINDOW: Final = EventWindow()


# --------------------------------------------------------------------------
# Validation

_DECODERS: Final[dict[str, msgspec.json.Decoder[Any]]] = {
    name: msgspec.json.Decoder(schema) for name, schema in ECOMMERCE_SCHEMAS.items()
}
_OBJECT_DECODER: Final = msgspec.json.Decoder(dict[str, Any])
_ANY_DECODER: Final = msgspec.json.Decoder()
_EMAIL: Final = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_LOCALE: Final = re.compile(r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$")
_MSGSPEC_PATH: Final = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_MISSING_FIELD: Final = re.compile(r"^Object missing required field `(?P<field>[^`]+)`")


def validate(incoming: IncomingEvent, received_at: datetime, window: EventWindow = DEFAULT_WINDOW) -> Event:
    """Check ``incoming`` against the contract and return the typed event.

    Raises InvalidInput naming every field at fault that can be found
    without decoding further; nothing about the event is applied anywhere.
    """
    violations: list[FieldViolation] = []
    _check_id(violations, "message_id", incoming.message_id, MAX_MESSAGE_ID_CHARS, required=True)
    _check_id(violations, "user_id", incoming.user_id, MAX_ID_CHARS, required=False)
    _check_id(violations, "anonymous_id", incoming.anonymous_id, MAX_ID_CHARS, required=False)
    if not incoming.user_id and not incoming.anonymous_id:
        violations.append(FieldViolation("user_id", "user_id or anonymous_id is required"))
    kind = incoming.kind
    if kind is None:
        violations.append(FieldViolation("kind", "an event must be a track, an identify or an alias call"))
    timestamp = incoming.timestamp or received_at
    if timestamp.tzinfo is None:
        timestamp = timestamp.replace(tzinfo=UTC)
    # differences, not sums: a datetime difference cannot overflow, while
    # received_at + max_ahead could near the end of the calendar
    if timestamp - received_at > window.max_ahead or received_at - timestamp > window.max_age:
        _time_violation(violations, timestamp, received_at, window)

    name = incoming.name
    payload: KnownPayload | TraitsUpdate | None = None
    properties = incoming.properties or b"{}"
    if len(properties) > MAX_EVENT_BYTES:
        violations.append(
            FieldViolation("properties", f"is {len(properties)} bytes; the limit is {MAX_EVENT_BYTES}")
        )
    elif kind in (EventKind.TRACK, EventKind.PAGE, EventKind.GROUP):
        if kind is EventKind.TRACK:
            if not name:
                violations.append(FieldViolation("name", "is required for a track event"))
            elif len(name) > MAX_EVENT_NAME_CHARS:
                violations.append(FieldViolation("name", f"is longer than {MAX_EVENT_NAME_CHARS} characters"))
            elif not (name.isascii() and name.isprintable()) and _CONTROL.search(name):
                violations.append(FieldViolation("name", _CONTROL_DESCRIPTION))
        plain = _is_plain(properties)
        if not plain and (not_utf8 := _not_utf8(properties)) is not None:
            violations.append(FieldViolation("properties", not_utf8))
        elif not plain and nests_deeper(properties):
            violations.append(FieldViolation("properties", _DEPTH_DESCRIPTION))
        else:
            payload = _decode_properties(
                violations, name if kind is EventKind.TRACK else "", properties, check_ids=not plain
            )
    if kind is EventKind.IDENTIFY:
        payload = _traits(violations, incoming)
    if kind is EventKind.ALIAS:
        _check_id(violations, "previous_id", incoming.previous_id, MAX_ID_CHARS, required=True)
    if kind is EventKind.GROUP:
        _check_id(violations, "group_id", incoming.group_id, MAX_ID_CHARS, required=True)

    if violations:
        raise InvalidInput(_summary(violations), violations, reason="INVALID_EVENT")
    assert kind is not None  # a missing kind is a violation above

    identity = Identity(incoming.user_id, incoming.anonymous_id)
    return Event(
        message_id=incoming.message_id,
        identity=identity,
        profile_key=identity.key,
        kind=kind,
        name=name,
        timestamp=min(timestamp, received_at),  # see EventWindow
        received_at=received_at,
        properties=properties,
        payload=payload,
        previous_id=incoming.previous_id,
        group_id=incoming.group_id,
    )


def _summary(violations: list[FieldViolation]) -> str:
    first = violations[0]
    more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
    return f"invalid event: {first.field}: {first.description}{more}"


def _check_id(
    violations: list[FieldViolation], field: str, value: str, limit: int, *, required: bool
) -> None:
    if not value:
        if required:
            violations.append(FieldViolation(field, "is required"))
        return
    if len(value) > limit:
        violations.append(FieldViolation(field, f"is longer than {limit} characters"))
    elif value.isspace():
        violations.append(FieldViolation(field, "is blank"))
    elif not (value.isascii() and value.isprintable()) and _CONTROL.search(
        value
    ):  # see _has_control_character
        violations.append(FieldViolation(field, _CONTROL_DESCRIPTION))


_CONTROL_DESCRIPTION: Final = "contains a control character (U+0000 to U+001F or U+007F to U+009F)"
_DEPTH_DESCRIPTION: Final = f"nests objects and arrays deeper than {MAX_JSON_DEPTH} levels"


def _time_violation(
    violations: list[FieldViolation], timestamp: datetime, received_at: datetime, window: EventWindow
) -> None:
    if timestamp - received_at > window.max_ahead:
        violations.append(
            FieldViolation(
                "timestamp",
                f"is {timestamp.isoformat()}, more than {_span(window.max_ahead)} ahead of the"
                f" server's clock ({received_at.isoformat(timespec='seconds')})",
            )
        )
    elif received_at - timestamp > window.max_age:
        violations.append(
            FieldViolation(
                "timestamp",
                f"is {timestamp.isoformat()}, more than {_span(window.max_age)} before the"
                f" server's clock ({received_at.isoformat(timespec='seconds')}); older history is not accepted",
            )
        )


def _span(delta: timedelta) -> str:
    if delta.days and not delta.seconds and not delta.microseconds:
        return f"{delta.days} day{'s' if delta.days != 1 else ''}"
    return f"{delta.total_seconds():g} seconds"


def _not_utf8(raw: bytes) -> str | None:
    """Why ``raw`` is not UTF-8 text, or None. msgspec skips the properties a
    schema does not name without reading their strings: without this, bad
    bytes there would be stored, and fail whoever decodes them later."""
    if raw.isascii():
        return None
    try:
        raw.decode()
    except UnicodeDecodeError as exc:
        return f"is not valid UTF-8 (byte {exc.start}: {exc.reason})"
    return None


def nests_deeper(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON ``raw`` nests objects and arrays deeper than ``limit``.

    Most events have fewer opening brackets than the limit, which bounds their
    depth without parsing. The rest are parsed (msgspec's RecursionError means
    deeper than any limit we set) and walked without recursion. Invalid JSON
    answers False: the decoding that follows reports it."""
    if raw.count(b"{") + raw.count(b"[") <= limit:
        return False
    try:
        value = _ANY_DECODER.decode(raw)
    except RecursionError:
        return True
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError):
        return False
    return value_nests_deeper(value, limit)


def value_nests_deeper(value: object, limit: int = MAX_JSON_DEPTH) -> bool:
    """``nests_deeper`` for a decoded JSON value."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, dict | list):
                if depth >= limit:
                    return True
                stack.append((child, depth + 1))
    return False


def _decode_properties(
    violations: list[FieldViolation], name: str, properties: bytes, *, check_ids: bool
) -> KnownPayload | None:
    """The typed properties of a known event (None for a custom one). ``check_ids``:
    look for control characters in its ids (not needed for _is_plain JSON)."""
    decoder = _DECODERS.get(name)
    try:
        if decoder is None:
            _OBJECT_DECODER.decode(properties)  # custom event: any JSON object
            return None
        payload: KnownPayload = decoder.decode(properties)
    except msgspec.ValidationError as exc:
        violations.append(_violation_from_msgspec("properties", str(exc)))
        return None
    except msgspec.DecodeError as exc:
        violations.append(FieldViolation("properties", f"is not valid JSON: {exc}"))
        return None
    if check_ids:
        _check_property_ids(violations, payload)
    is_cart_change = name in _CART_CHANGES and isinstance(payload, CartChange)
    if is_cart_change and payload.product_id is None and payload.sku is None:  # type: ignore[union-attr]
        violations.append(FieldViolation("properties.product_id", f"{name} needs product_id or sku"))
    return payload


#: The properties that are ids, in any schema and in each of its products.
_PROPERTY_IDS: Final = ("product_id", "sku", "cart_id", "checkout_id", "order_id", "list_id")


def _is_plain(raw: bytes) -> bool:
    """True for the JSON of most events: ASCII (so valid UTF-8), with fewer
    brackets than the depth limit (so not nested deeper), and unable to hold a
    control character in a string (JSON escapes U+0000-U+001F with a backslash;
    U+007F is byte 7F; U+0080-U+009F are not ASCII). One cheap test spares the
    exact ones: they cost a sizeable share of validating an event."""
    return (
        raw.isascii()
        and b"\\" not in raw
        and b"\x7f" not in raw
        and raw.count(b"{") + raw.count(b"[") <= MAX_JSON_DEPTH
    )


def _check_property_ids(violations: list[FieldViolation], payload: KnownPayload) -> None:
    items: list[tuple[str, object]] = [("", payload)]
    items.extend((f".products[{i}]", p) for i, p in enumerate(getattr(payload, "products", ())))
    for path, item in items:
        for name in _PROPERTY_IDS:
            value = getattr(item, name, None)
            if type(value) is str and _has_control_character(value):
                violations.append(FieldViolation(f"properties{path}.{name}", _CONTROL_DESCRIPTION))


def _has_control_character(value: str) -> bool:
    # isprintable is exact for ASCII (no control characters) and far cheaper than the regex
    return not (value.isascii() and value.isprintable()) and _CONTROL.search(value) is not None


def _violation_from_msgspec(prefix: str, message: str) -> FieldViolation:
    """Turn msgspec's "Expected `int`, got `str` - at `$.products[0].quantity`"
    into a field path and a description."""
    path = ""
    if match := _MSGSPEC_PATH.search(message):
        path = match.group("path")
        message = message[: match.start()]
    if match := _MISSING_FIELD.match(message):
        path = f"{path}.{match.group('field')}"
        message = "is required"
    if not path:
        message = message.replace("Expected `object`", "Expected a JSON object")
    return FieldViolation(prefix + path, message)


def _traits(violations: list[FieldViolation], incoming: IncomingEvent) -> TraitsUpdate:
    traits = incoming.traits or TraitsUpdate()
    if incoming.extra_traits:
        if len(incoming.extra_traits) > MAX_EVENT_BYTES:
            violations.append(FieldViolation("extra_traits", f"are larger than {MAX_EVENT_BYTES} bytes"))
            return traits
        if (not_utf8 := _not_utf8(incoming.extra_traits)) is not None:
            violations.append(FieldViolation("extra_traits", not_utf8))
            return traits
        if nests_deeper(incoming.extra_traits):
            violations.append(FieldViolation("extra_traits", _DEPTH_DESCRIPTION))
            return traits
        try:
            extra = _OBJECT_DECODER.decode(incoming.extra_traits)
        except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError) as exc:
            violations.append(FieldViolation("extra_traits", f"must be a JSON object: {exc}"))
            return traits
        traits = msgspec.structs.replace(traits, extra={**extra, **traits.extra})
    _check_traits(violations, traits)
    return traits


def _check_traits(violations: list[FieldViolation], traits: TraitsUpdate) -> None:
    if traits.email is not None and (len(traits.email) > 254 or not _EMAIL.match(traits.email)):
        violations.append(FieldViolation("traits.email", "is not an email address"))
    if traits.locale is not None and not _LOCALE.match(traits.locale):
        violations.append(FieldViolation("traits.locale", "is not a BCP 47 language tag such as en-GB"))
    if traits.timezone is not None and not is_known_timezone(traits.timezone):
        violations.append(
            FieldViolation("traits.timezone", "is not an IANA time zone name such as Europe/Berlin")
        )
    violations.extend(
        FieldViolation("traits.consent", f"has an invalid group name {group!r}")
        for group in traits.consent
        if not group or len(group) > MAX_ID_CHARS or _CONTROL.search(group)
    )
    if len(msgspec.json.encode(traits.extra)) > MAX_EVENT_BYTES:
        violations.append(FieldViolation("traits", f"are larger than {MAX_EVENT_BYTES} bytes"))


@functools.lru_cache(maxsize=1024)
def is_known_timezone(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def product_key(product: ProductFields) -> str:
    """How a product is told apart in carts and views: its id, else its SKU."""
    return str(product.product_id if product.product_id is not None else product.sku)


def known_payload(name: str, properties: bytes) -> KnownPayload | None:
    """The typed properties of a stored event of a known name, or None."""
    decoder = _DECODERS.get(name)
    if decoder is None:
        return None
    try:
        payload: KnownPayload = decoder.decode(properties)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    return payload
