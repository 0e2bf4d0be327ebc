"""Segments: who a broadcast goes to, as a CEL expression over the profile.

CEL (Google's Common Expression Language) is evaluated by the Rust-backed
``common-expression-language`` package: a well-kept, side-effect-free,
non-Turing-complete language with a specification, rather than a home-made
one. Measured on this machine against the pure-Python ``cel-python`` for
``traits.country == "DE"``: about 100,000 against 9,000 evaluations per
second (a tenth of the cost); see benchmarks/broadcast.py.

An expression is compiled once, and checked when it is made: its syntax (the
error names the line and column and draws a caret under them), the names it
uses (each must be one of ``VARIABLES``, or bound by a macro such as
``viewed.exists(v, ...)``) and its result on a made-up profile (it must give
true or false). Most of the cost of one evaluation is turning Python values
into CEL values, so the activation holds only the names the expression uses,
each built from the profile only when used.

The evaluation of a stored profile never raises: an expression that errs on
one profile (``traits.country`` where a profile has no such trait; write
``has(traits.country) && ...`` or ``"country" in traits && ...``)
counts it as not in the segment and as an error, so a count can say so.

Nothing here does I/O; the service that streams profiles from the store
through ``evaluate_rows`` is sendtime.server.broadcasting.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, Final, get_type_hints

import cel
import msgspec

from sendtime.server.domain.errors import FieldViolation, InvalidInput
from sendtime.server.domain.profile import (
    CartState,
    Line,
    OrderState,
    Profile,
    Stamped,
    Viewed,
    open_carts,
)

MAX_EXPRESSION_CHARS: Final = 4000
_NAME: Final = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
#: ``list.exists(v, ...)`` and the other macros bind a name of their own.
_BOUND: Final = re.compile(r"\.\s*(?:all|exists|exists_one|existsOne|map|filter)\s*\(\s*([A-Za-z_]\w*)\s*,")
_POSITION: Final = re.compile(r"<input>:(\d+):(\d+): (.*)")


def _text(registers: dict[str, Stamped], name: str) -> str:
    stamped = registers.get(name)
    return stamped.value if stamped is not None and isinstance(stamped.value, str) else ""


def _traits(p: Profile, _now: datetime) -> dict[str, Any]:
    traits = {k: v.value for k, v in p.extra_traits.items()}
    traits.update((k, v.value) for k, v in p.traits.items())
    return traits


def _some_traits(keys: frozenset[str]) -> Callable[[Profile, datetime], dict[str, Any]]:
    """``traits`` holding only ``keys``: turning a map into CEL's costs by its size."""

    def build(p: Profile, _now: datetime) -> dict[str, Any]:
        found = {}
        for key in keys:
            stamped = p.traits.get(key) or p.extra_traits.get(key)
            if stamped is not None:
                found[key] = stamped.value
        return found

    return build


def _some_consent(keys: frozenset[str]) -> Callable[[Profile, datetime], dict[str, Any]]:
    def build(p: Profile, _now: datetime) -> dict[str, Any]:
        return {key: str(p.consent[key].value) for key in keys if key in p.consent}

    return build


def _carts(p: Profile, _now: datetime) -> list[dict[str, Any]]:
    return [
        {
            "cart_id": cart.cart_id,
            "total": _lines_total(cart.lines),
            "quantity": sum(line.quantity for line in cart.lines),
            "product_ids": [line.product_id for line in cart.lines],
            "categories": sorted({line.category for line in cart.lines if line.category}),
            "updated_at": cart.updated_at,
        }
        for cart in open_carts(p)
    ]


def _lines_total(lines: Sequence[Line]) -> float:
    return float(sum((line.price or 0.0) * line.quantity for line in lines))


def _completed(p: Profile) -> list[OrderState]:
    return [o for o in p.orders.values() if o.completed is not None and o.refunded is None]


def _orders(p: Profile, _now: datetime) -> list[dict[str, Any]]:
    return [
        {
            "order_id": o.order_id,
            "total": float(o.total or 0.0),
            "currency": o.currency,
            "product_ids": list(o.product_ids),
            "completed_at": o.completed[0] if o.completed else None,
            "refunded": o.refunded is not None,
        }
        for o in p.orders.values()
    ]


def _last_order_at(p: Profile, _now: datetime) -> datetime | None:
    times = [o.completed[0] for o in p.orders.values() if o.completed is not None]
    return max(times) if times else None


def _viewed(p: Profile, _now: datetime) -> list[dict[str, Any]]:
    return [_viewed_item(v) for v in p.viewed.values()]


def _viewed_item(v: Viewed) -> dict[str, Any]:
    return {
        "product_id": v.line.product_id,
        "category": v.line.category,
        "name": v.line.name,
        "price": float(v.line.price or 0.0),
        "viewed_at": v.viewed_at,
    }


def _open_cart_lines(p: Profile) -> list[Line]:
    return [line for cart in open_carts(p) for line in cart.lines]


#: The names an expression can use, how each is made from a profile, and what
#: it means (the README's table and the error for an unknown name come from here).
VARIABLES: Final[dict[str, tuple[Callable[[Profile, datetime], Any], str]]] = {
    "user_id": (lambda p, _n: p.user_id, "string"),
    "anonymous_id": (lambda p, _n: p.anonymous_id, "string"),
    "email": (lambda p, _n: _text(p.traits, "email"), 'string ("" when unknown)'),
    "timezone": (lambda p, _n: _text(p.traits, "timezone"), 'string, IANA name ("" when unknown)'),
    "traits": (_traits, "map: email, first_name, last_name, locale, timezone and every other trait"),
    "consent": (
        lambda p, _n: {k: str(v.value) for k, v in p.consent.items()},
        'map: subscription group -> "opted_in" | "opted_out"',
    ),
    "carts": (_carts, "list of open carts: cart_id, total, quantity, product_ids, categories, updated_at"),
    "cart_total": (lambda p, _n: _lines_total(_open_cart_lines(p)), "double: open carts' value"),
    "cart_quantity": (
        lambda p, _n: sum(line.quantity for line in _open_cart_lines(p)),
        "int: items in open carts",
    ),
    "orders": (_orders, "list: order_id, total, currency, product_ids, completed_at, refunded"),
    "order_count": (lambda p, _n: len(_completed(p)), "int: completed orders not refunded"),
    "order_total": (
        lambda p, _n: float(sum(o.total or 0.0 for o in _completed(p))),
        "double: their total",
    ),
    "last_order_at": (_last_order_at, "timestamp of the last completed order, or null"),
    "viewed": (_viewed, "list of recently viewed products: product_id, category, name, price, viewed_at"),
    "viewed_products": (lambda p, _n: list(p.viewed), "list of recently viewed product ids"),
    "viewed_categories": (
        lambda p, _n: sorted({v.line.category for v in p.viewed.values() if v.line.category}),
        "list of their categories",
    ),
    "first_seen_at": (lambda p, _n: p.first_seen_at, "timestamp of the first event, or null"),
    "last_activity_at": (lambda p, _n: p.last_activity_at, "timestamp of the latest event, or null"),
    "event_count": (lambda p, _n: p.event_count, "int: events seen"),
    "now": (lambda _p, n: n, "timestamp: when the segment is evaluated"),
}


def _narrowed(
    whole: Callable[[Profile, datetime], list[dict[str, Any]]],
) -> Callable[[frozenset[str]], Callable[[Profile, datetime], list[dict[str, Any]]]]:
    """A list-of-maps name whose maps hold only the fields the expression may read."""

    def narrowed(read: frozenset[str]) -> Callable[[Profile, datetime], list[dict[str, Any]]]:
        def build(p: Profile, now: datetime) -> list[dict[str, Any]]:
            return [{k: v for k, v in item.items() if k in read} for item in whole(p, now)]

        return build

    return narrowed


def _viewed_fields(read: frozenset[str]) -> Callable[[Profile, datetime], list[dict[str, Any]]]:
    """``viewed`` with only the fields read (the common case, built directly:
    a timestamp per item is the dearest value to hand to CEL)."""
    category, at, product = "category" in read, "viewed_at" in read, "product_id" in read
    if "name" in read or "price" in read:
        return _narrowed(_viewed)(read)

    def build(p: Profile, _now: datetime) -> list[dict[str, Any]]:
        items = []
        for v in p.viewed.values():
            item: dict[str, Any] = {}
            if category:
                item["category"] = v.line.category
            if at:
                item["viewed_at"] = v.viewed_at
            if product:
                item["product_id"] = v.line.product_id
            items.append(item)
        return items

    return build


_ITEMS: Final = {"viewed": _viewed_fields, "orders": _narrowed(_orders), "carts": _narrowed(_carts)}


#: The profile's fields each name reads (a profile is decoded with those only).
_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "user_id": ("user_id",),
    "anonymous_id": ("anonymous_id",),
    "email": ("traits",),
    "timezone": ("traits",),
    "traits": ("traits", "extra_traits"),
    "consent": ("consent",),
    "carts": ("carts", "all_carts_cleared_through"),
    "cart_total": ("carts", "all_carts_cleared_through"),
    "cart_quantity": ("carts", "all_carts_cleared_through"),
    "orders": ("orders",),
    "order_count": ("orders",),
    "order_total": ("orders",),
    "last_order_at": ("orders",),
    "viewed": ("viewed",),
    "viewed_products": ("viewed",),
    "viewed_categories": ("viewed",),
    "first_seen_at": ("first_seen_at",),
    "last_activity_at": ("last_activity_at",),
    "event_count": ("event_count",),
    "now": (),
}
#: What a recipient needs whatever the expression reads.
_RECIPIENT_FIELDS: Final = ("user_id", "anonymous_id", "traits")
_SELECTION: Final = r"\s*\.\s*([A-Za-z_]\w*)(?!\s*\()"


def _selected_keys(source: str, name: str) -> frozenset[str] | None:
    """The keys of map ``name`` the expression reads, when it only ever
    selects fields of it (``traits.country``, ``has(traits.country)``);
    None when it uses the map otherwise (``"x" in traits``, ``size(traits)``)."""
    keys = set()
    for found in re.finditer(rf"(?<![\w.]){name}\b", source):
        selected = re.match(_SELECTION, source[found.end() :])
        if selected is None:
            return None
        keys.add(selected.group(1))
    return frozenset(keys)


def _decoder(fields: set[str]) -> Callable[[bytes], Any]:
    """A msgpack decoder of the stored Profile that builds only ``fields``
    (the others are skipped, not made into objects)."""
    hints = get_type_hints(Profile)
    defaults = {f.name: f for f in msgspec.structs.fields(Profile)}
    spec = []
    for name in sorted(fields):
        info = defaults[name]
        default = (
            info.default
            if info.default is not msgspec.NODEFAULT
            else msgspec.field(default_factory=info.default_factory)
        )
        spec.append((name, hints[name], default))
    narrow = msgspec.defstruct("SegmentProfile", spec, kw_only=True, gc=False)
    return msgspec.msgpack.Decoder(narrow).decode


class Recipient(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """What planning a broadcast needs of a profile in the segment."""

    profile_key: str
    user_id: str
    anonymous_id: str
    #: The profile's time zone trait ("" when it has none).
    timezone: str


@dataclass(slots=True)
class Matches:
    """What one batch of profiles gave."""

    scanned: int = 0
    matched: int = 0
    recipients: list[Recipient] | None = None
    #: Profiles the expression erred on (not in the segment), and the first error.
    errors: int = 0
    first_error: str = ""


_decode_profile = msgspec.msgpack.Decoder(Profile).decode


class CompiledSegment:
    """An expression compiled once; evaluated per profile."""

    def __init__(self, expression: str, program: Any, names: Sequence[str]) -> None:
        self.expression = expression
        self._program = program
        builders = []
        # every field name the expression could read of a list's items: what
        # it selects anywhere (v.category) and the strings it spells ("category" in v)
        read = frozenset(re.findall(_SELECTION, expression)) | frozenset(
            re.findall(r"[\"']([A-Za-z_]\w*)[\"']", expression)
        )
        for name in names:
            build = VARIABLES[name][0]
            keys = _selected_keys(expression, name) if name in ("traits", "consent") else None
            if keys is not None:
                build = _some_traits(keys) if name == "traits" else _some_consent(keys)
            elif name in _ITEMS:
                build = _ITEMS[name](read)
            builders.append((name, build))
        self._builders = tuple(builders)
        fields = {field for name in names for field in _FIELDS[name]}
        self._decode = _decoder(fields | set(_RECIPIENT_FIELDS))
        self._decode_for_count = _decoder(fields)

    def matches(self, profile: Profile, now: datetime) -> bool:
        """True when ``profile`` is in the segment; raises what CEL raised."""
        activation = {name: build(profile, now) for name, build in self._builders}
        return self._program.execute(activation) is True

    def evaluate_rows(
        self, rows: Sequence[tuple[str, bytes]], now: datetime, *, keep: bool = True
    ) -> Matches:
        """Stored profiles (key, msgpack) in, those in the segment out (with
        ``keep``; else only counted). Never raises for one profile."""
        found = Matches(scanned=len(rows), recipients=[] if keep else None)
        decode = self._decode if keep else self._decode_for_count
        builders = self._builders
        execute = self._program.execute
        for key, doc in rows:
            try:
                # a narrow profile: the builders read only the fields it has
                profile = decode(doc)
                hit = execute({name: build(profile, now) for name, build in builders}) is True
            except Exception as error:  # one profile the expression errs on
                found.errors += 1
                if not found.first_error:
                    found.first_error = f"{key}: {_described(error)}"
                continue
            if hit:
                found.matched += 1
                if found.recipients is not None:
                    found.recipients.append(
                        Recipient(
                            key, profile.user_id, profile.anonymous_id, _text(profile.traits, "timezone")
                        )
                    )
        return found


def _described(error: Exception) -> str:
    if isinstance(error, KeyError):
        return f"no {error.args[0]!r} in this profile (guard it with has(...))"
    return str(error)


def compile_segment(expression: str, *, field: str = "expression") -> CompiledSegment:
    """Compile and check ``expression``; InvalidInput naming ``field`` and the
    place in the expression when it is not a valid segment."""
    source = expression.strip()
    if not source:
        raise InvalidInput.field(field, 'is empty: give a CEL expression, e.g. traits.country == "DE"')
    if len(source) > MAX_EXPRESSION_CHARS:
        raise InvalidInput.field(field, f"is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        program = cel.compile(source)
    except (ValueError, RuntimeError) as error:
        raise _syntax_error(field, source, str(error)) from None
    bound = set(_BOUND.findall(source))
    used = [name for name in program.variables() if name not in bound]
    unknown = [name for name in used if name not in VARIABLES]
    if unknown:
        name = unknown[0]
        where = re.search(rf"\b{re.escape(name)}\b", source)
        column = where.start() + 1 if where else 0
        raise _invalid(
            field,
            f"unknown name {name!r} at column {column} (known names: {', '.join(VARIABLES)})"
            f"{_caret(source, column)}",
        )
    compiled = CompiledSegment(source, program, [n for n in VARIABLES if n in used])
    _try_on_sample(compiled, field)
    return compiled


def _try_on_sample(compiled: CompiledSegment, field: str) -> None:
    """Evaluate on a made-up profile: a type error (comparing a string with a
    number, a function that does not exist) or a result that is not a boolean
    shows now rather than as a segment nobody is in."""
    try:
        result = compiled._program.execute(
            {name: build(SAMPLE_PROFILE, _SAMPLE_NOW) for name, build in compiled._builders}
        )
    except KeyError:
        return  # a trait or group the sample lacks: fine (real profiles may have it)
    except Exception as error:
        raise _invalid(field, f"cannot be evaluated: {error}") from None
    if not isinstance(result, bool):
        raise _invalid(field, f"gives {type(result).__name__} {result!r}, not true or false")


def _syntax_error(field: str, source: str, message: str) -> InvalidInput:
    found = _POSITION.search(message)
    if found is None:
        return _invalid(field, message)
    line, column, what = int(found.group(1)), int(found.group(2)), found.group(3)
    text = source.splitlines()[line - 1] if source.splitlines() else source
    # CEL counts columns from 1, as people do
    return _invalid(field, f"{what.strip()} at line {line}, column {column}{_caret(text, column)}")


def _caret(text: str, column: int) -> str:
    """The line and a caret under ``column`` (1-based), for a person to read."""
    if column <= 0:
        return ""
    first = text.splitlines()[0] if text else ""
    return f"\n  {first}\n  {' ' * (column - 1)}^"


def _invalid(field: str, description: str) -> InvalidInput:
    return InvalidInput(f"{field}: {description}", [FieldViolation(field, description)])


def check_name(name: str, *, field: str = "name") -> str:
    if not _NAME.match(name):
        raise InvalidInput.field(
            field, "must be 1-64 characters of a-z, 0-9, '_' and '-', starting with a letter or digit"
        )
    return name


class Segment(msgspec.Struct, frozen=True, kw_only=True):
    """A named, stored segment."""

    name: str
    expression: str
    description: str = ""
    #: "config" for [[segments]] in the settings, "api" for one made through the API.
    source: str = "api"


# -- a made-up profile for checking expressions --------------------------------

_SAMPLE_NOW: Final = datetime(2026, 1, 1, tzinfo=UTC)
_AT: Final = _SAMPLE_NOW - timedelta(days=1)


def _sample_profile() -> Profile:
    line = Line(product_id="p1", name="Boot", price=10.0, currency="EUR", quantity=1, category="boots")
    return Profile(
        user_id="u1",
        traits={
            "email": Stamped("a@example.com", _AT, "m"),
            "first_name": Stamped("Ada", _AT, "m"),
            "locale": Stamped("de-DE", _AT, "m"),
            "timezone": Stamped("Europe/Berlin", _AT, "m"),
        },
        extra_traits={"country": Stamped("DE", _AT, "m")},
        consent={"marketing": Stamped("opted_in", _AT, "m")},
        carts={"c1": CartState(cart_id="c1", updated_at=_AT)},
        viewed={"p1": Viewed(line=line, viewed_at=_AT)},
        orders={
            "o1": OrderState(
                order_id="o1", total=10.0, currency="EUR", product_ids=["p1"], completed=(_AT, "m")
            )
        },
        first_seen_at=_AT,
        last_activity_at=_AT,
        event_count=3,
    )


SAMPLE_PROFILE: Final = _sample_profile()


@lru_cache(maxsize=16)
def _compiled(expression: str) -> CompiledSegment:
    return compile_segment(expression)


def evaluate_batch(expression: str, rows: Sequence[tuple[str, bytes]], now: datetime, keep: bool) -> Matches:
    """``CompiledSegment.evaluate_rows``, for a worker process: the
    expression compiled once per process (it was checked when it was made)."""
    return _compiled(expression).evaluate_rows(rows, now, keep=keep)
