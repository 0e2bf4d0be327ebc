"""CacheFetcher: single flight, stale-while-revalidate, timeouts that leave the
fetch filling the cache, errors, negative caching, breakers and shutdown.

Entry ages and ttls follow a fake clock; timeouts are real (short) waits on the
running loop."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import pytest

from sendtime.server.cache import (
    BreakerState,
    CacheFetcher,
    CircuitBreaker,
    CircuitBreakers,
    MemoryCache,
    Reason,
    Result,
    Source,
)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Upstream:
    """A fetch function that counts calls and can be held, failed or slowed."""

    def __init__(self, value: Any = "v1") -> None:
        self.value = value
        self.calls = 0
        self.error: Exception | None = None
        self.release = asyncio.Event()
        self.release.set()

    def hold(self) -> None:
        self.release.clear()

    async def __call__(self) -> Any:
        self.calls += 1
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return self.value


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Everything that reaches the loop's exception handler, e.g. 'Task
    exception was never retrieved'; the test fails if anything did."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield errors
    gc.collect()
    await asyncio.sleep(0)
    loop.set_exception_handler(None)
    assert errors == []


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def fetcher(clock: FakeClock, loop_errors: list[dict[str, Any]]) -> AsyncIterator[CacheFetcher]:
    fetcher = CacheFetcher(MemoryCache(max_bytes=1_000_000, clock=clock))
    yield fetcher
    await fetcher.aclose()
    assert fetcher.stats().in_flight == 0


async def settle(fetcher: CacheFetcher) -> None:
    """Let background fetches finish."""
    for _ in range(1000):
        if fetcher.stats().in_flight == 0:
            return
        await asyncio.sleep(0.001)
    raise AssertionError("background fetch did not finish")


def shape(result: Result[Any]) -> tuple[Any, Source, Reason | None, float]:
    return result.value, result.source, result.reason, result.age


def get(
    fetcher: CacheFetcher, fetch: Callable[[], Awaitable[Any]], key: str = "k", **kwargs: Any
) -> Coroutine[Any, Any, Result[Any]]:
    options: dict[str, Any] = {"ttl": 10.0, "stale_ttl": 60.0, "timeout": 1.0, "negative_ttl": 5.0}
    options.update(kwargs)
    return fetcher.get_or_fetch(key, fetch, **options)


async def test_miss_fetches_then_hits(fetcher: CacheFetcher, clock: FakeClock) -> None:
    upstream = Upstream({"items": [1]})
    first = await get(fetcher, upstream)
    assert shape(first) == ({"items": [1]}, Source.FRESH, None, 0.0)
    clock.advance(3)
    second = await get(fetcher, upstream)
    assert shape(second) == ({"items": [1]}, Source.CACHED, None, 3.0)
    assert upstream.calls == 1


async def test_hundred_concurrent_misses_make_one_fetch(fetcher: CacheFetcher) -> None:
    upstream = Upstream("block")
    upstream.hold()
    callers = [asyncio.create_task(get(fetcher, upstream)) for _ in range(100)]
    await asyncio.sleep(0.01)
    assert upstream.calls == 1
    upstream.release.set()
    results = await asyncio.gather(*callers)
    assert upstream.calls == 1
    assert {(r.value, r.source, r.reason) for r in results} == {("block", Source.FRESH, None)}
    stats = fetcher.stats()
    assert (stats.fetches, stats.coalesced) == (1, 99)


async def test_stale_is_served_at_once_while_one_refresh_runs(
    fetcher: CacheFetcher, clock: FakeClock
) -> None:
    await get(fetcher, Upstream("old"))
    clock.advance(11)  # past ttl 10, inside the 60 s stale window
    upstream = Upstream("new")
    upstream.hold()

    results = [await get(fetcher, upstream) for _ in range(5)]

    assert {(r.value, r.source, r.reason) for r in results} == {("old", Source.STALE, Reason.REVALIDATING)}
    assert results[0].age == 11
    assert fetcher.stats().fetches == 2  # the first fill and one refresh
    await asyncio.sleep(0.01)
    assert upstream.calls == 1
    upstream.release.set()
    await settle(fetcher)
    assert shape(await get(fetcher, upstream)) == ("new", Source.CACHED, None, 0.0)
    assert upstream.calls == 1


async def test_timeout_without_stale_falls_back_and_the_fetch_still_fills_the_cache(
    fetcher: CacheFetcher,
) -> None:
    upstream = Upstream("late")
    upstream.hold()
    loop = asyncio.get_running_loop()
    started = loop.time()

    result = await get(fetcher, upstream, timeout=0.05)

    assert loop.time() - started < 0.5
    assert shape(result) == (None, Source.FALLBACK, Reason.TIMEOUT, 0.0)
    assert result.needs_fallback
    upstream.release.set()
    await settle(fetcher)
    assert (await get(fetcher, upstream)).source is Source.CACHED
    assert upstream.calls == 1
    assert fetcher.stats().timeouts == 1


async def test_timeout_serves_stale_when_not_revalidating_in_background(
    fetcher: CacheFetcher, clock: FakeClock
) -> None:
    await get(fetcher, Upstream("old"))
    clock.advance(20)
    upstream = Upstream("new")
    upstream.hold()
    loop = asyncio.get_running_loop()
    started = loop.time()

    result = await get(fetcher, upstream, timeout=0.05, stale_while_revalidate=False)

    assert loop.time() - started < 0.5
    assert shape(result) == ("old", Source.STALE, Reason.TIMEOUT, 20.0)
    upstream.release.set()
    await settle(fetcher)
    assert (await get(fetcher, upstream)).value == "new"


async def test_waiting_for_a_refresh_returns_it_when_in_time(fetcher: CacheFetcher, clock: FakeClock) -> None:
    await get(fetcher, Upstream("old"))
    clock.advance(20)
    result = await get(fetcher, Upstream("new"), stale_while_revalidate=False)
    assert shape(result) == ("new", Source.FRESH, None, 0.0)


async def test_zero_timeout_answers_at_once_and_starts_the_fetch(fetcher: CacheFetcher) -> None:
    upstream = Upstream("v")
    result = await get(fetcher, upstream, timeout=0)
    assert result.reason is Reason.TIMEOUT
    await settle(fetcher)
    assert (await get(fetcher, upstream, timeout=0)).source is Source.CACHED


async def test_error_without_stale_falls_back(fetcher: CacheFetcher) -> None:
    upstream = Upstream()
    upstream.error = ConnectionError("refused")
    result = await get(fetcher, upstream)
    assert shape(result) == (None, Source.FALLBACK, Reason.UPSTREAM_ERROR, 0.0)
    assert fetcher.stats().fetch_failures == 1


async def test_error_serves_stale(fetcher: CacheFetcher, clock: FakeClock) -> None:
    await get(fetcher, Upstream("old"))
    clock.advance(30)
    upstream = Upstream()
    upstream.error = RuntimeError("500")
    result = await get(fetcher, upstream, stale_while_revalidate=False)
    assert shape(result) == ("old", Source.STALE, Reason.UPSTREAM_ERROR, 30.0)


async def test_a_failed_refresh_leaves_the_stale_value_and_is_remembered(
    fetcher: CacheFetcher, clock: FakeClock
) -> None:
    await get(fetcher, Upstream("old"))
    clock.advance(30)
    upstream = Upstream()
    upstream.error = RuntimeError("500")
    assert (await get(fetcher, upstream)).reason is Reason.REVALIDATING
    await settle(fetcher)
    result = await get(fetcher, upstream)
    assert shape(result) == ("old", Source.STALE, Reason.UPSTREAM_ERROR, 30.0)
    assert upstream.calls == 1


async def test_failures_are_cached_for_negative_ttl(fetcher: CacheFetcher, clock: FakeClock) -> None:
    upstream = Upstream("v")
    upstream.error = TimeoutError()
    assert (await get(fetcher, upstream, negative_ttl=5)).reason is Reason.TIMEOUT
    upstream.error = None
    loop = asyncio.get_running_loop()
    upstream.hold()  # a refetch would block: the answer must come without one
    started = loop.time()
    for _ in range(10):
        result = await get(fetcher, upstream, negative_ttl=5)
        assert shape(result) == (None, Source.FALLBACK, Reason.TIMEOUT, 0.0)
    assert loop.time() - started < 0.5
    assert upstream.calls == 1
    assert fetcher.stats().negative_hits == 10

    clock.advance(5)
    upstream.release.set()
    assert (await get(fetcher, upstream, negative_ttl=5)).source is Source.FRESH
    assert upstream.calls == 2


async def test_a_fetch_running_past_max_fetch_s_fails_with_timeout(
    clock: FakeClock, loop_errors: list[dict[str, Any]]
) -> None:
    fetcher = CacheFetcher(MemoryCache(max_bytes=10_000, clock=clock), max_fetch_s=0.05)
    upstream = Upstream()
    upstream.hold()
    result = await get(fetcher, upstream, timeout=None)
    assert shape(result) == (None, Source.FALLBACK, Reason.TIMEOUT, 0.0)
    assert (await get(fetcher, upstream)).reason is Reason.TIMEOUT  # remembered
    assert upstream.calls == 1
    await fetcher.aclose()


async def test_open_breaker_stops_fetches_then_a_probe_closes_it(
    fetcher: CacheFetcher, clock: FakeClock
) -> None:
    breaker = CircuitBreaker("api.example", failure_threshold=2, reset_timeout=10, clock=clock)
    upstream = Upstream("ok")
    upstream.error = ConnectionError()
    for _ in range(2):
        result = await get(fetcher, upstream, breaker=breaker, negative_ttl=0)
        assert result.reason is Reason.UPSTREAM_ERROR
    assert breaker.stats().state is BreakerState.OPEN

    result = await get(fetcher, upstream, breaker=breaker, negative_ttl=0)
    assert shape(result) == (None, Source.FALLBACK, Reason.CIRCUIT_OPEN, 0.0)
    assert upstream.calls == 2

    clock.advance(10)
    upstream.error = None
    result = await get(fetcher, upstream, breaker=breaker, negative_ttl=0)
    assert result.source is Source.FRESH
    assert breaker.stats().state is BreakerState.CLOSED
    assert upstream.calls == 3
    assert fetcher.stats().circuit_rejections == 1


async def test_open_breaker_serves_stale(fetcher: CacheFetcher, clock: FakeClock) -> None:
    await get(fetcher, Upstream("old"))
    clock.advance(30)
    breaker = CircuitBreaker(failure_threshold=1, clock=clock)
    breaker.record_failure()
    result = await get(fetcher, Upstream("new"), breaker=breaker)
    assert shape(result) == ("old", Source.STALE, Reason.CIRCUIT_OPEN, 30.0)


async def test_a_cancelled_caller_leaves_the_fetch_running(fetcher: CacheFetcher) -> None:
    upstream = Upstream("v")
    upstream.hold()
    caller = asyncio.create_task(get(fetcher, upstream))
    await asyncio.sleep(0.01)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    upstream.release.set()
    await settle(fetcher)
    assert (await get(fetcher, upstream)).source is Source.CACHED


async def test_an_invalidation_during_the_fetch_keeps_its_answer_out_of_the_cache(
    fetcher: CacheFetcher,
) -> None:
    cache = fetcher.cache
    before_event = Upstream("cart before the event")
    before_event.hold()
    first = asyncio.create_task(get(fetcher, before_event, key="cart:u:1", tags=["u:1"]))
    await asyncio.sleep(0.01)

    cache.invalidate_tag("u:1")  # the event for u:1 is stored while the fetch runs
    after_event = Upstream("cart after the event")
    second = await get(fetcher, after_event, key="cart:u:1", tags=["u:1"])
    assert second.value == "cart after the event"  # a new fetch, not the stale flight

    before_event.release.set()
    assert (await first).value == "cart before the event"
    await settle(fetcher)
    assert (entry := cache.lookup("cart:u:1")) is not None
    assert entry.value == "cart after the event"


async def test_aclose_cancels_fetches_and_leaves_no_task(
    clock: FakeClock, loop_errors: list[dict[str, Any]]
) -> None:
    fetcher = CacheFetcher(MemoryCache(max_bytes=10_000, clock=clock))
    hung = Upstream()
    hung.hold()
    waiting = asyncio.create_task(get(fetcher, hung, key="a", timeout=None))
    assert (await get(fetcher, hung, key="b", timeout=0.01)).reason is Reason.TIMEOUT
    await asyncio.sleep(0.01)
    assert fetcher.stats().in_flight == 2

    await fetcher.aclose()

    assert fetcher.stats().in_flight == 0
    assert shape(await waiting) == (None, Source.FALLBACK, Reason.SHUTDOWN, 0.0)
    assert asyncio.all_tasks() == {asyncio.current_task()}
    assert fetcher.cache._watchers == {}
    result = await get(fetcher, Upstream(), key="c")
    assert shape(result) == (None, Source.FALLBACK, Reason.SHUTDOWN, 0.0)


async def test_aclose_grace_lets_a_fetch_finish_and_fill(clock: FakeClock) -> None:
    fetcher = CacheFetcher(MemoryCache(max_bytes=10_000, clock=clock))
    upstream = Upstream("v")
    upstream.hold()
    await get(fetcher, upstream, timeout=0)
    asyncio.get_running_loop().call_later(0.02, upstream.release.set)
    await fetcher.aclose(grace=1.0)
    assert (entry := fetcher.cache.lookup("k")) is not None
    assert entry.value == "v"


async def test_size_and_tags_are_stored_with_the_value(fetcher: CacheFetcher) -> None:
    await get(fetcher, Upstream({"a": 1}), key="recs:u:7", tags=["u:7"], size=lambda value: 4096)
    stats = fetcher.cache.stats()
    assert stats.size_bytes > 4096
    assert fetcher.cache.invalidate_tag("u:7") == 1


async def test_details_say_what_went_wrong(fetcher: CacheFetcher) -> None:
    upstream = Upstream()
    upstream.error = ConnectionError("connection refused")
    assert (await get(fetcher, upstream, key="a")).detail == "ConnectionError: connection refused"
    assert (
        await get(fetcher, upstream, key="a")
    ).detail == "ConnectionError: connection refused"  # remembered
    upstream.hold()
    result = await get(fetcher, upstream, key="b", timeout=0.01)
    assert result.detail == "no answer within 0.01 s"


async def test_breaker_key_picks_the_fetchers_breaker_for_the_host(clock: FakeClock) -> None:
    breakers = CircuitBreakers(failure_threshold=1, reset_timeout=10, clock=clock)
    fetcher = CacheFetcher(MemoryCache(max_bytes=10_000, clock=clock), breakers=breakers)
    upstream = Upstream()
    upstream.error = ConnectionError()
    await get(fetcher, upstream, key="a", breaker_key="api.example", negative_ttl=0)
    result = await get(fetcher, upstream, key="b", breaker_key="api.example")
    assert shape(result) == (None, Source.FALLBACK, Reason.CIRCUIT_OPEN, 0.0)
    assert result.detail == "circuit for api.example is open"
    assert fetcher.breakers is breakers
    assert (await get(fetcher, Upstream("ok"), key="c", breaker_key="other.example")).source is Source.FRESH
    await fetcher.aclose()


async def test_lookup_without_fetching_and_invalidate(fetcher: CacheFetcher, clock: FakeClock) -> None:
    assert fetcher.lookup_stale_ok("k") is None
    await get(fetcher, Upstream("v"), tags=["u:1"])
    clock.advance(2)
    assert fetcher.lookup_stale_ok("k") == ("v", 2.0, True)
    clock.advance(10)
    assert fetcher.lookup_stale_ok("k") == ("v", 12.0, False)
    assert fetcher.invalidate_tag("u:1") == 1
    assert fetcher.lookup_stale_ok("k") is None
