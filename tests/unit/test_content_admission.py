"""The content pipeline's admission estimate (domain.content.Backlog) and the
loop monitor's handling of slow full collections (looplag.LoopLag)."""

from __future__ import annotations

import gc

import pytest

from sendtime.server.domain.content import Backlog
from sendtime.server.looplag import LoopLag


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_wait_ahead_follows_the_rate_answers_leave_at() -> None:
    clock = Clock()
    backlog = Backlog(clock)
    for _ in range(64):
        backlog.admit()
    # one answer every 2 ms while 64 stay admitted (each answered call replaced)
    for _ in range(400):
        clock.now += 0.002
        backlog.answered()
        backlog.admit()
    assert backlog.interval_s == pytest.approx(0.002, rel=1e-3)
    assert backlog.wait_s() == pytest.approx(65 * 0.002, rel=1e-3)


def test_idle_time_is_not_counted_as_work() -> None:
    clock = Clock()
    backlog = Backlog(clock)
    for _ in range(200):
        backlog.admit()
        clock.now += 0.001  # each call takes 1 ms ...
        backlog.answered()
        clock.now += 1.0  # ... then the server idles a second
    assert backlog.admitted == 0
    # from the 2 ms assumed at first, down to the 1 ms each call took
    assert backlog.interval_s == pytest.approx(0.001, rel=0.05)
    assert backlog.wait_s() == pytest.approx(0.001, rel=0.05)


def test_a_slow_full_collection_freezes_its_survivors() -> None:
    lag = LoopLag(freeze_after_gc_s=0.0)  # every full collection counts as slow here
    gc.callbacks.append(lag._on_gc)
    kept = [[i] for i in range(100_000)]
    try:
        gc.unfreeze()
        gc.collect()
        assert lag.freezes >= 1
        # out of the generations collections walk
        assert gc.get_freeze_count() >= len(kept)
        assert len(gc.get_objects(generation=2)) < len(kept)
    finally:
        gc.callbacks.remove(lag._on_gc)
        gc.unfreeze()


def test_a_quick_full_collection_freezes_nothing() -> None:
    lag = LoopLag(freeze_after_gc_s=3600.0)
    gc.callbacks.append(lag._on_gc)
    try:
        gc.unfreeze()
        gc.collect()
        assert lag.freezes == 0
        assert gc.get_freeze_count() == 0
    finally:
        gc.callbacks.remove(lag._on_gc)
