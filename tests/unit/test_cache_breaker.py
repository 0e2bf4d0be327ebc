"""CircuitBreaker: closed -> open -> half-open -> closed, on a fake clock."""

from __future__ import annotations

import pytest

from sendtime.server.cache import BreakerState, BreakerStats, CircuitBreaker, CircuitBreakers


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def state(breaker: CircuitBreaker) -> BreakerState:
    """breaker.state, read through a call so that mypy does not narrow it
    across the calls that change it."""
    return breaker.state


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_opens_after_consecutive_failures_only(clock: FakeClock) -> None:
    breaker = CircuitBreaker("h", failure_threshold=3, reset_timeout=10, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # resets the run
    breaker.record_failure()
    breaker.record_failure()
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.allow()
    breaker.record_failure()
    assert state(breaker) is BreakerState.OPEN
    assert not breaker.allow()


def test_half_open_lets_one_probe_through_and_its_success_closes(clock: FakeClock) -> None:
    breaker = CircuitBreaker("h", failure_threshold=1, reset_timeout=10, clock=clock)
    breaker.record_failure()
    clock.now = 9.9
    assert not breaker.allow()
    clock.now = 10.0
    assert breaker.allow()  # the probe
    assert state(breaker) is BreakerState.HALF_OPEN
    assert not breaker.allow()
    assert not breaker.allow()
    breaker.record_success()
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.allow()
    assert breaker.stats() == BreakerStats(
        name="h",
        state=BreakerState.CLOSED,
        consecutive_failures=0,
        successes=1,
        failures=1,
        rejections=3,
        opened=1,
    )


def test_a_failed_probe_reopens_for_another_cool_down(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=10, clock=clock)
    breaker.record_failure()
    clock.now = 10
    assert breaker.allow()
    clock.now = 12
    breaker.record_failure()
    assert state(breaker) is BreakerState.OPEN
    clock.now = 21
    assert not breaker.allow()
    clock.now = 22
    assert breaker.allow()
    assert breaker.stats().opened == 2


def test_a_probe_that_never_reports_stops_blocking_after_the_cool_down(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=10, clock=clock)
    breaker.record_failure()
    clock.now = 10
    assert breaker.allow()  # this probe's caller is cancelled and never reports
    clock.now = 19
    assert not breaker.allow()
    clock.now = 20
    assert breaker.allow()


def test_a_late_success_does_not_close_an_open_breaker(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=10, clock=clock)
    breaker.record_failure()
    breaker.record_success()  # a call let through before it opened
    assert state(breaker) is BreakerState.OPEN


def test_invalid_settings() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker(failure_threshold=0)
    with pytest.raises(ValueError, match="reset_timeout"):
        CircuitBreaker(reset_timeout=0)


def test_one_breaker_per_host(clock: FakeClock) -> None:
    breakers = CircuitBreakers(failure_threshold=1, reset_timeout=5, clock=clock)
    a = breakers.for_host("a.example")
    assert breakers.for_host("a.example") is a
    a.record_failure()
    assert breakers.for_host("b.example").state is BreakerState.CLOSED
    assert {(s.name, s.state) for s in breakers.stats()} == {
        ("a.example", BreakerState.OPEN),
        ("b.example", BreakerState.CLOSED),
    }
