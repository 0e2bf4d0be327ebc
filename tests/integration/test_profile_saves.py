"""The profile book's saves on SQLite: a slice at a time, and still exactly the
rounds folded at the position saved, whatever folds while the slices go out."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import msgspec
import pytest

from sendtime.server.domain.events import Event
from sendtime.server.domain.profile import Profile, fold
from sendtime.server.domain.profiles import ProfileBook
from sendtime.server.store.sqlite import SqliteBackend
from sendtime.server.store.sqlite._records import SqliteProfiles
from tests.contract.conftest import track

USERS = 700  # several slices of 256


class FoldsWhileStaging:
    """The real SQLite profile store; when a slice has been staged, it lets
    ``during`` run (a round folded while the save is under way)."""

    def __init__(self, store: SqliteProfiles, book: list[ProfileBook], during: list[Event]) -> None:
        self._store = store
        self._book = book
        self._during = during
        self.writes_profiles_with_events = False
        self.staged = 0
        self.failing_saves = 0

    async def stage_profiles(self, rows: Sequence[tuple[str, bytes]]) -> None:
        await self._store.stage_profiles(rows)
        self.staged += 1
        if self.staged == 1 and self._during:
            await self._book[0].fold(self._during, 2)

    async def save_profiles(self, rows: Sequence[tuple[str, bytes]], position: int) -> None:
        if self.failing_saves:
            self.failing_saves -= 1
            raise OSError("disk full")
        await self._store.save_profiles(rows, position)

    async def load_profiles(self, keys: Sequence[str]) -> dict[str, Profile]:
        return await self._store.load_profiles(keys)

    async def profiles_position(self) -> int:
        return await self._store.profiles_position()

    async def replay(self, after: int) -> tuple[list[Event], int]:
        return await self._store.replay(after)

    async def scan_profiles(self, after: str, limit: int) -> list[tuple[str, bytes]]:
        return await self._store.scan_profiles(after, limit)


def expected(events: list[Event]) -> dict[str, Profile]:
    profiles: dict[str, Profile] = {}
    for event in events:
        fold(profiles.setdefault(event.profile_key, Profile()), event)
    return profiles


async def test_a_save_in_slices_holds_every_round_folded_before_its_position(tmp_path: Path) -> None:
    first = [track(f"a{n}", "Product Viewed", user=f"user{n}") for n in range(USERS)]
    # folded after the first slice went out: some of its users, and new ones
    during = [track(f"b{n}", "Product Viewed", user=f"user{n * 3}") for n in range(USERS // 3)]
    during += [track(f"c{n}", "Product Viewed", user=f"new{n}") for n in range(50)]
    storage = await SqliteBackend.open(tmp_path / "sendtime.sqlite3")
    book: list[ProfileBook] = []
    store = FoldsWhileStaging(storage.profiles, book, during)
    book.append(ProfileBook(store, storage.links, max_cached=100_000, flush_interval_s=3600))
    await book[0].fold(first, 1)
    await book[0].close()  # saves what is dirty
    assert store.staged >= 2  # in slices
    assert await storage.profiles.profiles_position() == 2
    keys = sorted({e.profile_key for e in first + during})
    saved = await storage.profiles.load_profiles(keys)
    assert saved == expected(first + during)
    await storage.close()


async def test_staged_profiles_count_only_once_a_save_commits(tmp_path: Path) -> None:
    path = tmp_path / "sendtime.sqlite3"
    encode = msgspec.msgpack.Encoder().encode
    storage = await SqliteBackend.open(path)
    await storage.profiles.save_profiles([("u:ada", encode(Profile(event_count=1)))], 3)
    await storage.profiles.stage_profiles([("u:ada", encode(Profile(event_count=2)))])
    assert (await storage.profiles.load_profiles(["u:ada"]))["u:ada"].event_count == 1
    await storage.close()  # a crash before the save: what was staged holds events past 3
    storage = await SqliteBackend.open(path)
    await storage.profiles.save_profiles([("u:bob", encode(Profile()))], 4)
    loaded = await storage.profiles.load_profiles(["u:ada", "u:bob"])
    assert {key: p.event_count for key, p in loaded.items()} == {"u:ada": 1, "u:bob": 0}
    await storage.profiles.stage_profiles([("u:ada", encode(Profile(event_count=5)))])
    await storage.profiles.save_profiles([], 6)
    assert (await storage.profiles.load_profiles(["u:ada"]))["u:ada"].event_count == 5
    await storage.close()


async def test_a_failed_save_leaves_every_staged_profile_to_save_again(tmp_path: Path) -> None:
    first = [track(f"a{n}", "Product Viewed", user=f"user{n}") for n in range(USERS)]
    storage = await SqliteBackend.open(tmp_path / "sendtime.sqlite3")
    book: list[ProfileBook] = []
    store = FoldsWhileStaging(storage.profiles, book, [])
    book.append(ProfileBook(store, storage.links, max_cached=10, flush_interval_s=3600))
    await book[0].fold(first, 1)
    store.failing_saves = 1
    with pytest.raises(OSError):
        await book[0].close()
    assert store.staged >= 2
    assert await storage.profiles.load_profiles(["u:user0"]) == {}
    await book[0].close()  # every profile is still held (not evicted) and saved now
    keys = sorted({e.profile_key for e in first})
    assert await storage.profiles.load_profiles(keys) == expected(first)
    assert await storage.profiles.profiles_position() == 1
    await storage.close()
