"""ProfileBook over an in-memory ProfileStore (tests/fakes): replay at start,
one load per key however many ask, saves with the position they include,
dirty profiles never evicted, a failed save kept dirty, a failed fold stops
the saves. Saves happen on close (the timer is an hour): no sleeps."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from sendtime.server.domain.events import Event, IncomingEvent, validate
from sendtime.server.domain.profile import Profile
from sendtime.server.domain.profiles import ProfileBook
from tests.fakes import ManualClock, MemoryProfileStore, identify, track

CLOCK = ManualClock()


def event(incoming: IncomingEvent) -> Event:
    return validate(incoming, CLOCK.now())


def viewed(message_id: str, user: str, product: str = "p1") -> Event:
    return event(track(message_id, "Product Viewed", {"product_id": product}, user=user))


def book(store: MemoryProfileStore, *, max_cached: int = 100) -> ProfileBook:
    return ProfileBook(store, store, max_cached=max_cached, flush_interval_s=3600)


def encoded(profile: Profile) -> bytes:
    return msgspec.msgpack.encode(profile)


async def test_start_folds_the_events_the_saved_profiles_do_not_include() -> None:
    log = [(n, viewed(f"m{n}", "ada")) for n in range(1, 8)] + [
        (8, viewed("m8", "ada")),
        (9, viewed("m9", "grace")),
    ]
    store = MemoryProfileStore(log)
    store.rows["u:ada"], store.position = encoded(Profile(user_id="ada", event_count=5)), 7
    profiles = book(store)
    assert await profiles.start() == 2
    try:
        ada, grace = profiles.in_memory("u:ada"), profiles.in_memory("u:grace")
        assert ada is not None
        assert ada.event_count == 6
        assert grace is not None
        assert grace.event_count == 1
        assert profiles.folded_position == 9
        # saved at once with the position it includes: a second crash replays nothing again
        assert store.position == 9
        assert sorted(store.saves[-1][0]) == ["u:ada", "u:grace"]
    finally:
        await profiles.close()


async def test_a_profile_is_loaded_once_however_many_ask_at_the_same_time() -> None:
    store = MemoryProfileStore()
    store.rows["u:ada"] = encoded(Profile(user_id="ada", event_count=3))
    store.hold_loads = asyncio.Event()
    profiles = book(store)
    await profiles.start()
    try:
        readers = [asyncio.create_task(profiles.get("u:ada")) for _ in range(3)]
        folding = asyncio.create_task(profiles.fold([viewed("m1", "ada")], 1))
        await store.loading.wait()  # the first load is under way, held
        store.hold_loads.set()
        got = await asyncio.gather(*readers)
        await folding
        assert store.loads == [["u:ada"]]
        assert all(p is got[0] for p in got)
        profile = await profiles.get("u:ada")
        assert profile is not None
        assert profile.event_count == 4
    finally:
        await profiles.close()


async def test_close_saves_what_changed_with_the_position_it_includes() -> None:
    store = MemoryProfileStore()
    profiles = book(store)
    await profiles.start()
    await profiles.fold([viewed("m1", "ada"), viewed("m2", "grace")], 2)
    await profiles.fold([viewed("m3", "ada")], 3)
    assert store.saves == []  # many events between saves: nothing written yet
    await profiles.close()
    ((keys, position),) = store.saves
    assert (sorted(keys), position) == (["u:ada", "u:grace"], 3)
    saved = store.saved("u:ada")
    assert saved is not None
    assert saved.event_count == 2


async def test_a_save_that_fails_keeps_the_profiles_to_save_next_time() -> None:
    store = MemoryProfileStore()
    profiles = book(store)
    await profiles.start()
    await profiles.fold([viewed("m1", "ada")], 1)
    store.fail_saves = OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        await profiles.close()
    assert store.rows == {}
    assert store.position == 0
    store.fail_saves = None
    await profiles.close()
    assert (store.saves, store.position) == ([(["u:ada"], 1)], 1)


async def test_many_dirty_profiles_are_saved_a_slice_at_a_time_all_with_the_position() -> None:
    store = MemoryProfileStore()
    profiles = book(store, max_cached=1000)
    await profiles.start()
    users = [f"user{n}" for n in range(600)]
    await profiles.fold([viewed(f"m{n}", user) for n, user in enumerate(users)], 600)
    await profiles.close()
    assert len(store.rows) == 600
    assert store.staged == {}
    assert store.position == 600
    assert {key for keys, _ in store.saves for key in keys} == {f"u:{user}" for user in users}


async def test_save_now_returns_only_once_a_save_already_under_way_is_written() -> None:
    # The flusher took every dirty profile and is writing them; a walk through
    # the stored profiles (a segment count) that asks to save now must not
    # start before that write is done, or it misses those profiles.
    store = MemoryProfileStore()
    store.hold_saves = asyncio.Event()
    profiles = book(store)
    await profiles.start()
    await profiles.fold([viewed("m1", "ada"), viewed("m2", "grace")], 2)
    under_way = asyncio.create_task(profiles.save_now())
    await store.saving.wait()  # the first save holds ada and grace, not written yet
    stored_when_returned: list[str] = []

    async def walk() -> None:
        await profiles.save_now()
        stored_when_returned.extend(sorted(store.rows))

    walking = asyncio.create_task(walk())
    for _ in range(5):  # the second save_now runs as far as it can
        await asyncio.sleep(0)
    store.hold_saves.set()
    await asyncio.gather(under_way, walking)
    assert stored_when_returned == ["u:ada", "u:grace"]
    await profiles.close()


async def test_only_saved_profiles_are_evicted() -> None:
    store = MemoryProfileStore()
    profiles = book(store, max_cached=2)
    await profiles.start()
    await profiles.fold([viewed("m1", "a"), viewed("m2", "b"), viewed("m3", "c")], 3)
    # three dirty profiles over a bound of two: none is dropped before it is saved
    assert all(profiles.in_memory(k) is not None for k in ("u:a", "u:b", "u:c"))
    await profiles.close()
    # saved: the least recently used went, and comes back from the store when read
    assert sum(profiles.in_memory(k) is not None for k in ("u:a", "u:b", "u:c")) == 2
    again = await profiles.get("u:a")
    assert again is not None
    assert again.event_count == 1


async def test_forget_drops_a_clean_profile_and_keeps_one_not_saved_yet() -> None:
    store = MemoryProfileStore()
    profiles = book(store)
    await profiles.start()
    await profiles.fold([viewed("m1", "ada")], 1)
    profiles.forget("u:ada")
    # dirty: forgetting it would lose the event (its links are read again, with it kept)
    kept = await profiles.get("u:ada")
    assert kept is not None
    assert kept.event_count == 1
    assert store.saved("u:ada") is None
    await profiles.close()
    profiles.forget("u:ada")
    assert profiles.in_memory("u:ada") is None


async def test_a_fold_whose_load_fails_stops_every_later_save() -> None:
    store = MemoryProfileStore()
    store.rows["u:ada"] = encoded(Profile(user_id="ada"))
    profiles = book(store)
    await profiles.start()
    await profiles.fold([event(identify("m1", user="grace"))], 1)
    store.fail_loads = OSError("connection lost")
    with pytest.raises(OSError):
        await profiles.fold([viewed("m2", "ada")], 2)
    assert profiles.folded_position == 2  # the round counts as done: acks are not held hostage
    store.fail_loads = None
    await profiles.close()
    # position 2 would claim ada's unfolded view: nothing is saved from now on
    assert store.saves == []
    assert store.position == 0
