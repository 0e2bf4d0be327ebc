"""The Liquid dialect sendtime templates are written in.

Two environments share one set of tags and filters: the body is rendered with
autoescape on (it becomes HTML), subject and preheader with it off (they become
headers and plain text; the preheader is escaped again when the body outputs it).

What templates cannot do, by construction:
- load anything: ``include`` and ``render`` are refused at parse time, and no
  loader is configured, so a template can reach neither files nor the network;
- unescape data: the ``safe`` filter is removed, so every value that came from
  the caller is escaped on output, and only literal text in the template is not;
- run away: loops and output are bounded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import ClassVar, Final, TextIO, cast
from urllib.parse import urlsplit

from babel import Locale, UnknownLocaleError, numbers
from liquid import Environment, RenderContext, Undefined
from liquid.ast import Node
from liquid.builtin.expressions.filtered import Filter, FilteredExpression
from liquid.builtin.expressions.path import Path
from liquid.builtin.output import Output, OutputNode
from liquid.exceptions import LiquidSyntaxError
from liquid.filter import with_context
from liquid.stream import TokenStream
from liquid.stringify import to_liquid_string
from liquid.tag import Tag

# Names a template sees besides its blocks: the caller's user, the links the
# relay fills in, the rendered subject and preheader, and the template's own
# front-matter vars. A block may not take one of these names.
RESERVED_NAMES = frozenset({"user", "links", "email", "vars"})
# Loop helpers a static analysis reports as globals when used outside a loop.
_LOOP_NAMES = frozenset({"forloop", "tablerowloop"})
ALLOWED_GLOBALS = RESERVED_NAMES | _LOOP_NAMES

SAFE_URL_SCHEMES = frozenset({"http", "https", "mailto"})
DEFAULT_LOCALE = "en_US"


class _DisabledTag(Tag):
    """A tag refused at parse time, with a message that says why."""

    block = False

    def parse(self, stream: TokenStream) -> Node:
        raise LiquidSyntaxError(
            f"the '{self.name}' tag is not available: sendtime templates cannot load other files",
            token=stream.current,
        )


class _IncludeTag(_DisabledTag):
    name = "include"


class _RenderTag(_DisabledTag):
    name = "render"


_NOT_FOUND: Final = object()
#: The render-context key under which a render that records its outputs keeps
#: them (MARKS); no template can name it (a NUL is not part of any name).
MARKS = "\x00marks"
#: An output recorded as MARK_OPEN + its number + MARK_CLOSE. ASCII, which MJML
#: copies as it is everywhere (it escapes some other characters in attributes);
#: a value or template holding MARK_OPEN is never rendered by shape (see _template).
MARK_OPEN = "~m~"
MARK_CLOSE = "~"
MARK_PATTERN: Final = re.compile(f"{re.escape(MARK_OPEN)}(\\d+){re.escape(MARK_CLOSE)}")


class Marked:
    """A text with marks (compiled HTML, a text reading), cut at them once so
    that putting one user's values in is a join, not a search of the text."""

    __slots__ = ("_indexes", "_pieces")

    def __init__(self, text: str) -> None:
        # re.split with a group: [text, mark number, text, mark number, ..., text]
        self._pieces = MARK_PATTERN.split(text)
        self._indexes = [int(n) for n in self._pieces[1::2]]

    @property
    def has_marks(self) -> bool:
        return bool(self._indexes)

    def fill(self, values: Sequence[str]) -> str:
        """The text with each mark replaced by its value (``values[n]`` for mark n)."""
        if not self._indexes:
            return self._pieces[0]
        pieces = self._pieces.copy()
        pieces[1::2] = [values[n] for n in self._indexes]
        return "".join(pieces)


class _MarkingOutputNode(OutputNode):
    """``{{ ... }}``: writes its value, or, in a render that records its
    outputs (the context holds a MARKS list), a numbered mark in its place and
    the value in the list. Blank values and the template's own constants
    (``vars``) are written as they are, so they stay part of the markup's
    shape: what an MJML compile of the marked markup can depend on."""

    __slots__ = ("_constant", "_filters", "_path")

    def __init__(self, token: object, expression: object) -> None:
        super().__init__(token, expression)  # type: ignore[arg-type]
        root = str(self.expression).split(".", 1)[0].split(" ", 1)[0].split("|", 1)[0]
        self._constant = root == "vars"
        #: A plain ``{{ a.b.c | filters }}``: its names, looked up here when
        #: each is a key of a dict (python-liquid's lookup gives the same
        #: value then, through more calls); anything else goes its way.
        self._path: tuple[str, ...] | None = None
        self._filters: list[Filter] = []
        expression = self.expression
        if (
            type(expression) is FilteredExpression
            and type(expression.left) is Path
            and all(type(name) is str for name in expression.left.path)
        ):
            self._path = tuple(cast("list[str]", expression.left.path))
            self._filters = expression.filters or []

    def _value(self, context: RenderContext) -> object:
        path = self._path
        if path is not None:
            value = context.scope.get(path[0], _NOT_FOUND)
            for name in path[1:]:
                if type(value) is not dict or name not in value:
                    value = _NOT_FOUND
                    break
                value = value[name]
            if value is not _NOT_FOUND:
                for step in self._filters:
                    value = step.evaluate(value, context)
                return value
        return self.expression.evaluate(context)

    def render_to_output(self, context: RenderContext, buffer: TextIO) -> int:
        text = to_liquid_string(self._value(context), context.autoescape)
        marks = context.globals.get(MARKS) if not self._constant else None
        if marks is None or not text or text.isspace():
            return buffer.write(text)
        assert isinstance(marks, list)
        marks.append(text)
        return buffer.write(f"{MARK_OPEN}{len(marks) - 1}{MARK_CLOSE}")


class _MarkingOutput(Output):
    node_class = _MarkingOutputNode


class _BoundedEnvironment(Environment):
    # Upstream data decides how long loops run; a template gets enough for any
    # real email and not enough to stall the event loop. (No output limit: the
    # library enforces it by UTF-8 encoding every write, a cost on every render,
    # and output is already bounded by the data and the loop limit.)
    loop_iteration_limit: ClassVar[int | None] = 10_000
    output_stream_limit: ClassVar[int | None] = None
    local_namespace_limit: ClassVar[int | None] = None


def make_environment(*, autoescape: bool) -> Environment:
    env = _BoundedEnvironment(autoescape=autoescape, undefined=Undefined, strict_filters=True)
    env.add_tag(_MarkingOutput)
    env.add_tag(_IncludeTag)
    env.add_tag(_RenderTag)
    del env.filters["safe"]
    env.add_filter("money", money)
    env.add_filter("safe_url", safe_url)
    return env


def safe_url(value: object) -> str:
    """``{{ product.url | safe_url }}``: the URL if it is http(s), mailto or has
    no scheme at all (an ESP merge tag, a fragment), else ``#``. Escaping stops
    data from breaking out of an attribute; this stops ``javascript:`` links."""
    if not isinstance(value, str):
        return "#"
    return _checked_url(value)


@lru_cache(maxsize=8192)
def _checked_url(value: str) -> str:
    # urlsplit is ~2 us; an email's URLs are catalog products' own, met again and again.
    url = value.strip()
    if not url:
        return "#"
    try:
        scheme = urlsplit(url).scheme
    except ValueError:
        return "#"
    if scheme and scheme.lower() not in SAFE_URL_SCHEMES:
        return "#"
    return url


@with_context
def money(value: object, currency: object = "", *, context: RenderContext) -> str:
    """``{{ line.unit_price | money: cart.currency }}``: an amount in major units
    (number or numeric string) formatted for the user's locale (``user.locale``,
    BCP 47 or POSIX style). Unusable input renders as an empty string rather than
    failing the email."""
    user = context.resolve("user", default=None)
    locale = user.get("locale") if isinstance(user, Mapping) else None
    return _format_money(
        _amount_key(value),
        currency if isinstance(currency, str) else "",
        locale if isinstance(locale, str) else "",
    )


def _amount_key(value: object) -> str:
    if isinstance(value, bool):
        return ""
    if isinstance(value, int | float | Decimal | str):
        return str(value).strip()
    return ""


#: Formatted amounts kept: every catalog price in every locale met, plus line
#: totals, for a catalog of a few thousand products (4,096 held too few for
#: the content benchmark's 1,000 products in 5 locales: each miss is ~30 us of
#: babel, about 5% of a whole email's CPU). An entry is ~200 bytes.
MONEY_FORMATS_KEPT: Final = 32_768


@lru_cache(maxsize=MONEY_FORMATS_KEPT)
def _format_money(amount: str, currency: str, locale_tag: str) -> str:
    # babel takes ~30 us per call; emails repeat the same prices.
    try:
        number = Decimal(amount)
    except InvalidOperation:
        return ""
    if not number.is_finite():
        return ""
    locale = _locale(locale_tag)
    code = currency.strip().upper()
    if not code:
        return numbers.format_decimal(number, format="#,##0.00", locale=locale)
    return numbers.format_currency(number, code, locale=locale)


@lru_cache(maxsize=256)
def _locale(tag: str) -> Locale:
    try:
        return Locale.parse((tag or DEFAULT_LOCALE).replace("-", "_"))
    except (UnknownLocaleError, ValueError, TypeError):
        return _locale(DEFAULT_LOCALE)
