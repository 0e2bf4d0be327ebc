"""sendtime.example.toml, written from the settings types themselves.

Every field of ``Settings`` appears, with its default (or, for a table that is
off by default and for a required field, a commented example) and the ``#:``
doc comment written above it in the source, so the example cannot fall behind
the code. ``tools/gen_example_config.py`` writes the file; ``make lint`` checks
it is current, and a test checks that it lists every field and loads back as
the defaults.
"""

from __future__ import annotations

import ast
import enum
import inspect
import json
import textwrap
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any, Final

import msgspec
import msgspec.inspect as mi

from sendtime.server.settings import Settings

HEADER: Final = """\
# sendtime settings, every one of them: this file is generated from the settings
# types (python tools/gen_example_config.py); edit their doc comments, not it.
# Every key is optional; the values shown are the defaults, and commented-out
# tables are examples of what is off or empty by default.
# Start with:  sendtime serve --config sendtime.toml   (or SENDTIME_CONFIG=...);
# the client commands (sendtime profile, ...) read the same file to find the server.
# Any key can be overridden from the environment: SENDTIME_<SECTION>__<KEY>,
# e.g. SENDTIME_GRPC__PORT=6000 or SENDTIME_STORAGE__DATA_DIR=/var/lib/sendtime.
# A relative path here is relative to this file's folder.
"""

#: Values shown for fields that have no default, or whose default is empty,
#: in the commented-out examples (keyed by dotted name, list items without index).
EXAMPLES: Final[Mapping[str, Any]] = {
    "grpc.tls.cert_file": "/etc/sendtime/server.pem",
    "grpc.tls.key_file": "/etc/sendtime/server.key",
    "http.tls.cert_file": "/etc/sendtime/server.pem",
    "http.tls.key_file": "/etc/sendtime/server.key",
    "auth.keys.name": "shop",
    "auth.keys.hash": "sha256:...",
    "auth.keys.scopes": ["ingest"],
    "content.catalog_file": "catalog.json",
    "content.templates_dir": "templates",
    "content.links": {"view_in_browser_url": "https://example.com/view"},
    "content.upstreams.name": "loyalty",
    "content.upstreams.url": "https://api.example.com/loyalty/{user.id}?email={user.email}",
    "content.upstreams.headers": {"Authorization": "Bearer ..."},
    "content.offers.id": "cart50",
    "content.offers.code": "SAVE10",
    "content.offers.text": "10% off orders over EUR 50",
    "content.offers.campaigns": ["spring"],
    "content.allowed_upstream_hosts": ["api.example.com"],
    "delivery.relay.host": "smtp.example.com",
    "delivery.relay.port": 587,
    "delivery.relay.api_key": "...",
    "delivery.relay.server_token": "...",
    "delivery.relay.domain": "mg.example.com",
    "delivery.relay.region": "eu-west-1",
    "delivery.relay.access_key_id": "...",
    "delivery.relay.secret_access_key": "...",
    "delivery.relay.rate_per_s": 10.0,
    "webhooks.name": "shop",
    "webhooks.secret": "a long random shared secret",
    "flows.entry_filter": {"currency": "EUR"},
    "tracing.otlp_headers": {"x-api-key": "..."},
}


def render() -> str:
    """The whole example file."""
    lines = [*HEADER.splitlines(), ""]
    info = mi.type_info(Settings)
    assert isinstance(info, mi.StructType)
    lines += _table(Settings(), info, Settings, [], commented=False)
    return "\n".join(lines).rstrip("\n") + "\n"


def field_names(info: mi.Type | None = None, prefix: str = "") -> Iterator[str]:
    """Every setting's dotted name (list items without an index), relay kinds included."""
    info = mi.type_info(Settings) if info is None else info
    for struct in _structs(info):
        for field in struct.fields:
            name = f"{prefix}{field.encode_name}"
            yield name
            yield from field_names(_item(field.type), f"{name}.")


def _structs(info: mi.Type) -> list[mi.StructType]:
    if isinstance(info, mi.StructType):
        return [info]
    if isinstance(info, mi.UnionType):
        return [t for t in info.types if isinstance(t, mi.StructType)]
    return []


def _item(info: mi.Type) -> mi.Type:
    """The struct a field holds, for a list of structs or an optional one."""
    if isinstance(info, mi.ListType):
        return info.item_type
    return info


def _table(value: Any, info: mi.StructType, cls: type, path: list[str], *, commented: bool) -> list[str]:
    """The scalar keys of one table, then its subtables and arrays of tables."""
    docs = _docs(cls)
    later: list[list[str]] = []
    lines: list[str] = []
    for field in info.fields:
        name = field.encode_name
        here = [*path, name]
        current = getattr(value, field.name) if value is not None else _default(field)
        kind = _kind(field.type)
        comment = docs.get(field.name, "")
        if not comment and kind in ("struct", "tables") and len(_structs(_item(field.type))) == 1:
            # a table's own description: its class docstring's first paragraph
            doc = _structs(_item(field.type))[0].cls.__doc__ or ""
            comment = " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())
        if kind == "scalar":
            lines += _comment(comment)
            lines += _key(name, here, current, commented=commented or current is None)
        elif kind == "dict":
            block = [*_comment(comment), _header(here, commented=commented)]
            entries = current or EXAMPLES.get(".".join(here), {})
            block += [
                _prefix(commented or not current) + f"{_bare(k)} = {_toml(v)}" for k, v in entries.items()
            ]
            later.append(block)
        elif kind == "struct":
            struct = _structs(field.type)
            if len(struct) > 1:  # the relay: the chosen kind, then every other as an example
                later += _union_tables(current, struct, here, comment, commented=commented)
                continue
            off = commented or current is None
            block = [*_comment(comment), _header(here, commented=off)]
            block += _table(current, struct[0], struct[0].cls, here, commented=off)
            later.append(block)
        else:  # an array of tables
            (element,) = _structs(_item(field.type))
            items = current or [None]
            for index, item in enumerate(items):
                block = _comment(comment) if index == 0 else []
                off = commented or item is None
                block.append(_header(here, commented=off, array=True))
                block += _table(item, element, element.cls, here, commented=off)
                later.append(block)
    for block in later:
        lines += ["", *block]
    return lines


def _union_tables(
    current: Any, structs: list[mi.StructType], here: list[str], comment: str, *, commented: bool
) -> list[list[str]]:
    blocks = []
    chosen = next(s for s in structs if isinstance(current, s.cls))
    for struct in sorted(structs, key=lambda s: s is not chosen):
        off = commented or struct is not chosen
        value = current if struct is chosen else None
        block = _comment(comment) if struct is chosen else []
        block.append(_header(here, commented=off))
        block.append(_prefix(off) + f"kind = {_toml(struct.tag)}")
        block += _table(value, struct, struct.cls, here, commented=off)
        blocks.append(block)
    return blocks


def _kind(info: mi.Type) -> str:
    if isinstance(info, mi.ListType) and isinstance(info.item_type, mi.StructType):
        return "tables"
    if isinstance(info, mi.DictType):
        return "dict"
    if _structs(info):
        return "struct"
    return "scalar"


def _default(field: mi.Field) -> Any:
    if field.default is not msgspec.NODEFAULT:
        return field.default
    if field.default_factory is not msgspec.NODEFAULT:
        return field.default_factory()
    return None  # required: an example stands in


def _key(name: str, here: list[str], value: Any, *, commented: bool) -> list[str]:
    shown = value
    example = EXAMPLES.get(".".join(here))
    if example is not None and (value is None or (commented and not value)):
        shown = example
    if shown is None:
        return [f"# {_bare(name)} = (not set)"]
    return [_prefix(commented) + f"{_bare(name)} = {_toml(shown)}"]


def _header(here: list[str], *, commented: bool, array: bool = False) -> str:
    name = ".".join(_bare(part) for part in here)
    return _prefix(commented) + (f"[[{name}]]" if array else f"[{name}]")


def _prefix(commented: bool) -> str:
    return "# " if commented else ""


def _comment(text: str) -> list[str]:
    return [f"# {line}".rstrip() for line in textwrap.wrap(text, 86)] if text else []


def _bare(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return _toml(value.value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_bare(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML for {value!r}")


@cache
def _docs(cls: type) -> dict[str, str]:
    """The ``#:`` comments above each field, in ``cls`` and the classes it extends."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass.__module__.startswith("msgspec") or klass is object:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        lines = source.splitlines()
        (node,) = ast.parse(source).body
        assert isinstance(node, ast.ClassDef)
        for statement in node.body:
            if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                above = []
                at = statement.lineno - 2
                while at >= 0 and lines[at].strip().startswith("#:"):
                    above.append(lines[at].strip()[2:].strip())
                    at -= 1
                if above:
                    docs[statement.target.id] = " ".join(reversed(above))
        if klass.__doc__ and klass is cls:
            docs.setdefault("", inspect.cleandoc(klass.__doc__))
    return docs
