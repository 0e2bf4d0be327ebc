"""A broadcast's progress is one count of its ledger rows shared by everyone
asking at once or shortly after; the loop's check for the end counts anew."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from sendtime.server import broadcasting
from sendtime.server.broadcasting import Broadcasts
from sendtime.server.domain.broadcasts import Broadcast
from tests.unit.test_planning_hold import NOW, stored


class CountingStore:
    """send_counts only: how often it was asked, each answer let through by the test."""

    def __init__(self) -> None:
        self.calls = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.sent = 0
        self.fail_next = False

    async def send_counts(self, flow_id: str) -> dict[tuple[str, str], int]:
        self.calls += 1
        await self.gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise OSError("the database went away")
        return {("sent", ""): self.sent, ("scheduled", ""): 10 - self.sent}


def broadcasts(store: CountingStore) -> Broadcasts:
    return Broadcasts(
        store=cast(Any, store),
        segments=cast(Any, None),
        templates=lambda _: None,
        clock=lambda: NOW,
        default_sender="Shop <shop@example.com>",
    )


def a_broadcast() -> Broadcast:
    return stored(audience=10)


async def test_askers_at_once_share_one_count() -> None:
    store = CountingStore()
    store.gate.clear()
    service, broadcast = broadcasts(store), a_broadcast()
    asking = [asyncio.ensure_future(service.progress_of(broadcast)) for _ in range(10)]
    await asyncio.sleep(0)
    store.sent = 4
    store.gate.set()
    answers = await asyncio.gather(*asking)
    assert store.calls == 1
    assert {(p.sent, p.scheduled) for p in answers} == {(4, 6)}


async def test_a_young_count_is_reused_an_old_one_is_not(monkeypatch: pytest.MonkeyPatch) -> None:
    store = CountingStore()
    service, broadcast = broadcasts(store), a_broadcast()
    assert (await service.progress_of(broadcast)).sent == 0
    store.sent = 3
    assert (await service.progress_of(broadcast)).sent == 0  # young: shared
    monkeypatch.setattr(broadcasting, "PROGRESS_FRESH_S", 0.0)
    assert (await service.progress_of(broadcast)).sent == 3
    assert store.calls == 2


async def test_fresh_counts_anew_and_others_then_share_it() -> None:
    store = CountingStore()
    service, broadcast = broadcasts(store), a_broadcast()
    await service.progress_of(broadcast)
    store.sent = 10
    done = await service.progress_of(broadcast, fresh=True)
    assert done.finished
    assert (await service.progress_of(broadcast)).sent == 10
    assert store.calls == 2


async def test_a_failed_count_is_not_shared_afterwards() -> None:
    store = CountingStore()
    service, broadcast = broadcasts(store), a_broadcast()
    store.fail_next = True
    with pytest.raises(OSError, match="went away"):
        await service.progress_of(broadcast)
    store.sent = 2
    assert (await service.progress_of(broadcast)).sent == 2
    assert store.calls == 2


async def test_a_cancelled_asker_does_not_cancel_the_count_the_others_wait_for() -> None:
    store = CountingStore()
    store.gate.clear()
    service, broadcast = broadcasts(store), a_broadcast()
    impatient = asyncio.ensure_future(service.progress_of(broadcast))
    patient = asyncio.ensure_future(service.progress_of(broadcast))
    await asyncio.sleep(0)
    impatient.cancel()
    store.gate.set()
    assert (await patient).scheduled == 10
    assert impatient.cancelled()
    assert store.calls == 1
