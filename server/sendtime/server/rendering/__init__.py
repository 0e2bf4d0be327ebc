"""Email templates: Liquid rendered first, then MJML, then a plain-text part.

A template is a file ``<id>.mjml.liquid``: TOML front matter between ``+++``
lines (id, subject, preheader, the blocks it needs with a fallback for each,
text-part options, constants), then an MJML body written in Liquid. See
``templates/`` for real ones.

    store = TemplateStore(Path("templates"))
    email = store.render("abandoned_cart", {"user": {...}, "cart": {...}, "links": {...}})
    email.subject, email.html, email.text, email.version, email.fell_back

RenderPool renders in worker processes, beside the event loop:
``await RenderPool(2).render(store.get("abandoned_cart"), context)``.

Pure: no I/O but reading template files (and RenderPool's pipes to its own
worker processes), no network, no gRPC or HTTP.
"""

from collections.abc import Mapping
from typing import Any

from ._errors import TemplateError
from ._pool import RenderPool
from ._spec import FILE_SUFFIX, BlockSpec, TemplateSpec, TextOptions
from ._store import TemplateStore
from ._template import DEFAULT_LINKS, RenderedEmail, Template, load_template, parse_template
from ._text import html_to_text


def render(template: Template, context: Mapping[str, Any]) -> RenderedEmail:
    """Render ``template`` for one user; see ``Template.render``."""
    return template.render(context)


__all__ = [
    "DEFAULT_LINKS",
    "FILE_SUFFIX",
    "BlockSpec",
    "RenderPool",
    "RenderedEmail",
    "Template",
    "TemplateError",
    "TemplateSpec",
    "TemplateStore",
    "TextOptions",
    "html_to_text",
    "load_template",
    "parse_template",
    "render",
]
