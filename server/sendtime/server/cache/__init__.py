"""sendtime's in-process cache: a Rust store (cachebox) behind a sync hot path
and an async get-or-fetch.

- MemoryCache: byte-bounded LRU with per-entry ttl and stale window, tags and
  counters; ``lookup`` is the synchronous hit path used on the event loop.
- CacheFetcher: single-flight, stale-while-revalidate get-or-fetch with
  per-call timeouts, negative caching and circuit breakers; Result says where
  a value came from and why.
- CircuitBreaker / CircuitBreakers: per-host breakers.
- RustCacheBackend: the same store as an aiocache backend.
"""

from sendtime.server.cache._aiocache import RustCacheBackend
from sendtime.server.cache._breaker import BreakerState, BreakerStats, CircuitBreaker, CircuitBreakers
from sendtime.server.cache._fetch import CacheFetcher, FetcherStats, Result
from sendtime.server.cache._memory import (
    ENTRY_OVERHEAD_BYTES,
    CacheStats,
    Clock,
    Entry,
    Fill,
    Freshness,
    MemoryCache,
    estimate_size,
)
from sendtime.server.domain.provenance import Reason, Source

__all__ = [
    "ENTRY_OVERHEAD_BYTES",
    "BreakerState",
    "BreakerStats",
    "CacheFetcher",
    "CacheStats",
    "CircuitBreaker",
    "CircuitBreakers",
    "Clock",
    "Entry",
    "FetcherStats",
    "Fill",
    "Freshness",
    "MemoryCache",
    "Reason",
    "Result",
    "RustCacheBackend",
    "Source",
    "estimate_size",
]
