"""Where a content block's data came from, and why it is not fresh: one
vocabulary for the block cache, the content pipeline, the edges (the API's
BlockSource and FallbackReason), the metrics and the CLI."""

from __future__ import annotations

import enum


class Source(enum.StrEnum):
    FRESH = "fresh"
    """Fetched or computed for this call (or for a concurrent one it joined)."""
    CACHED = "cached"
    """A fresh cache entry."""
    STALE = "stale"
    """A cache entry past its ttl but within its stale window."""
    FALLBACK = "fallback"
    """No data: the caller uses its fallback content."""


class Reason(enum.StrEnum):
    """Why a block is not fresh (stale or a fallback)."""

    TIMEOUT = "timeout"
    """No answer within the caller's time (remembered as a failure when the
    fetch itself timed out: its own timeout, or the cache's max_fetch_s)."""
    UPSTREAM_ERROR = "upstream_error"
    CIRCUIT_OPEN = "circuit_open"
    MISSING_DATA = "missing_data"
    """Nothing to show: no profile, an empty cart, a field the URL needs."""
    DEADLINE_TOO_SHORT = "deadline_too_short"
    OVERLOADED = "overloaded"
    REVALIDATING = "revalidating"
    """Stale served at once while a refresh runs."""
    SHUTDOWN = "shutting_down"
    """The server is closing: the cache's fetcher is closed, or its fetch was cancelled by that."""
