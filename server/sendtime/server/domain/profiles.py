"""Live profiles in memory, folded from committed events, saved in batches.

``domain.commits.AfterCommit`` hands every committed round to ``fold``, one
after another in commit order (a profile is loaded from the store the first
time it is needed), so a reader on the loop always sees whole rounds, and an
ingest call waits for its round to be folded before it acks: whoever reads
after an ack sees the event.

Every ``flush_interval_s`` the dirty profiles are encoded and saved together
with the position they include (a slice at a time, see ``_flush``); a restart
folds only the events after it.
Many events for one user between saves cost one write. Encoding holds the
event loop, so under heavy load saves are spaced further apart, to keep them
to about a tenth of the loop's time (a restart then re-folds a few seconds of
events rather than one). Only clean profiles are
evicted, so memory is bounded by the cache size plus what a flush interval of
traffic makes dirty.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Final

import msgspec

from sendtime.server.domain.events import Event
from sendtime.server.domain.ports import ProfileStore
from sendtime.server.domain.profile import Profile, fold

log = logging.getLogger(__name__)

#: Saves wait at least this many times as long as the last one took to encode.
_SAVE_SPACING: Final = 10.0
#: ...but never longer than this (unless the configured interval is longer):
#: after a crash, start-up re-folds every event since the last save.
_MAX_SAVE_SPACING_S: Final = 30.0
#: Profiles encoded and written at a time when saving.
_SAVE_SLICE: Final = 256

_encode = msgspec.msgpack.Encoder().encode


class ProfileBook:
    def __init__(
        self,
        store: ProfileStore,
        *,
        max_cached: int,
        flush_interval_s: float = 1.0,
    ) -> None:
        self._store = store
        # Set when a round could not be folded: saving then would record a
        # position that includes events missing from the profiles.
        self._saves_stopped = False
        self._max_cached = max_cached
        self._flush_interval = flush_interval_s
        self._profiles: OrderedDict[str, Profile] = OrderedDict()
        self._dirty: set[str] = set()
        # Staged by the save in progress, not saved yet: kept in memory like dirty ones.
        self._staged: set[str] = set()
        self._loading: dict[str, asyncio.Future[Profile | None]] = {}
        self._folded = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._flush_now = asyncio.Event()

    async def start(self) -> int:
        """Fold the events the saved profiles do not include yet; returns how many."""
        if self._store.writes_profiles_with_events:
            return 0  # nothing to replay: each commit wrote its profiles
        saved = await self._store.profiles_position()
        events, last = await self._store.replay(saved)
        if events:
            await self._fold_round(events)
            log.info("folded %d events stored after the last profile save", len(events))
        self._folded = last
        if events:
            await self._flush()
        self._tasks = [asyncio.create_task(self._flusher(), name="sendtime-profile-flusher")]
        return len(events)

    async def close(self) -> None:
        """Save everything, stop (after AfterCommit.close: every round told is folded)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._flush()

    # -- writing ------------------------------------------------------------

    @property
    def folded_position(self) -> int:
        """Every event at or before this position is folded."""
        return self._folded

    async def fold(
        self, events: Sequence[Event], position: int, folded: dict[str, Profile] | None = None
    ) -> None:
        """Fold one committed round, whose events reach ``position``. Called in
        commit order, one round at a time. ``folded``: the profiles as the
        store already folded and wrote them (kept as they are, nothing to save)."""
        try:
            if folded is not None:
                for key, profile in folded.items():
                    held = self._profiles.get(key)
                    # Rounds committed at once may be told out of order: a
                    # profile's event count only grows, so keep the newer.
                    if key not in self._dirty and (held is None or profile.event_count >= held.event_count):
                        self._profiles[key] = profile
                        self._profiles.move_to_end(key)
                self._evict()
                return
            await self._fold_round(events)
        except Exception:
            # The store could not load a profile: saving now would record a
            # position that includes events missing from the profiles.
            self._saves_stopped = True
            raise
        finally:
            self._folded = max(self._folded, position)

    async def _fold_round(self, events: Sequence[Event]) -> None:
        keys = {event.profile_key for event in events}
        missing = [key for key in keys if key not in self._profiles]
        if missing:
            await self._load(missing)
        for event in events:
            key = event.profile_key
            profile = self._profiles.get(key)
            if profile is None:
                profile = self._profiles[key] = Profile()
            fold(profile, event)
            self._dirty.add(key)
        self._evict()

    def forget(self, key: str) -> None:
        """Drop a profile someone else changed (it is loaded again when read)."""
        if key not in self._dirty and key not in self._staged:
            self._profiles.pop(key, None)

    # -- reading ------------------------------------------------------------

    def in_memory(self, key: str) -> Profile | None:
        """The profile if it is in memory now (no store read), else None.
        Callers must not change it."""
        profile = self._profiles.get(key)
        if profile is not None:
            self._profiles.move_to_end(key)
        return profile

    async def get(self, key: str) -> Profile | None:
        """The profile as of the last folded round. Callers must not change it."""
        profile = self._profiles.get(key)
        if profile is not None:
            self._profiles.move_to_end(key)
            return profile
        await self._load([key])
        return self._profiles.get(key)

    async def _load(self, keys: Sequence[str]) -> None:
        """Load profiles not in memory, each key at most once at a time."""
        waiting = [self._loading[key] for key in keys if key in self._loading]
        wanted = [key for key in keys if key not in self._loading and key not in self._profiles]
        if wanted:
            loop = asyncio.get_running_loop()
            futures = {key: loop.create_future() for key in wanted}
            self._loading.update(futures)
            try:
                found = await self._store.load_profiles(wanted)
            except BaseException as exc:
                for key, future in futures.items():
                    del self._loading[key]
                    future.set_exception(exc)
                    future.exception()  # retrieved here; the raise below reports it
                raise
            for key, future in futures.items():
                del self._loading[key]
                profile = found.get(key)
                # a fold may have created it while we waited: keep that one
                if profile is not None and key not in self._profiles:
                    self._profiles[key] = profile
                future.set_result(profile)
        for future in waiting:
            await future

    # -- saving -------------------------------------------------------------

    async def save_now(self) -> None:
        """Save every profile folded so far (a walk through the stored
        profiles then sees them all)."""
        await self._flush()

    def _evict(self) -> None:
        excess = len(self._profiles) - self._max_cached
        if excess <= 0:
            return
        for key in list(self._profiles)[: excess * 2]:
            if excess <= 0:
                break
            if key not in self._dirty and key not in self._staged and key not in self._loading:
                del self._profiles[key]
                excess -= 1
        if excess > 0:
            self._flush_now.set()  # everything old is dirty: save so it can go

    async def _flusher(self) -> None:
        wait = self._flush_interval
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush_now.wait(), wait)
            self._flush_now.clear()
            try:
                encoding_s = await self._flush()
            except Exception:
                log.exception("saving profiles failed; will retry")
            else:
                # The longer an interval, the more events each encoded profile
                # covers: heavy load costs fewer encodes per event, not more.
                spacing = min(_SAVE_SPACING * encoding_s, _MAX_SAVE_SPACING_S)
                wait = max(self._flush_interval, spacing)

    async def _flush(self) -> float:
        """Save the dirty profiles; returns the seconds spent encoding them.

        A slice at a time, so that what one save holds encoded (and the store's
        statement) stays bounded however many profiles are dirty: each slice is
        staged (written aside) and stops being dirty, a fold after that makes
        it dirty again, and the last step encodes every profile still dirty in
        one synchronous step (exactly the rounds folded so far) and saves it
        with the staged ones and the position, atomically."""
        if not self._dirty or self._saves_stopped:
            return 0.0
        encoding_s = 0.0
        try:
            # Bounded: under a fold rate that outpaces staging, the last step takes the rest.
            for _ in range(len(self._dirty) // _SAVE_SLICE + 2):
                if len(self._dirty) <= _SAVE_SLICE:
                    break
                started = time.perf_counter()
                keys = [self._dirty.pop() for _ in range(_SAVE_SLICE)]
                self._staged.update(keys)
                rows = [(key, _encode(self._profiles[key])) for key in keys]
                encoding_s += time.perf_counter() - started
                await self._store.stage_profiles(rows)
                del rows
            started = time.perf_counter()
            keys = list(self._dirty)
            rows = [(key, _encode(self._profiles[key])) for key in keys]
            encoding_s += time.perf_counter() - started
            position = self._folded
            self._dirty.clear()
            try:
                await self._store.save_profiles(rows, position)
            except BaseException:
                self._dirty.update(keys)
                raise
        except BaseException:
            self._dirty.update(self._staged)  # staged rows count only once saved
            raise
        finally:
            self._staged.clear()
        self._evict()
        return encoding_s
