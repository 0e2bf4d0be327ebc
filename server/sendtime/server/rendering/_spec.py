"""A template file: TOML front matter between ``+++`` lines, then the MJML body.

A minimal one (``templates/welcome.mjml.liquid``)::

    +++
    id = "welcome"
    subject = "Welcome, {{ user.first_name | default: 'friend' }}"

    [blocks.recommendations.fallback]   # rendered when the block is missing
    products = []
    +++
    <mjml><mj-body> ... </mj-body></mjml>
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec

from ._errors import TemplateError
from ._liquid import RESERVED_NAMES

FENCE = "+++"
FILE_SUFFIX = ".mjml.liquid"

TemplateId = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]


class BlockSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A block the template needs. ``fallback`` (any JSON-like TOML table) is
    rendered in place of the block's data when the block is missing or failed,
    so it has the block's shape: ``{ lines = [] }`` for a cart."""

    fallback: dict[str, Any]
    description: str = ""


class TextOptions(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """How the plain-text part is made from the HTML."""

    # Wrap paragraphs at this many columns; 0 leaves lines as they are.
    # URLs are never broken.
    wrap: Annotated[int, msgspec.Meta(ge=0, le=998)] = 78
    # Follow each link with its URL: "Return to your cart (https://...)".
    links: bool = True
    # Show images' alt text, as "[alt]".
    images: bool = False


class TemplateSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The front matter. ``subject`` and ``preheader`` are Liquid, rendered as
    plain text with the same data as the body."""

    id: TemplateId
    subject: str
    preheader: str = ""
    description: str = ""
    # Validated one by one (see _FrontMatter) so that errors name the block.
    blocks: dict[str, BlockSpec] = msgspec.field(default_factory=dict)
    text: TextOptions = msgspec.field(default_factory=TextOptions)
    # Constants for the body, seen as {{ vars.name }}: brand, colours, shop URLs.
    vars: dict[str, Any] = msgspec.field(default_factory=dict)


class SourceParts(msgspec.Struct, frozen=True):
    spec: TemplateSpec
    body: str
    # 1-based line of the file on which the body starts.
    body_line: int
    # 1-based line on which each top-level key of the front matter is set.
    key_lines: dict[str, int]


_TOML_LINE = re.compile(r"\(at line (\d+)(?:, column (\d+))?\)")
_KEY = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")
_TABLE = re.compile(r"^\s*\[\s*([A-Za-z0-9_.\s-]+?)\s*\]")
_BLOCK_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def template_id_for(path: Path) -> str:
    """``templates/abandoned_cart.mjml.liquid`` -> ``abandoned_cart``."""
    return path.name.removesuffix(FILE_SUFFIX)


def split_source(path: Path, source: str) -> SourceParts:
    lines = source.splitlines(keepends=True)
    if not lines or lines[0].strip() != FENCE:
        raise TemplateError(
            path, f"a template starts with a '{FENCE}' line opening its TOML front matter", line=1
        )
    closing = next((i for i in range(1, len(lines)) if lines[i].strip() == FENCE), None)
    if closing is None:
        raise TemplateError(
            path, f"front matter opened on line 1 is never closed by a '{FENCE}' line", line=1
        )
    front = _FrontMatter(path, lines[1:closing], first_line=2)
    spec = front.parse()
    body = "".join(lines[closing + 1 :])
    if not body.strip():
        raise TemplateError(path, "the template has no MJML body after its front matter", line=closing + 2)
    return SourceParts(spec=spec, body=body, body_line=closing + 2, key_lines=front.key_lines)


class _FrontMatter:
    """Parses and validates the front matter, naming the field and its line in
    every error."""

    def __init__(self, path: Path, lines: list[str], *, first_line: int) -> None:
        self.path = path
        self.lines = lines
        self.first_line = first_line
        # Where each dotted key is set: "subject", "blocks.cart", "blocks.cart.fallback".
        self.key_lines: dict[str, int] = {}
        table = ""
        for number, line in enumerate(lines, start=first_line):
            if header := _TABLE.match(line):
                table = ".".join(part.strip() for part in header.group(1).split("."))
                self.key_lines.setdefault(table, number)
            elif key := _KEY.match(line):
                self.key_lines.setdefault(f"{table}.{key.group(1)}" if table else key.group(1), number)

    def error(self, problem: str, field: str = "") -> TemplateError:
        return TemplateError(self.path, problem, field=field, line=self.line_of(field))

    def line_of(self, field: str) -> int | None:
        """The line that sets ``field`` or, failing that, its closest parent."""
        parts = field.split(".")
        for end in range(len(parts), 0, -1):
            line = self.key_lines.get(".".join(parts[:end]))
            if line is not None:
                return line
        return None

    def parse(self) -> TemplateSpec:
        try:
            raw = tomllib.loads("".join(self.lines))
        except tomllib.TOMLDecodeError as err:
            problem, line, column = _toml_position(str(err), self.first_line)
            raise TemplateError(
                self.path, f"front matter is not valid TOML: {problem}", line=line, column=column
            ) from None
        # Blocks are checked one by one so that errors name the block.
        raw_blocks = raw.pop("blocks", {})
        if not isinstance(raw_blocks, dict):
            raise self.error("expected a table of blocks, [blocks.NAME] with a fallback each", "blocks")
        blocks = {name: self._block(name, value) for name, value in raw_blocks.items()}
        spec = self._convert(raw, TemplateSpec, "")
        expected_id = template_id_for(self.path)
        if spec.id != expected_id:
            raise self.error(f"{spec.id!r} does not match the file name (expected {expected_id!r})", "id")
        return msgspec.structs.replace(spec, blocks=blocks, vars=_json_like(spec.vars))

    def _block(self, name: str, value: object) -> BlockSpec:
        field = f"blocks.{name}"
        if not _BLOCK_NAME.match(name):
            raise self.error("a block name is lowercase letters, digits and _, starting with a letter", field)
        if name in RESERVED_NAMES:
            raise self.error(
                f"{name!r} is reserved for what every template sees ({', '.join(sorted(RESERVED_NAMES))})",
                field,
            )
        block = self._convert(value, BlockSpec, field)
        return msgspec.structs.replace(block, fallback=_json_like(block.fallback))

    def _convert(self, value: object, type_: type[_T], field: str) -> _T:
        try:
            return msgspec.convert(value, type=type_, strict=True)
        except msgspec.ValidationError as err:
            problem, _, where = str(err).rpartition(" - at `")
            if not problem:
                problem, where = str(err), "$"
            inner = where.rstrip("`").removeprefix("$").removeprefix(".")
            named = _NAMED_FIELD.search(problem)
            if named:  # an unknown or missing field: name it, so its (or its table's) line is found
                inner = f"{inner}.{named.group(1)}" if inner else named.group(1)
            path = ".".join(part for part in (field, inner) if part)
            raise self.error(problem, path) from None


_T = TypeVar("_T")
_NAMED_FIELD = re.compile(r"(?:missing required|unknown) field `([^`]+)`")


def _json_like(value: dict[str, Any]) -> dict[str, Any]:
    # TOML dates and times become ISO strings: fallbacks are served as block
    # data, which is JSON everywhere else.
    decoded: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(value))
    return decoded


def _toml_position(message: str, first_line: int) -> tuple[str, int | None, int | None]:
    match = _TOML_LINE.search(message)
    if match is None:
        return message, None, None
    line = int(match.group(1)) + first_line - 1
    column = int(match.group(2)) if match.group(2) else None
    return message[: match.start()].rstrip(), line, column
