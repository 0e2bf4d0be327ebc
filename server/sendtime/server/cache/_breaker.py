"""A circuit breaker per upstream host: pure state, an injectable clock, no I/O.

    CLOSED --(failure_threshold consecutive failures)--> OPEN
    OPEN --(reset_timeout elapsed, next allow())--> HALF_OPEN, that caller is the probe
    HALF_OPEN --(probe succeeds)--> CLOSED
    HALF_OPEN --(probe fails)--> OPEN, for another reset_timeout

While HALF_OPEN only the probe goes through. A probe that never reports (its
caller was cancelled) stops blocking after reset_timeout: the next allow()
becomes a new probe. Consecutive failures rather than a failure rate over a
window: one counter, no buckets, and it trips on exactly the outage it is for
(a host that fails every call) while a flaky host that mostly answers stays in
use, its failures served stale by the cache.
"""

from __future__ import annotations

import enum
import time

import msgspec

from sendtime.server.cache._memory import Clock


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class BreakerStats(msgspec.Struct, frozen=True):
    name: str
    state: BreakerState
    consecutive_failures: int
    successes: int
    failures: int
    rejections: int
    """Calls refused while open (or half-open with a probe out)."""
    opened: int
    """Times the breaker went from closed or half-open to open."""


class CircuitBreaker:
    def __init__(
        self,
        name: str = "",
        *,
        failure_threshold: int = 5,
        reset_timeout: float = 30.0,
        clock: Clock = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if not reset_timeout > 0:
            raise ValueError("reset_timeout must be > 0")
        self.name = name
        self._failure_threshold = failure_threshold
        self._reset_timeout = reset_timeout
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._consecutive_failures = 0
        self._changed_at = 0.0
        """When it opened, or when the current probe was let through."""
        self._successes = 0
        self._failures = 0
        self._rejections = 0
        self._opened = 0

    @property
    def state(self) -> BreakerState:
        return self._state

    def allow(self) -> bool:
        """May a call go to the host now? A True from an open breaker makes the
        caller the half-open probe: it must report with record_success or
        record_failure."""
        if self._state is BreakerState.CLOSED:
            return True
        now = self._clock()
        if now - self._changed_at >= self._reset_timeout:
            self._state = BreakerState.HALF_OPEN
            self._changed_at = now
            return True
        self._rejections += 1
        return False

    def record_success(self) -> None:
        self._successes += 1
        self._consecutive_failures = 0
        if self._state is BreakerState.HALF_OPEN:
            self._state = BreakerState.CLOSED
        # A success that was let through before the breaker opened says little
        # about the host now: an open breaker waits for its probe.

    def record_failure(self) -> None:
        self._failures += 1
        self._consecutive_failures += 1
        if self._state is BreakerState.HALF_OPEN or (
            self._state is BreakerState.CLOSED and self._consecutive_failures >= self._failure_threshold
        ):
            self._state = BreakerState.OPEN
            self._changed_at = self._clock()
            self._opened += 1

    def stats(self) -> BreakerStats:
        return BreakerStats(
            name=self.name,
            state=self._state,
            consecutive_failures=self._consecutive_failures,
            successes=self._successes,
            failures=self._failures,
            rejections=self._rejections,
            opened=self._opened,
        )


class CircuitBreakers:
    """One CircuitBreaker per host, made on first use with shared settings."""

    def __init__(
        self, *, failure_threshold: int = 5, reset_timeout: float = 30.0, clock: Clock = time.monotonic
    ) -> None:
        self._failure_threshold = failure_threshold
        self._reset_timeout = reset_timeout
        self._clock = clock
        self._breakers: dict[str, CircuitBreaker] = {}

    def for_host(self, host: str) -> CircuitBreaker:
        breaker = self._breakers.get(host)
        if breaker is None:
            breaker = CircuitBreaker(
                host,
                failure_threshold=self._failure_threshold,
                reset_timeout=self._reset_timeout,
                clock=self._clock,
            )
            self._breakers[host] = breaker
        return breaker

    def stats(self) -> list[BreakerStats]:
        return [breaker.stats() for breaker in self._breakers.values()]
