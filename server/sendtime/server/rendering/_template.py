"""One parsed template, and rendering it: Liquid, then MJML, then the text part.

Parsing does all the work that does not depend on the data (TOML, Liquid
parse, static checks, a trial render with every block at its fallback), so a
template that loads renders. The hot path is ``Template.render``: a shallow
copy of the context and three Liquid renders; MJML and the text part's reading
of the HTML run once per markup shape (the markup with a mark in place of each
data value, so it varies only with the template's branches and loop counts),
and per user the values go back in. The result is byte for byte what
``render_whole`` (MJML over each user's whole markup, text read from its HTML)
gives; a shape is reused only after its first use showed that.
"""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from collections import OrderedDict
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from functools import lru_cache
from pathlib import Path
from typing import Any, Final, cast

import mjml
import msgspec
from liquid import BoundTemplate, Environment
from liquid.exceptions import LiquidError
from liquid.span import Span

from ._errors import TemplateError
from ._liquid import ALLOWED_GLOBALS, MARK_OPEN, MARK_PATTERN, MARKS, RESERVED_NAMES, Marked, make_environment
from ._spec import BlockSpec, SourceParts, TemplateSpec, TextOptions, split_source
from ._text import FlowShape, html_to_text, shape_flow

log = logging.getLogger(__name__)

VERSION_HEX_CHARS: Final = 12

DEFAULT_LINKS: Final[Mapping[str, str]] = {
    "unsubscribe_url": "#",
    "preferences_url": "#",
    "view_in_browser_url": "#",
}

# Header-breaking characters: CR, LF and the rest of C0/C1 controls, plus the
# Unicode line and paragraph separators some clients also break on.
_HEADER_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff\ufffe\uffff]+")
# What XML 1.0 (and so MJML's parser) refuses: C0 controls but tab, LF and CR;
# lone surrogates; U+FFFE and U+FFFF.
_XML_INVALID = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]+")
_SPACES = re.compile(r" {2,}")
_MJML_POSITION = re.compile(r"position (\d+):(\d+)")
#: A value that takes the whole-markup path: ASCII controls, a mark's opening,
#: and whitespace other than single inner spaces, which markup may fold...
_NOT_PLAIN_ASCII = re.compile(f"[\\x00-\\x1f\\x7f]|  |^ | $|{re.escape(MARK_OPEN)}")
#: ... and, beyond ASCII, characters MJML writes escaped in attributes
#: (Rust's escape_debug: controls, format characters, surrogates, private
#: use, unassigned, line and paragraph separators, combining marks).
_ESCAPED_BY_MJML: Final = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Mn", "Me"})
#: Distinct markup shapes compiled per template (LRU): a shape is the markup
#: with every data value replaced by a mark, so it varies only with the
#: template's branches and loop counts (cart lines, price drops, offers...).
MAX_SHAPES: Final = 512
#: Values known to be plain or not: the catalog's names, prices and URLs come
#: back in email after email (each check is a regex search and a scan).
PLAIN_VALUES_KEPT: Final = 16_384


class RenderedEmail(msgspec.Struct, frozen=True, kw_only=True):
    """A rendered email. ``fell_back`` names the blocks rendered from the
    template's fallback: missing or None in the context, not an object, or
    data the template could not render."""

    template_id: str
    version: str
    subject: str
    preheader: str
    html: str
    text: str
    fell_back: tuple[str, ...] = ()


class Dialect:
    """The two Liquid environments templates are parsed with: HTML-escaping
    for the body, plain for subject and preheader. Immutable once built; a
    TemplateStore makes one and parses every template with it."""

    __slots__ = ("html", "plain")

    def __init__(self) -> None:
        self.html = make_environment(autoescape=True)
        self.plain = make_environment(autoescape=False)


def content_version(source: bytes) -> str:
    return hashlib.sha256(source).hexdigest()[:VERSION_HEX_CHARS]


def _no_include(path: str) -> str:
    raise ValueError(f"mj-include of {path!r} is not available: sendtime templates cannot load other files")


class Template:
    """A parsed template. Build with ``parse_template`` or ``load_template``."""

    __slots__ = ("_body", "_preheader", "_shapes", "_subject", "blocks", "id", "path", "spec", "version")

    def __init__(
        self,
        *,
        spec: TemplateSpec,
        path: Path,
        version: str,
        subject: BoundTemplate,
        preheader: BoundTemplate,
        body: BoundTemplate,
    ) -> None:
        self.spec = spec
        self.id = spec.id
        self.path = path
        self.version = version
        self.blocks: Mapping[str, BlockSpec] = spec.blocks
        self._subject = subject
        self._preheader = preheader
        self._body = body
        #: Marked markup -> its compiled HTML (marks in place of the values)
        #: and its text reading (None: read each email's HTML), or None when
        #: the shape was found not to compile value for value. None for a
        #: template whose own text holds a mark's opening.
        self._shapes: OrderedDict[str, tuple[Marked, FlowShape | None] | None] | None = OrderedDict()

    def __repr__(self) -> str:
        return f"Template(id={self.id!r}, version={self.version!r}, path={str(self.path)!r})"

    def render(self, context: Mapping[str, Any]) -> RenderedEmail:
        """Render for one user. ``context`` is ``{"user": {...}, "links": {...},
        "<block>": data or None, ...}``. Never fails because of the data: a
        block the template cannot render is replaced by its fallback. Raises
        TemplateError only if the template fails with its own fallbacks."""
        scope, fell_back = self._scope(context)
        try:
            return self._render(scope, fell_back)
        except Exception as first_error:  # any failure the data causes degrades to fallbacks
            return self._render_degraded(scope, fell_back, first_error)

    def _scope(self, context: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        scope = dict(context)
        user = scope.get("user")
        scope["user"] = user if isinstance(user, Mapping) else {}
        links = scope.get("links")
        if isinstance(links, Mapping):
            scope["links"] = {**DEFAULT_LINKS, **{k: v for k, v in links.items() if v}}
        else:
            scope["links"] = DEFAULT_LINKS
        scope["vars"] = self.spec.vars
        fell_back = []
        for name, block in self.blocks.items():
            if not isinstance(scope.get(name), Mapping):
                scope[name] = block.fallback
                fell_back.append(name)
        return scope, fell_back

    def _render(self, scope: dict[str, Any], fell_back: list[str]) -> RenderedEmail:
        subject = header_text(self._subject.render(scope))
        preheader = header_text(self._preheader.render(scope))
        scope["email"] = {"subject": subject, "preheader": preheader, "template_id": self.id}
        html, text = self._html_and_text(scope)
        return RenderedEmail(
            template_id=self.id,
            version=self.version,
            subject=subject,
            preheader=preheader,
            html=html,
            text=text,
            fell_back=tuple(fell_back),
        )

    def _html_and_text(self, scope: dict[str, Any]) -> tuple[str, str]:
        """The body's HTML and text part: the same as compile_mjml(body markup)
        and html_to_text of it, made without compiling MJML or reading the
        HTML per user. Liquid runs with every data value recorded and a mark
        written in its place; the marked markup is compiled, and its HTML read
        for the text part, once per shape; per user the values go back in. A
        shape is used only if, the first time, that gave exactly what the whole
        markup gave; values MJML could treat differently take the whole path."""
        options = self.spec.text
        shapes = self._shapes
        if shapes is None:
            return _whole(compile_mjml(self._body.render(scope)), options)
        values: list[str] = []
        marked = self._body.render({**scope, MARKS: values})
        if not all(map(_plain, values)):
            return _whole(compile_mjml(_unmark(marked, values)), options)
        shape = shapes.get(marked, _UNSEEN)
        if shape is _UNSEEN:
            html, text = _whole(compile_mjml(_unmark(marked, values)), options)
            shapes[marked] = self._new_shape(marked, values, html, text)
            if len(shapes) > MAX_SHAPES:
                shapes.popitem(last=False)
            return html, text
        shapes.move_to_end(marked)
        if shape is None:
            return _whole(compile_mjml(_unmark(marked, values)), options)
        compiled, flow = cast("tuple[Marked, FlowShape | None]", shape)
        html = compiled.fill(values)
        decoded = _decoded(values) if flow is not None else None
        if flow is None or decoded is None:
            return html, html_to_text(html, options)
        return html, flow.text(decoded)

    def _new_shape(
        self, marked: str, values: list[str], html: str, text: str
    ) -> tuple[Marked, FlowShape | None] | None:
        """A shape's compiled HTML and text reading, each kept only if it gives
        this email's ``html`` and ``text`` exactly."""
        try:
            compiled = compile_mjml(marked)
        except ValueError:
            compiled = ""  # MJML refused the marks: the whole path's HTML differs
        shape_html = Marked(compiled)
        if not compiled or shape_html.fill(values) != html:
            log.info("template %s: a markup shape compiles differently with its values; not reused", self.id)
            return None
        options = self.spec.text
        reading = None if _MARK_IN_STYLE.search(compiled) else shape_flow(compiled, options)
        flow = FlowShape.of(reading, options) if reading is not None else None
        decoded = _decoded(values)
        if flow is not None and (decoded is None or flow.text(decoded) != text):
            flow = None
        return shape_html, flow

    def render_whole(self, context: Mapping[str, Any]) -> RenderedEmail:
        """Render as every template was rendered before shapes: Liquid, then
        MJML over the whole markup, then the text part. For comparison only."""
        scope, fell_back = self._scope(context)
        subject = header_text(self._subject.render(scope))
        preheader = header_text(self._preheader.render(scope))
        scope["email"] = {"subject": subject, "preheader": preheader, "template_id": self.id}
        html = compile_mjml(self._body.render(scope))
        return RenderedEmail(
            template_id=self.id,
            version=self.version,
            subject=subject,
            preheader=preheader,
            html=html,
            text=html_to_text(html, self.spec.text),
            fell_back=tuple(fell_back),
        )

    def _render_degraded(
        self, scope: dict[str, Any], fell_back: list[str], first_error: Exception
    ) -> RenderedEmail:
        # Replace the blocks that came with data by their fallbacks, one at a
        # time in declared order, until the email renders.
        log.warning(
            "template %s: rendering with the given data failed (%s); trying fallbacks", self.id, first_error
        )
        last_error: Exception = first_error
        for name, block in self.blocks.items():
            if name in fell_back:
                continue
            scope[name] = block.fallback
            fell_back.append(name)
            try:
                return self._render(scope, fell_back)
            except Exception as err:  # keep degrading
                last_error = err
        raise TemplateError(
            self.path,
            f"does not render even with every block at its fallback: {_describe(last_error)}",
            reason="TEMPLATE_RENDER_FAILED",
        ) from last_error

    def _trial_render(self, parts: SourceParts) -> None:
        """Render once with every block at its fallback and an empty user, so
        that a template that loads is known to render, MJML included."""
        scope, _ = self._scope({"user": {}})
        for field, parsed in (("subject", self._subject), ("preheader", self._preheader)):
            try:
                parsed.render(scope)
            except LiquidError as err:
                raise _liquid_error(self.path, err, field=field, line=parts.key_lines.get(field)) from None
        scope["email"] = {"subject": "", "preheader": "", "template_id": self.id}
        try:
            markup = self._body.render(scope)
        except LiquidError as err:
            raise _liquid_error(self.path, err, field="", line=None) from None
        try:
            compile_mjml(markup)
        except ValueError as err:  # mjml2html reports every problem as ValueError
            raise TemplateError(self.path, f"MJML: {_mjml_problem(str(err), markup)}") from None


_UNSEEN: Final = "\x00unseen"


_ENTITIES: Final = {"amp": "&", "lt": "<", "gt": ">", "quot": '"', "#34": '"', "#39": "'"}
_ENTITY = re.compile(r"&(amp|lt|gt|quot|#34|#39);")
#: A mark in a style attribute: the text reading hides elements by their style.
_MARK_IN_STYLE = re.compile(f'style="[^"]*{re.escape(MARK_OPEN)}')


def _whole(html: str, options: TextOptions) -> tuple[str, str]:
    return html, html_to_text(html, options)


def _decoded(values: list[str]) -> list[str] | None:
    """The values as an HTML parser reads them back (they were escaped for
    HTML), or None if one holds markup or an entity beyond those escaping makes."""
    decoded = []
    for value in values:
        if "<" in value or ">" in value:
            return None
        if "&" in value:
            if "&" in _ENTITY.sub("", value):
                return None
            value = _ENTITY.sub(lambda entity: _ENTITIES[entity.group(1)], value)
        decoded.append(value)
    return decoded


@lru_cache(maxsize=PLAIN_VALUES_KEPT)
def _plain(value: str) -> bool:
    """True if MJML copies ``value`` as it is wherever it stands."""
    if _NOT_PLAIN_ASCII.search(value):
        return False
    return value.isascii() or not any(unicodedata.category(c) in _ESCAPED_BY_MJML for c in value)


def _unmark(marked: str, values: list[str]) -> str:
    if not values:
        return marked
    return MARK_PATTERN.sub(lambda mark: values[int(mark.group(1))], marked)


def compile_mjml(markup: str) -> str:
    try:
        return mjml.mjml2html(markup, disable_comments=True, include_loader=_no_include)
    except ValueError:
        # Control characters in data are escaped by Liquid but still not XML;
        # looking for them only after a failure keeps the hot path free of a scan.
        cleaned = _XML_INVALID.sub("", markup)
        if cleaned == markup:
            raise
        return mjml.mjml2html(cleaned, disable_comments=True, include_loader=_no_include)


def header_text(value: str) -> str:
    """Subject and preheader become headers: no CR, LF or other controls."""
    return _SPACES.sub(" ", _HEADER_UNSAFE.sub(" ", value)).strip()


def load_template(path: Path, *, dialect: Dialect | None = None) -> Template:
    """Read and parse one template file."""
    try:
        source = path.read_bytes()
    except OSError as err:
        raise TemplateError(path, f"cannot be read: {err.strerror or err}") from None
    return parse_template(path, source, dialect=dialect)


def parse_template(path: Path, source: bytes, *, dialect: Dialect | None = None) -> Template:
    """Parse a template's bytes; ``path`` names it in errors and gives its id."""
    try:
        text = source.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TemplateError(path, f"is not UTF-8 (byte {err.start})") from None
    parts = split_source(path, text)
    spec = parts.spec
    dialect = dialect or Dialect()
    known_names = ALLOWED_GLOBALS | spec.blocks.keys()
    subject = _LiquidSource(path, "subject", spec.subject, parts.key_lines.get("subject"))
    preheader = _LiquidSource(path, "preheader", spec.preheader, parts.key_lines.get("preheader"))
    # Padded with the front matter's lines so Liquid's line numbers are the file's.
    body = _LiquidSource(path, "", "\n" * (parts.body_line - 1) + parts.body, None)
    template = Template(
        spec=spec,
        path=path,
        version=content_version(source),
        subject=subject.parse(dialect.plain, known_names),
        preheader=preheader.parse(dialect.plain, known_names),
        body=body.parse(dialect.html, known_names),
    )
    if MARK_OPEN in text:
        template._shapes = None  # its own text could pass for a mark
    template._trial_render(parts)
    return template


class _LiquidSource:
    """One piece of Liquid in a template file, and where its errors point."""

    def __init__(self, path: Path, field: str, source: str, line: int | None) -> None:
        self.path = path
        self.field = field  # "" for the body
        self.source = source
        self.line = line  # where a front-matter string is set; None for the body

    def parse(self, env: Environment, known_names: AbstractSet[str]) -> BoundTemplate:
        try:
            parsed = env.from_string(self.source, path=str(self.path))
        except LiquidError as err:
            raise _liquid_error(self.path, err, field=self.field, line=self.line) from None
        analysis = parsed.analyze(include_partials=False)
        for name, spans in analysis.filters.items():
            if name not in env.filters:
                hint = " (data is always escaped; there is no way to output it raw)" if name == "safe" else ""
                raise self.error(f"Liquid: unknown filter {name!r}{hint}", spans[0])
        for name, variables in analysis.globals.items():
            if name not in known_names:
                raise self.error(
                    f"uses {name!r}, which is neither a declared block ([blocks.{name}] in the front matter)"
                    f" nor one of {', '.join(sorted(RESERVED_NAMES))}",
                    variables[0].span,
                )
        return parsed

    def error(self, problem: str, span: Span) -> TemplateError:
        line, column = self.line, None
        if line is None:
            line, column = span.line_col(self.source)
            column += 1
        return TemplateError(self.path, problem, field=self.field, line=line, column=column)


def _liquid_error(path: Path, err: LiquidError, *, field: str, line: int | None) -> TemplateError:
    """``line`` is where a front-matter string starts; for the body, Liquid's
    own position is the file's (the body is parsed padded to its first line)."""
    column = None
    context = err.context()
    if line is None and context is not None:
        line, column = context[0], context[1] + 1
    return TemplateError(path, f"Liquid: {err.message}", field=field, line=line, column=column)


def _mjml_problem(message: str, markup: str) -> str:
    """mrml names a span of the Liquid output in bytes; quote the line it falls on."""
    match = _MJML_POSITION.search(message)
    if match is None:
        return message
    start = len(markup.encode("utf-8")[: int(match.group(1))].decode("utf-8", "ignore"))
    line_start = markup.rfind("\n", 0, start) + 1
    line_end = markup.find("\n", start)
    snippet = markup[line_start : line_end if line_end != -1 else len(markup)].strip()
    return f"{message}, in {snippet[:120]!r}"


def _describe(err: Exception) -> str:
    if isinstance(err, LiquidError):
        return str(err.message)
    return f"{type(err).__name__}: {err}"
