"""The plain-text part, made from the final HTML.

Email HTML is layout tables nested in divs; a general converter lays those out
as text tables, or spends milliseconds deciding not to (inscriptis takes about
ten times as long as this on a cart email). This reads the document the way a
person reads the email: each block its own paragraph, ``<br>`` a line break,
headings underlined, links as ``text (url)``, struck prices as ``(was €24.00)``,
hidden elements (the preheader, Outlook-only parts) left out, images too unless
asked for.

The reading is an XSLT stylesheet, so that the walk over a few hundred layout
elements runs in libxslt rather than in Python: it emits text with two marker
characters for line and paragraph breaks, and one pass of string operations
collapses whitespace and lays the paragraphs out.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from typing import Final, cast

from lxml import etree

from ._liquid import Marked
from ._spec import TextOptions

_LINE: Final = "\ue000"  # private-use code points: cannot come from the HTML's text
_PARA: Final = "\ue001"  # (any that do are dropped first)
_RULE: Final = "=" * 78
_DASHES: Final = "-" * 78

_STYLESHEET: Final = f"""\
<xsl:stylesheet version="1.0" xmlns:xsl="http://www.w3.org/1999/XSL/Transform">
  <xsl:output method="text" encoding="utf-8"/>
  <!-- Indentation between layout rows is not text (text inside cells is kept). -->
  <xsl:strip-space elements="html body table thead tbody tfoot tr"/>
  <xsl:param name="links" select="1"/>
  <xsl:param name="images" select="0"/>

  <!-- Never read: the head, scripts, and whatever is hidden from view. -->
  <xsl:template match="head|style|script|title|noscript|template|svg"/>
  <xsl:template match="div[contains(@style, 'display:none')] | span[contains(@style, 'display:none')]
                       | p[contains(@style, 'display:none')] | table[contains(@style, 'display:none')]"
                priority="10"/>

  <xsl:template match="div|p|table|ul|ol|dl|dt|dd|section|article|header|footer|main|nav|aside
                       |center|blockquote|address|figure|pre|form|h3|h4|h5|h6"
    >{_PARA}<xsl:apply-templates/>{_PARA}</xsl:template>
  <xsl:template match="h1|h2">
    <xsl:variable name="heading" select="normalize-space(.)"/>
    <xsl:variable name="rule" select="substring(('{_RULE}'), 1, string-length($heading))"/>
    <xsl:text>{_PARA}</xsl:text><xsl:apply-templates/>
    <xsl:if test="$heading != ''">
      <xsl:text>{_LINE}</xsl:text>
      <xsl:choose>
        <xsl:when test="self::h1"><xsl:value-of select="$rule"/></xsl:when>
        <xsl:otherwise><xsl:value-of select="translate($rule, '=', '-')"/></xsl:otherwise>
      </xsl:choose>
    </xsl:if>
    <xsl:text>{_PARA}</xsl:text>
  </xsl:template>
  <xsl:template match="br">{_LINE}</xsl:template>
  <xsl:template match="tr">{_LINE}<xsl:apply-templates/></xsl:template>
  <xsl:template match="td|th"><xsl:text> </xsl:text><xsl:apply-templates/></xsl:template>
  <xsl:template match="li">{_LINE}- <xsl:apply-templates/>{_LINE}</xsl:template>
  <xsl:template match="hr">{_PARA}{_DASHES[:20]}{_PARA}</xsl:template>
  <xsl:template match="s|del|strike">(was <xsl:apply-templates/>)</xsl:template>
  <xsl:template match="img">
    <xsl:if test="$images = 1 and normalize-space(@alt) != ''"> [<xsl:value-of select="normalize-space(@alt)"/>] </xsl:if>
  </xsl:template>

  <!-- A link reads "label (url)"; an image-only link (the product name next to
       it carries the URL) and "#" or merge-tag targets add nothing. -->
  <xsl:template match="a">
    <xsl:variable name="href" select="normalize-space(@href)"/>
    <xsl:variable name="label" select="normalize-space(.)"/>
    <xsl:variable name="shown">
      <xsl:choose>
        <xsl:when test="starts-with($href, 'mailto:')"><xsl:value-of select="substring-after($href, 'mailto:')"/></xsl:when>
        <xsl:otherwise><xsl:value-of select="$href"/></xsl:otherwise>
      </xsl:choose>
    </xsl:variable>
    <xsl:apply-templates/>
    <xsl:if test="$links = 1 and $label != '' and $label != $shown
                  and (starts-with($href, 'http://') or starts-with($href, 'https://')
                       or starts-with($href, 'mailto:'))"> (<xsl:value-of select="$shown"/>)</xsl:if>
  </xsl:template>
</xsl:stylesheet>
"""

_PRIVATE_MARKERS: Final = re.compile(f"[{_LINE}{_PARA}]")

# -- text by shape --------------------------------------------------------------
#
# An email's HTML differs from user to user only in its data values when it is
# made by shape (see _template): the reading above can then run once per shape,
# over the shape's HTML with a mark in place of each value, and per user only
# the values go in and the paragraphs are laid out. The few decisions the
# reading takes from values (a link's URL shown or not, a heading's underline
# length, an image's alt text) are left in the flow as directives, taken per user.

_DIRECTIVE: Final = "\ue002"  # private use, as the markers: never in a value
_ARGUMENT: Final = "\ue003"
_END: Final = "\ue004"
_DIRECTIVES: Final = re.compile(f"{_DIRECTIVE}(h1|h2|img|a){_ARGUMENT}([^{_END}]*){_END}")
_XML_SPACE: Final = re.compile("[ \t\r\n]+")
_SHAPE_STYLESHEET: Final = _STYLESHEET.replace(
    "</xsl:stylesheet>",
    f"""
  <xsl:template match="h1|h2" priority="5">
    <xsl:text>{_PARA}</xsl:text><xsl:apply-templates/>
    <xsl:text>{_DIRECTIVE}</xsl:text><xsl:value-of select="local-name()"/><xsl:text>{_ARGUMENT}</xsl:text>
    <xsl:value-of select="."/><xsl:text>{_END}{_PARA}</xsl:text>
  </xsl:template>
  <xsl:template match="img" priority="5">
    <xsl:if test="$images = 1">{_DIRECTIVE}img{_ARGUMENT}<xsl:value-of select="@alt"/>{_END}</xsl:if>
  </xsl:template>
  <xsl:template match="a" priority="5">
    <xsl:apply-templates/>
    <xsl:if test="$links = 1"><xsl:text>{_DIRECTIVE}a{_ARGUMENT}</xsl:text><xsl:value-of select="@href"/>
      <xsl:text>{_ARGUMENT}</xsl:text><xsl:value-of select="."/><xsl:text>{_END}</xsl:text></xsl:if>
  </xsl:template>
</xsl:stylesheet>
""",
)


class _Machinery(threading.local):
    """A parser and a compiled stylesheet per thread (lxml shares neither across
    threads), made on first use. The stylesheet may read nothing."""

    parser: etree.HTMLParser | None = None
    transform: etree.XSLT | None = None
    shape_transform: etree.XSLT | None = None

    def get(self) -> tuple[etree.HTMLParser, etree.XSLT]:
        if self.parser is None or self.transform is None:
            # lxml.html's parser looks up a Python class for every element; the
            # plain etree one does not, and is about twice as fast.
            self.parser = etree.HTMLParser(remove_comments=True, remove_pis=True, no_network=True)
            self.transform = etree.XSLT(
                etree.XML(_STYLESHEET.encode()), access_control=etree.XSLTAccessControl.DENY_ALL
            )
        return self.parser, self.transform

    def shape(self) -> tuple[etree.HTMLParser, etree.XSLT]:
        parser, _ = self.get()
        if self.shape_transform is None:
            self.shape_transform = etree.XSLT(
                etree.XML(_SHAPE_STYLESHEET.encode()), access_control=etree.XSLTAccessControl.DENY_ALL
            )
        return parser, self.shape_transform


_machinery = _Machinery()


def html_to_text(html: str, options: TextOptions) -> str:
    parser, transform = _machinery.get()
    if _LINE in html or _PARA in html:
        html = _PRIVATE_MARKERS.sub("", html)
    try:
        # lxml answers None for a document with no elements (its stubs say otherwise)
        document = cast("etree._Element | None", etree.fromstring(html, parser))
    except etree.XMLSyntaxError:
        return ""
    if document is None:
        return ""
    flow = str(
        transform(document, links="1" if options.links else "0", images="1" if options.images else "0")
    )
    return _layout(flow, options.wrap)


def shape_flow(html: str, options: TextOptions) -> str | None:
    """The reading of a shape's HTML (marks for its values), with directives
    where values decide; None if there is nothing to read by shape (the
    whole-HTML reading then applies)."""
    if _LINE in html or _PARA in html or _DIRECTIVE in html or _ARGUMENT in html or _END in html:
        return None
    parser, transform = _machinery.shape()
    try:
        document = cast("etree._Element | None", etree.fromstring(html, parser))
    except etree.XMLSyntaxError:
        return None
    if document is None:
        return None
    return str(
        transform(document, links="1" if options.links else "0", images="1" if options.images else "0")
    )


class FlowShape:
    """A shape's flow ready for its users: every paragraph without a value laid
    out once, the others cut at their marks. Per user only the paragraphs that
    hold values are filled in and laid out: the same text as the directives
    and the layout over the whole filled flow, since the layout takes each
    paragraph on its own and no directive spans two (``of`` checks)."""

    __slots__ = ("_paragraphs", "_width")

    def __init__(self, paragraphs: list[str | Marked], width: int) -> None:
        self._paragraphs = paragraphs
        self._width = width

    @classmethod
    def of(cls, flow: str, options: TextOptions) -> FlowShape | None:
        """None when a directive spans paragraphs (the whole HTML is read then)."""
        if any(_PARA in found.group(0) for found in _DIRECTIVES.finditer(flow)):
            return None
        paragraphs: list[str | Marked] = []
        for paragraph in flow.split(_PARA):
            marked = Marked(paragraph)
            if marked.has_marks:
                paragraphs.append(marked)
            else:
                laid_out = _paragraph(_DIRECTIVES.sub(_directive, paragraph), options.wrap)
                if laid_out:
                    paragraphs.append(laid_out)
        return cls(paragraphs, options.wrap)

    def text(self, values: Sequence[str]) -> str:
        """The text part with ``values`` (decoded as an HTML parser reads them) in."""
        laid_out = []
        for paragraph in self._paragraphs:
            if type(paragraph) is str:
                laid_out.append(paragraph)
                continue
            filled = _paragraph(
                _DIRECTIVES.sub(_directive, cast("Marked", paragraph).fill(values)), self._width
            )
            if filled:
                laid_out.append(filled)
        return "\n\n".join(laid_out) + "\n" if laid_out else ""


def _normalize_space(value: str) -> str:
    """XPath's normalize-space: only XML's four whitespace characters count."""
    return _XML_SPACE.sub(" ", value).strip(" \t\r\n")


def _directive(match: re.Match[str]) -> str:
    kind, argument = match.group(1), match.group(2)
    if kind == "a":
        href, _, label = argument.partition(_ARGUMENT)
        href, label = _normalize_space(href), _normalize_space(label)
        shown = href.removeprefix("mailto:") if href.startswith("mailto:") else href
        if label and label != shown and href.startswith(("http://", "https://", "mailto:")):
            return f" ({shown})"
        return ""
    if kind == "img":
        alt = _normalize_space(argument)
        return f" [{alt}] " if alt else ""
    heading = _normalize_space(argument)  # h1 or h2: underlined as long as the heading
    if not heading:
        return ""
    return _LINE + ("=" if kind == "h1" else "-") * min(len(heading), len(_RULE))


def _layout(flow: str, width: int) -> str:
    paragraphs = [laid_out for block in flow.split(_PARA) if (laid_out := _paragraph(block, width))]
    return "\n\n".join(paragraphs) + "\n" if paragraphs else ""


def _paragraph(block: str, width: int) -> str:
    """One paragraph of the flow laid out: "" when it shows nothing."""
    if not block or block.isspace():
        return ""
    lines = []
    for raw in block.split(_LINE):
        line = " ".join(raw.split())
        if line:
            lines.append(_wrap(line, width))
    return "\n".join(lines)


def _wrap(line: str, width: int) -> str:
    """Greedy wrap at spaces; a word longer than the width (a URL) stays whole."""
    if not width or len(line) <= width:
        return line
    wrapped: list[str] = []
    current = ""
    for word in line.split(" "):
        if current and len(current) + 1 + len(word) > width:
            wrapped.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    wrapped.append(current)
    return "\n".join(wrapped)
