"""Send-time content as plain values: requests built from keyword arguments,
answers read into ``Content`` and ``RenderedEmail``.

A content call's deadline is also the server's time budget for it: every
block is fetched within what is left of it, and a block that misses it comes
back stale or as its fallback, saying so (``source``, ``reason``, ``age``).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import grpc
from google.protobuf.duration_pb2 import Duration

from sendtime.client._errors import SendtimeError
from sendtime.v1 import content_service_pb2


class BlockSource(enum.StrEnum):
    """Where a block's data came from."""

    FRESH = "fresh"
    """Fetched or computed for this request."""
    CACHED = "cached"
    """From the server's cache, within its time to live."""
    STALE = "stale"
    """From cache past its time to live: the fresh value was late or failed (see ``reason``)."""
    FALLBACK = "fallback"
    """No usable data in time: the template's or server's fallback (see ``reason``)."""
    UNKNOWN = "unknown"
    """Unspecified, or a source this client does not know (a newer server)."""


class FallbackReason(enum.StrEnum):
    """Why a block is not fresh."""

    TIMEOUT = "timeout"
    UPSTREAM_ERROR = "upstream_error"
    CIRCUIT_OPEN = "circuit_open"
    MISSING_DATA = "missing_data"
    """Nothing to show: no profile, an empty cart, an unknown block."""
    DEADLINE_TOO_SHORT = "deadline_too_short"
    OVERLOADED = "overloaded"
    REVALIDATING = "revalidating"
    """Stale on purpose: served at once while one refresh runs."""
    SHUTTING_DOWN = "shutting_down"
    UNKNOWN = "unknown"
    """A reason this client does not know (a newer server)."""


_SOURCES: Final[Mapping[int, BlockSource]] = {
    content_service_pb2.BLOCK_SOURCE_FRESH: BlockSource.FRESH,
    content_service_pb2.BLOCK_SOURCE_CACHED: BlockSource.CACHED,
    content_service_pb2.BLOCK_SOURCE_STALE: BlockSource.STALE,
    content_service_pb2.BLOCK_SOURCE_FALLBACK: BlockSource.FALLBACK,
}
_REASONS: Final[Mapping[int, FallbackReason]] = {
    content_service_pb2.FALLBACK_REASON_TIMEOUT: FallbackReason.TIMEOUT,
    content_service_pb2.FALLBACK_REASON_UPSTREAM_ERROR: FallbackReason.UPSTREAM_ERROR,
    content_service_pb2.FALLBACK_REASON_CIRCUIT_OPEN: FallbackReason.CIRCUIT_OPEN,
    content_service_pb2.FALLBACK_REASON_MISSING_DATA: FallbackReason.MISSING_DATA,
    content_service_pb2.FALLBACK_REASON_DEADLINE_TOO_SHORT: FallbackReason.DEADLINE_TOO_SHORT,
    content_service_pb2.FALLBACK_REASON_OVERLOADED: FallbackReason.OVERLOADED,
    content_service_pb2.FALLBACK_REASON_REVALIDATING: FallbackReason.REVALIDATING,
    content_service_pb2.FALLBACK_REASON_SHUTTING_DOWN: FallbackReason.SHUTTING_DOWN,
}


@dataclass(frozen=True, slots=True)
class ContentBlock:
    """One named block: its data (decoded JSON; None for a fallback without
    data), where it came from, why it is not fresh, and how old it is."""

    name: str
    data: Any
    source: BlockSource
    reason: FallbackReason | None = None
    #: Seconds; zero when fresh.
    age: float = 0.0
    #: For people: e.g. the upstream's error.
    detail: str = ""

    @property
    def fell_back(self) -> bool:
        """True when the block holds no usable data of its own."""
        return self.source is BlockSource.FALLBACK


@dataclass(frozen=True, slots=True)
class Content:
    """The answer to ``get_content``: the blocks in the order asked for."""

    blocks: tuple[ContentBlock, ...]
    #: Seconds the server spent.
    server_time: float
    #: Seconds the server had for the blocks: the call's deadline, or the server's default.
    budget: float

    def __getitem__(self, name: str) -> ContentBlock:
        found = self.get(name)
        if found is None:
            raise KeyError(name)
        return found

    def get(self, name: str) -> ContentBlock | None:
        return next((block for block in self.blocks if block.name == name), None)


@dataclass(frozen=True, slots=True)
class RenderedEmail:
    """The answer to ``render_email``: a whole email and the blocks it used."""

    subject: str
    preheader: str
    html: str
    text: str
    template_id: str
    #: The template's content hash: which exact template produced this email.
    template_version: str
    blocks: tuple[ContentBlock, ...]
    server_time: float
    budget: float

    @property
    def fell_back(self) -> tuple[ContentBlock, ...]:
        """The blocks rendered with the template's fallback instead of data."""
        return tuple(block for block in self.blocks if block.fell_back)


def _context(
    campaign: str | None, locale: str | None, cart_id: str | None
) -> content_service_pb2.ContentContext:
    return content_service_pb2.ContentContext(
        campaign=campaign or "", locale=locale or "", cart_id=cart_id or ""
    )


def content_request(
    user_id: str | None,
    anonymous_id: str | None,
    blocks: Iterable[str],
    campaign: str | None,
    locale: str | None,
    cart_id: str | None,
) -> content_service_pb2.GetContentRequest:
    if isinstance(blocks, str):  # "cart" would otherwise ask for blocks "c", "a", "r", "t"
        raise TypeError("blocks must be a collection of block names, not one string")
    return content_service_pb2.GetContentRequest(
        user_id=user_id or "",
        anonymous_id=anonymous_id or "",
        blocks=blocks,
        context=_context(campaign, locale, cart_id),
    )


def render_request(
    template_id: str,
    user_id: str | None,
    anonymous_id: str | None,
    campaign: str | None,
    locale: str | None,
    cart_id: str | None,
) -> content_service_pb2.RenderEmailRequest:
    return content_service_pb2.RenderEmailRequest(
        template_id=template_id,
        user_id=user_id or "",
        anonymous_id=anonymous_id or "",
        context=_context(campaign, locale, cart_id),
    )


def _seconds(duration: Duration) -> float:
    return duration.seconds + duration.nanos / 1e9


def block_from_proto(block: content_service_pb2.ContentBlock) -> ContentBlock:
    try:
        data = json.loads(block.data_json) if block.data_json else None
    except ValueError:
        raise SendtimeError(
            f"the server sent block {block.name!r} with data that is not JSON",
            code=grpc.StatusCode.INTERNAL,
            reason="INVALID_RESPONSE",
        ) from None
    reason = None
    if block.reason != content_service_pb2.FALLBACK_REASON_UNSPECIFIED:
        reason = _REASONS.get(block.reason, FallbackReason.UNKNOWN)
    return ContentBlock(
        name=block.name,
        data=data,
        source=_SOURCES.get(block.source, BlockSource.UNKNOWN),
        reason=reason,
        age=_seconds(block.age),
        detail=block.detail,
    )


def content_from_proto(response: content_service_pb2.GetContentResponse) -> Content:
    return Content(
        blocks=tuple(block_from_proto(b) for b in response.blocks),
        server_time=_seconds(response.server_time),
        budget=_seconds(response.budget),
    )


def email_from_proto(response: content_service_pb2.RenderEmailResponse) -> RenderedEmail:
    return RenderedEmail(
        subject=response.subject,
        preheader=response.preheader,
        html=response.html,
        text=response.text,
        template_id=response.template_id,
        template_version=response.template_version,
        blocks=tuple(block_from_proto(b) for b in response.blocks),
        server_time=_seconds(response.server_time),
        budget=_seconds(response.budget),
    )
