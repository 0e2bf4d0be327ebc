"""Get-or-fetch over a MemoryCache: what a content block does under a deadline.

One call, ``CacheFetcher.get_or_fetch``, answers at once from a fresh entry;
otherwise it makes sure exactly one fetch per key is running and waits for it
no longer than the caller's own timeout. The fetch runs in a task of its own,
so a caller that gives up (timeout, or its own cancellation) leaves it running
to fill the cache for the next caller. A stale entry is served at once while
that fetch refreshes it (stale-while-revalidate); a failed fetch is remembered
for negative_ttl so the next callers are answered at once instead of piling on
a failing source; an open circuit breaker stops fetches to its host.

The answer never raises for a source's sake: it is a Result whose source says
where the value came from (fresh, cached, stale, or fallback: no value, use the
template's fallback) and whose reason says why it is not fresh.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Generic, TypeVar, cast

import cachebox
import msgspec

from sendtime.server.cache._breaker import CircuitBreaker, CircuitBreakers
from sendtime.server.cache._memory import Entry, Fill, Freshness, MemoryCache
from sendtime.server.domain.provenance import Reason, Source

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Result(msgspec.Struct, Generic[T], frozen=True):
    value: T | None
    source: Source
    reason: Reason | None = None
    """Why the value is not fresh or cached; None when it is."""
    age: float = 0.0
    """Seconds since the value was fetched; 0 for a fallback."""
    detail: str = ""
    """For people: the error, the wait or the host behind the reason."""

    @property
    def needs_fallback(self) -> bool:
        return self.source is Source.FALLBACK


class FetcherStats(msgspec.Struct, frozen=True):
    fetches: int
    """Fetches started (one per key at a time)."""
    fetch_failures: int
    coalesced: int
    """Calls that waited on a fetch another call had started."""
    timeouts: int
    """Calls that stopped waiting at their timeout."""
    negative_hits: int
    """Calls answered from a remembered failure without fetching."""
    circuit_rejections: int
    stale_served: int
    fallbacks: int
    in_flight: int


class _Failure(msgspec.Struct, frozen=True):
    reason: Reason
    detail: str = ""


_REVALIDATING = _Failure(Reason.REVALIDATING)
_SHUTDOWN = _Failure(Reason.SHUTDOWN, "the cache fetcher is closed")


class _Outcome(msgspec.Struct, frozen=True):
    value: Any
    failure: _Failure | None
    """None when the fetch succeeded."""
    fetched_at: float


class _Flight(msgspec.Struct, frozen=True):
    fill: Fill
    task: asyncio.Task[_Outcome]


class CacheFetcher:
    """Single-flight, stale-while-revalidate get-or-fetch over ``cache``.

    ``breakers`` hands out the breaker for a ``breaker_key`` (a host); by
    default a CircuitBreakers with its defaults on the cache's clock.
    ``max_fetch_s`` bounds every fetch, including those nobody waits for any
    more; one that runs longer fails with reason timeout. ``max_negative``
    bounds how many failed keys are remembered (least recently failed go
    first). Call ``aclose()`` on shutdown: it waits up to ``grace`` for fetches
    in flight, then cancels the rest, and leaves no task behind.
    """

    def __init__(
        self,
        cache: MemoryCache[Any],
        *,
        breakers: CircuitBreakers | None = None,
        max_fetch_s: float = 30.0,
        max_negative: int = 10_000,
    ) -> None:
        if not max_fetch_s > 0:
            raise ValueError("max_fetch_s must be > 0")
        self._cache = cache
        self._breakers = breakers if breakers is not None else CircuitBreakers(clock=cache.clock)
        self._max_fetch_s = max_fetch_s
        self._negative: cachebox.LRUCache[str, tuple[float, _Failure]] = cachebox.LRUCache(max_negative)
        self._flights: dict[str, _Flight] = {}
        self._tasks: set[asyncio.Task[_Outcome]] = set()
        self._closed = False
        self._fetches = 0
        self._fetch_failures = 0
        self._coalesced = 0
        self._timeouts = 0
        self._negative_hits = 0
        self._circuit_rejections = 0
        self._stale_served = 0
        self._fallbacks = 0

    @property
    def cache(self) -> MemoryCache[Any]:
        return self._cache

    @property
    def breakers(self) -> CircuitBreakers:
        return self._breakers

    def lookup_stale_ok(self, key: str) -> tuple[Any, float, bool] | None:
        """(value, age, fresh) of a fresh or stale entry, without fetching."""
        now = self._cache.now()
        entry = self._cache.lookup(key, now)
        if entry is None:
            return None
        return entry.value, now - entry.stored_at, entry.state is Freshness.FRESH

    def invalidate_tag(self, tag: str) -> int:
        """MemoryCache.invalidate_tag: drops the entries and spoils fetches in flight."""
        return self._cache.invalidate_tag(tag)

    def fill_now(
        self,
        key: str,
        compute: Callable[[], T],
        *,
        ttl: float,
        stale_ttl: float,
        tags: Iterable[str] = (),
        negative_ttl: float = 2.0,
    ) -> Result[T] | None:
        """``compute()``'s value for ``key``, computed here and now and stored,
        for a value that needs no I/O (a block made from a profile already in
        memory): no task, no wait. None when a fetch for the key is in flight
        or a failure is remembered for it: get_or_fetch then decides, as for any
        fetch. Nothing can invalidate the key between the computation and the
        store (both run in this one synchronous step)."""
        if self._closed or key in self._flights:
            return None
        cache = self._cache
        now = cache.now()
        remembered = self._negative.get(key)
        if remembered is not None and now < remembered[0]:
            return None
        self._fetches += 1
        try:
            value = compute()
        except Exception as exc:
            failure = _Failure(Reason.UPSTREAM_ERROR, _describe(exc) or type(exc).__name__)
            logger.warning("computing cache key %s failed: %s", _loggable(key), failure.detail)
            self._fetch_failures += 1
            if negative_ttl > 0:
                self._negative.insert(key, (now + negative_ttl, failure))
            return self._degraded(cache.lookup(key, now), failure, now)
        cache.put(key, value, ttl=ttl, stale_ttl=stale_ttl, tags=tags)
        return Result(value, Source.FRESH, None, 0.0)

    async def get_or_fetch(
        self,
        key: str,
        fetch: Callable[[], Awaitable[T]],
        *,
        ttl: float,
        stale_ttl: float = 0.0,
        # Not a cancel scope (ASYNC109): the fetch outlives it to fill the cache,
        # and the caller gets stale or fallback rather than a TimeoutError.
        timeout: float | None,  # noqa: ASYNC109
        tags: Iterable[str] = (),
        negative_ttl: float = 2.0,
        size: Callable[[T], int] | None = None,
        breaker: CircuitBreaker | None = None,
        breaker_key: str | None = None,
        stale_while_revalidate: bool = True,
    ) -> Result[T]:
        """The value for ``key``: cached if fresh, else from ``fetch()``.

        ``ttl``/``stale_ttl``/``tags`` are stored with a fetched value;
        ``size(value)`` gives its byte size (estimated when None). ``timeout``
        bounds this call's wait for a fetch (None: until max_fetch_s), not the
        fetch itself. With ``stale_while_revalidate`` a stale entry is returned
        at once while one refresh runs; without it, the call waits for the
        refresh up to ``timeout`` and falls back to the stale entry. A failure
        is remembered for ``negative_ttl`` seconds. With ``breaker`` (or the
        fetcher's breaker for ``breaker_key``), no fetch starts while it is open."""
        cache = self._cache
        now = cache.now()
        entry: Entry[T] | None = cache.lookup(key, now)
        if entry is not None and entry.state is Freshness.FRESH:
            return Result(entry.value, Source.CACHED, None, now - entry.stored_at)

        flight = self._flights.get(key)
        if flight is not None and cache.fill_invalidated(flight.fill):
            flight = None  # an event made its answer out of date before it came
        if flight is None:
            if breaker is None and breaker_key is not None:
                breaker = self._breakers.for_host(breaker_key)
            refused = self._refusal(key, now, breaker)
            if refused is not None:
                return self._degraded(entry, refused, now)
            flight = self._start(key, fetch, tags, ttl, stale_ttl, negative_ttl, size, breaker)
        elif entry is None or not stale_while_revalidate:
            self._coalesced += 1

        if entry is not None and stale_while_revalidate:
            return self._degraded(entry, _REVALIDATING, now)
        return await self._wait(flight, timeout, entry)

    def _refusal(self, key: str, now: float, breaker: CircuitBreaker | None) -> _Failure | None:
        """Why no fetch may start for ``key`` now, or None if one may."""
        if self._closed:
            return _SHUTDOWN
        remembered = self._negative.get(key)
        if remembered is not None:
            until, failure = remembered
            if now < until:
                self._negative_hits += 1
                return failure
            self._negative.pop(key, None)
        if breaker is not None and not breaker.allow():
            self._circuit_rejections += 1
            return _Failure(Reason.CIRCUIT_OPEN, f"circuit for {breaker.name or 'the host'} is open")
        return None

    def _start(
        self,
        key: str,
        fetch: Callable[[], Awaitable[T]],
        tags: Iterable[str],
        ttl: float,
        stale_ttl: float,
        negative_ttl: float,
        size: Callable[[T], int] | None,
        breaker: CircuitBreaker | None,
    ) -> _Flight:
        fill = self._cache.begin_fill(key, tags)
        coro = self._fill(key, fetch, fill, ttl, stale_ttl, negative_ttl, size, breaker)
        task = asyncio.get_running_loop().create_task(coro, name=f"cache fill {key}")
        flight = _Flight(fill, task)
        self._flights[key] = flight
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._finished(key, flight, done))
        self._fetches += 1
        return flight

    async def _fill(
        self,
        key: str,
        fetch: Callable[[], Awaitable[T]],
        fill: Fill,
        ttl: float,
        stale_ttl: float,
        negative_ttl: float,
        size: Callable[[T], int] | None,
        breaker: CircuitBreaker | None,
    ) -> _Outcome:
        """The fetch task: never raises but CancelledError, so no failure is
        left unretrieved when every caller has stopped waiting. (end_fill is
        left to _finished: a task cancelled before its first step never runs
        this body, not even a finally.)"""
        cache = self._cache
        failure: _Failure
        try:
            async with asyncio.timeout(self._max_fetch_s):
                value = await fetch()
            cache.put(
                key,
                value,
                ttl=ttl,
                stale_ttl=stale_ttl,
                size=None if size is None else size(value),
                tags=fill.tags,
                fill=fill,
            )
        except TimeoutError as exc:
            # asyncio.timeout's, or the fetch's own (an HTTP client's read timeout)
            failure = _Failure(Reason.TIMEOUT, _describe(exc) or f"no answer within {self._max_fetch_s:g} s")
            logger.warning("fetch for cache key %s timed out: %s", _loggable(key), failure.detail)
        except Exception as exc:
            failure = _Failure(Reason.UPSTREAM_ERROR, _describe(exc) or type(exc).__name__)
            logger.warning("fetch for cache key %s failed: %s", _loggable(key), failure.detail)
        else:
            self._negative.pop(key, None)
            if breaker is not None:
                breaker.record_success()
            return _Outcome(value, None, cache.now())
        now = cache.now()
        self._fetch_failures += 1
        if negative_ttl > 0:
            self._negative.insert(key, (now + negative_ttl, failure))
        if breaker is not None:
            breaker.record_failure()
        return _Outcome(None, failure, now)

    def _finished(self, key: str, flight: _Flight, task: asyncio.Task[_Outcome]) -> None:
        self._tasks.discard(task)
        self._cache.end_fill(flight.fill)
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("cache fill task for %s crashed", _loggable(key), exc_info=exc)

    async def _wait(
        self,
        flight: _Flight,
        timeout: float | None,  # noqa: ASYNC109
        stale: Entry[T] | None,
    ) -> Result[T]:
        task = flight.task
        if not task.done() and (timeout is None or timeout > 0):
            # asyncio.wait never cancels the task: it runs on for the next caller.
            await asyncio.wait((task,), timeout=timeout)
        now = self._cache.now()
        if not task.done():
            self._timeouts += 1
            waited = f"{timeout:g} s" if timeout is not None and timeout > 0 else "no time left"
            return self._degraded(stale, _Failure(Reason.TIMEOUT, f"no answer within {waited}"), now)
        if task.cancelled():
            return self._degraded(stale, _SHUTDOWN, now)
        outcome = task.result()
        if outcome.failure is not None:
            return self._degraded(stale, outcome.failure, now)
        return Result(cast(T, outcome.value), Source.FRESH, None, now - outcome.fetched_at)

    def _degraded(self, stale: Entry[T] | None, failure: _Failure, now: float) -> Result[T]:
        if stale is not None:
            self._stale_served += 1
            return Result(stale.value, Source.STALE, failure.reason, now - stale.stored_at, failure.detail)
        self._fallbacks += 1
        return Result(None, Source.FALLBACK, failure.reason, 0.0, failure.detail)

    def stats(self) -> FetcherStats:
        return FetcherStats(
            fetches=self._fetches,
            fetch_failures=self._fetch_failures,
            coalesced=self._coalesced,
            timeouts=self._timeouts,
            negative_hits=self._negative_hits,
            circuit_rejections=self._circuit_rejections,
            stale_served=self._stale_served,
            fallbacks=self._fallbacks,
            in_flight=len(self._tasks),
        )

    async def aclose(self, *, grace: float = 0.0) -> None:
        """Stop starting fetches; give those in flight up to ``grace`` seconds
        to fill the cache, cancel the rest, and wait until every task is done."""
        self._closed = True
        tasks = set(self._tasks)
        if not tasks:
            return
        if grace > 0:
            await asyncio.wait(tasks, timeout=grace)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else ""


def _loggable(key: str) -> str:
    """A key as logs show it: keys hold user ids and filled-in URLs, so only
    their first part (the block or source) and a digest to tell them apart."""
    head, sep, _ = key.partition("|")
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return f"{head}|#{digest}" if sep else f"#{digest}"
