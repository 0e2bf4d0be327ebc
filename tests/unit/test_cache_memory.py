"""MemoryCache: freshness by an injected clock, the byte bound, tags, counters."""

from __future__ import annotations

import math
import threading

import pytest

import sendtime.server.cache as cache_pkg
from sendtime.server.cache import (
    ENTRY_OVERHEAD_BYTES,
    Freshness,
    MemoryCache,
    estimate_size,
)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def charged(key: str, size: int) -> int:
    return size + len(key) + ENTRY_OVERHEAD_BYTES


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cache(clock: FakeClock) -> MemoryCache[object]:
    return MemoryCache(max_bytes=1_000_000, clock=clock)


def test_public_surface_is_pinned() -> None:
    assert sorted(cache_pkg.__all__) == sorted(
        [
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
    )


def test_fresh_then_stale_then_expired(cache: MemoryCache[object], clock: FakeClock) -> None:
    cache.put("k", {"a": 1}, ttl=10, stale_ttl=5)

    fresh = cache.lookup("k")
    assert fresh is not None
    assert fresh.state is Freshness.FRESH
    assert fresh.value == {"a": 1}
    assert fresh.age == 0

    clock.advance(9.9)
    assert (entry := cache.lookup("k")) is not None
    assert entry.state is Freshness.FRESH

    clock.advance(0.1)  # age == ttl: stale
    stale = cache.lookup("k")
    assert stale is not None
    assert stale.state is Freshness.STALE
    assert stale.value == {"a": 1}
    assert stale.age == pytest.approx(10)

    clock.advance(4.9)
    assert (entry := cache.lookup("k")) is not None
    assert entry.state is Freshness.STALE

    clock.advance(0.1)  # age == ttl + stale_ttl: gone
    assert cache.lookup("k") is None
    assert "k" not in cache
    stats = cache.stats()
    assert (stats.hits, stats.stale_hits, stats.misses, stats.expirations) == (2, 2, 1, 1)
    assert stats.entries == 0
    assert stats.size_bytes == 0


def test_a_fresh_hit_returns_the_stored_entry_itself(cache: MemoryCache[object]) -> None:
    cache.put("k", "v", ttl=10)
    assert cache.lookup("k") is cache.lookup("k")


def test_lookup_judges_freshness_at_the_time_given(cache: MemoryCache[object], clock: FakeClock) -> None:
    cache.put("k", "v", ttl=10, stale_ttl=10)
    now = cache.now()
    clock.advance(15)
    assert (entry := cache.lookup("k", now)) is not None
    assert entry.state is Freshness.FRESH
    assert (entry := cache.lookup("k", now + 15)) is not None
    assert entry.state is Freshness.STALE
    assert entry.age_at(now + 15) == 15


def test_infinite_ttl_never_expires(cache: MemoryCache[object], clock: FakeClock) -> None:
    cache.put("k", "v", ttl=math.inf)
    clock.advance(1e9)
    assert (entry := cache.lookup("k")) is not None
    assert entry.state is Freshness.FRESH


def test_zero_ttl_without_stale_window_is_never_served(cache: MemoryCache[object]) -> None:
    assert cache.put("k", "v", ttl=0)
    assert cache.lookup("k") is None


def test_byte_bound_evicts_least_recently_used_and_counts(clock: FakeClock) -> None:
    per_entry = charged("k0", 100)
    cache: MemoryCache[str] = MemoryCache(max_bytes=per_entry * 3, clock=clock)
    for i in range(3):
        cache.put(f"k{i}", "x" * 100, ttl=60)
    assert cache.stats().size_bytes == per_entry * 3
    assert cache.lookup("k0") is not None  # k0 is now the most recently used

    cache.put("k3", "y" * 100, ttl=60)

    assert cache.lookup("k1") is None  # the least recently used went
    assert all(cache.lookup(k) is not None for k in ("k0", "k2", "k3"))
    stats = cache.stats()
    assert stats.evictions == 1
    assert stats.entries == 3
    assert stats.size_bytes == per_entry * 3 <= stats.max_bytes


def test_a_big_value_evicts_as_many_as_it_needs(clock: FakeClock) -> None:
    cache: MemoryCache[str] = MemoryCache(max_bytes=charged("k0", 100) * 4, clock=clock)
    for i in range(4):
        cache.put(f"k{i}", "x" * 100, ttl=60)
    cache.put("big", "z" * 300, ttl=60)  # needs the room of two
    stats = cache.stats()
    assert stats.evictions == 2
    assert stats.entries == 3
    assert stats.size_bytes == charged("k0", 100) * 2 + charged("big", 300) <= stats.max_bytes
    assert cache.lookup("k0") is None
    assert cache.lookup("k1") is None
    assert cache.lookup("k3") is not None


def test_a_value_bigger_than_the_bound_is_rejected_and_drops_the_old_one(clock: FakeClock) -> None:
    cache: MemoryCache[str] = MemoryCache(max_bytes=1000, clock=clock)
    cache.put("k", "small", ttl=60)
    assert not cache.put("k", "x" * 2000, ttl=60)
    assert cache.lookup("k") is None
    assert cache.stats().rejections == 1
    assert cache.stats().size_bytes == 0


def test_size_given_by_the_caller_is_what_is_charged(cache: MemoryCache[object]) -> None:
    cache.put("k", {"whatever": [1, 2, 3]}, ttl=60, size=5000)
    assert cache.stats().size_bytes == charged("k", 5000)
    cache.put("k", "abc", ttl=60)  # replacing recharges
    assert cache.stats().size_bytes == charged("k", 3)


def test_estimate_size() -> None:
    assert estimate_size(b"abcd") == 4
    assert estimate_size("abc") == 3
    assert estimate_size(memoryview(b"12345")) == 5
    assert estimate_size({"a": [1, 2]}) == len(b'{"a":[1,2]}')
    assert estimate_size(object()) > 0


def test_invalid_arguments(cache: MemoryCache[object]) -> None:
    with pytest.raises(ValueError, match="ttl"):
        cache.put("k", "v", ttl=-1)
    with pytest.raises(ValueError, match="ttl"):
        cache.put("k", "v", ttl=math.nan)
    with pytest.raises(ValueError, match="size"):
        cache.put("k", "v", ttl=1, size=-1)
    with pytest.raises(ValueError, match="max_bytes"):
        MemoryCache(max_bytes=0)


def test_invalidate_tag_drops_every_block_of_a_user(cache: MemoryCache[object]) -> None:
    cache.put("cart:u:1", "c1", ttl=60, tags=["u:1"])
    cache.put("recs:u:1", "r1", ttl=60, tags=["u:1", "recs"])
    cache.put("cart:u:2", "c2", ttl=60, tags=["u:2"])
    cache.put("recs:u:2", "r2", ttl=60, tags=["u:2", "recs"])

    assert cache.invalidate_tag("u:1") == 2

    assert cache.lookup("cart:u:1") is None
    assert cache.lookup("recs:u:1") is None
    assert cache.lookup("cart:u:2") is not None
    assert cache.invalidate_tag("u:1") == 0
    assert cache.invalidate_tag("recs") == 1  # only recs:u:2 is left under it
    stats = cache.stats()
    assert stats.invalidations == 3
    assert stats.entries == 1
    assert stats.size_bytes == charged("cart:u:2", 2)


def test_tag_index_forgets_evicted_and_replaced_entries(clock: FakeClock) -> None:
    cache: MemoryCache[str] = MemoryCache(max_bytes=charged("k0", 10) * 2, clock=clock)
    cache.put("k0", "x" * 10, ttl=60, tags=["t"])
    cache.put("k0", "y" * 10, ttl=60, tags=["other"])
    assert cache.invalidate_tag("t") == 0
    cache.put("k1", "x" * 10, ttl=60, tags=["t1"])
    cache.put("k2", "x" * 10, ttl=60, tags=["t2"])  # evicts k0
    assert cache.stats().evictions == 1
    assert cache._tag_index == {"t1": {"k1"}, "t2": {"k2"}}


def test_delete_clear_and_purge(cache: MemoryCache[object], clock: FakeClock) -> None:
    cache.put("a", 1, ttl=10)
    cache.put("b", 2, ttl=100, tags=["t"])
    assert cache.delete("a")
    assert not cache.delete("a")
    cache.put("c", 3, ttl=1)
    clock.advance(5)
    assert cache.purge_expired() == 1
    assert len(cache) == 1
    cache.clear()
    assert len(cache) == 0
    assert cache.stats().size_bytes == 0
    assert cache.invalidate_tag("t") == 0


def test_delete_prefix(cache: MemoryCache[object]) -> None:
    for key in ("ns:a", "ns:b", "other:a"):
        cache.put(key, key, ttl=10)
    assert cache.delete_prefix("ns:") == 2
    assert len(cache) == 1


def test_set_ttl_and_peek(cache: MemoryCache[object], clock: FakeClock) -> None:
    cache.put("k", "v", ttl=10)
    clock.advance(8)
    assert cache.set_ttl("k", 10)
    clock.advance(8)
    assert (entry := cache.peek("k")) is not None
    assert entry.state is Freshness.FRESH
    assert not cache.set_ttl("missing", 10)
    assert cache.stats().hits == 0  # peek does not count


def test_a_fill_is_not_stored_after_its_tag_was_invalidated(cache: MemoryCache[object]) -> None:
    fill = cache.begin_fill("cart:u:1", ["u:1"])
    other = cache.begin_fill("cart:u:2", ["u:2"])
    cache.invalidate_tag("u:1")  # a new event for user 1 arrives while both fetch
    assert cache.fill_invalidated(fill)
    assert not cache.fill_invalidated(other)
    assert not cache.put("cart:u:1", "old", ttl=60, tags=fill.tags, fill=fill)
    assert cache.put("cart:u:2", "ok", ttl=60, tags=other.tags, fill=other)
    cache.end_fill(fill)
    cache.end_fill(other)
    assert cache.lookup("cart:u:1") is None
    assert cache._watchers == {}
    assert cache._invalidated_seq == {}


def test_a_fill_is_not_stored_after_its_key_was_deleted_or_the_cache_cleared(
    cache: MemoryCache[object],
) -> None:
    fill = cache.begin_fill("k")
    cache.delete("k")
    assert not cache.put("k", "old", ttl=60, fill=fill)
    cache.end_fill(fill)

    fill = cache.begin_fill("k")
    cache.clear()
    assert not cache.put("k", "old", ttl=60, fill=fill)
    cache.end_fill(fill)

    fill = cache.begin_fill("k")
    assert cache.put("k", "new", ttl=60, fill=fill)
    cache.end_fill(fill)


def test_writers_from_several_threads_keep_the_accounting_exact() -> None:
    cache: MemoryCache[str] = MemoryCache(max_bytes=charged("t0-000", 50) * 100)

    def write(thread: int) -> None:
        for i in range(2000):
            cache.put(f"t{thread}-{i % 300:03}", "x" * 50, ttl=60, tags=[f"tag{i % 7}"])
            if i % 50 == 0:
                cache.invalidate_tag(f"tag{i % 7}")

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = cache.stats()
    assert stats.size_bytes == stats.entries * charged("t0-000", 50)
    assert stats.size_bytes <= stats.max_bytes
    indexed = set().union(*cache._tag_index.values()) if cache._tag_index else set()
    assert indexed == set(cache.store.keys())


def test_set_ttl_on_a_full_cache_evicts_nothing(clock: FakeClock) -> None:
    cache: MemoryCache[str] = MemoryCache(max_bytes=charged("k0", 10) * 2, clock=clock)
    cache.put("k0", "x" * 10, ttl=5)
    cache.put("k1", "x" * 10, ttl=5)
    assert cache.stats().size_bytes == cache.max_bytes
    assert cache.set_ttl("k0", 100)
    assert cache.stats().evictions == 0
    assert len(cache) == 2
