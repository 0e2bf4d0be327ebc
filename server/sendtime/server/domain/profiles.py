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

One person, several ids (domain.identity): profiles stay folded per id, and a
read answers for the person: the profiles of every id linked to the one asked
for, merged (domain.profile.merge; only the part of a shared device's
anonymous profile that was the person's). A profile is loaded together with
the links that reach it and their profiles (IdentityLinks.load_people: one
store call, so the first touch of an id costs no more than before); links
that later commits carry are learned from the events as they are folded, so
a person known in memory stays known without reading the store again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import msgspec

from sendtime.server.domain.events import Event
from sendtime.server.domain.identity import IdLink, identities_from, links_of
from sendtime.server.domain.ports import IdentityLinks, ProfileStore
from sendtime.server.domain.profile import Profile, fold, merge, restrict

log = logging.getLogger(__name__)

#: Saves wait at least this many times as long as the last one took to encode.
_SAVE_SPACING: Final = 10.0
#: ...but never longer than this (unless the configured interval is longer):
#: after a crash, start-up re-folds every event since the last save.
_MAX_SAVE_SPACING_S: Final = 30.0
#: Profiles encoded and written at a time when saving.
_SAVE_SLICE: Final = 256

_encode = msgspec.msgpack.Encoder().encode
_LATEST: Final = datetime.max.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Person:
    """One person as a read found them."""

    #: Their profile: every id's, merged. Callers must not change it.
    profile: Profile
    #: Every profile key of the person, the one asked for first.
    keys: tuple[str, ...]
    #: The person's ids other than the one asked for.
    linked_user_ids: tuple[str, ...] = ()
    linked_anonymous_ids: tuple[str, ...] = ()


class _Linked:
    """Keys linked to one another (directly or through others), as the store
    and the folds since have told: what their links say, and the merged
    profiles read since the last fold that touched them."""

    __slots__ = ("identities", "keys", "links", "merged")

    def __init__(self, links: Iterable[IdLink]) -> None:
        self.links = frozenset(links)
        self.identities = identities_from(self.links)
        self.keys = frozenset(key for link in self.links for key in (link.from_key, link.to_key))
        #: person -> what a read with no time gave (dropped by every fold of its keys)
        self.merged: dict[str, Person] = {}

    def person(self, key: str, at: datetime | None) -> str | None:
        """Whose ``key`` is (at ``at``, for an anonymous id: a shared device
        changes hands); None: nobody's but its own."""
        if key.startswith("u:"):
            return self.identities.person(key[2:])
        return self.identities.owner(key[2:], at or _LATEST)

    def parts(self, person: str) -> list[tuple[str, tuple[datetime | None, datetime | None] | None]]:
        """The person's keys, each with the span of its events that are the
        person's (None: all of them), in a fixed order."""
        parts: list[tuple[str, tuple[datetime | None, datetime | None] | None]] = [
            (f"u:{user}", None) for user in sorted(self.identities.user_ids(person))
        ]
        for anonymous in sorted(self.identities.anonymous_ids(person)):
            spans = self.identities.spans(anonymous, person)
            if spans == [(None, None)]:
                parts.append((f"a:{anonymous}", None))
            else:
                parts += [(f"a:{anonymous}", span) for span in spans]
        return parts


def _components(links: Iterable[IdLink]) -> list[set[IdLink]]:
    """``links`` grouped by the keys they connect."""
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        while (up := parent.setdefault(key, key)) != key:
            parent[key] = parent.setdefault(up, up)
            key = up
        return key

    links = list(links)
    for link in links:
        a, b = root(link.from_key), root(link.to_key)
        if a != b:
            parent[max(a, b)] = min(a, b)
    groups: dict[str, set[IdLink]] = {}
    for link in links:
        groups.setdefault(root(link.from_key), set()).add(link)
    return list(groups.values())


def _others(key: str, person: Person) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The person's user ids and anonymous ids other than ``key``'s."""
    others = [k for k in person.keys if k != key]
    return (
        tuple(sorted(k[2:] for k in others if k.startswith("u:"))),
        tuple(sorted(k[2:] for k in others if k.startswith("a:"))),
    )


class ProfileBook:
    def __init__(
        self,
        store: ProfileStore,
        links: IdentityLinks,
        *,
        max_cached: int,
        flush_interval_s: float = 1.0,
    ) -> None:
        self._store = store
        self._links = links
        #: Keys whose links are known: what links them (None: nothing does).
        #: A key is here while its profile is in memory (or one it links to is).
        self._linked: dict[str, _Linked | None] = {}
        #: Counts the links learned from folds: a load that began before one
        #: may have read the store without it, and does not say who is linked.
        self._links_learned = 0
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
        # One save at a time: a save that finds nothing dirty while another is
        # still writing what it took must wait for it (save_now promises a walk
        # through the store that sees every profile folded so far).
        self._saving = asyncio.Lock()

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
    ) -> set[str]:
        """Fold one committed round, whose events reach ``position``. Called in
        commit order, one round at a time. ``folded``: the profiles as the
        store already folded and wrote them (kept as they are, nothing to save).
        Returns every key whose person's profile the round may have changed
        (the events' keys, the keys linked to them, the keys newly linked)."""
        try:
            if folded is not None:
                for key, profile in folded.items():
                    held = self._profiles.get(key)
                    # Rounds committed at once may be told out of order: a
                    # profile's event count only grows, so keep the newer.
                    if key not in self._dirty and (held is None or profile.event_count >= held.event_count):
                        self._profiles[key] = profile
                        self._profiles.move_to_end(key)
            else:
                await self._fold_round(events)
            touched = self._learn_links(events)
            for key in dict.fromkeys(event.profile_key for event in events):
                linked = self._linked.get(key)
                if linked is not None:
                    linked.merged.clear()
                    touched |= linked.keys
                touched.add(key)
            self._evict()
            return touched
        except Exception:
            # The store could not load a profile: saving now would record a
            # position that includes events missing from the profiles.
            self._saves_stopped = True
            raise
        finally:
            self._folded = max(self._folded, position)

    def _learn_links(self, events: Sequence[Event]) -> set[str]:
        """Learn the links the round's events carry (the store wrote them in
        the round's transaction). Two groups known here are joined in memory;
        a key whose links are not known here is left to be loaded again."""
        touched: set[str] = set()
        for event in events:
            if not event.identity.user_id:
                continue  # the common anonymous event links nothing
            for link in links_of(event):
                self._links_learned += 1
                ends = [self._linked.get(key, self) for key in (link.from_key, link.to_key)]
                for end in ends:
                    if isinstance(end, _Linked):
                        touched |= end.keys
                touched |= {link.from_key, link.to_key}
                if any(end is self for end in ends):
                    for end, key in zip(ends, (link.from_key, link.to_key), strict=True):
                        self._drop_links(key, end)
                    continue
                joined = _Linked({link}.union(*(end.links for end in ends if isinstance(end, _Linked))))
                for key in joined.keys:
                    self._linked[key] = joined
        return touched

    def _drop_links(self, key: str, known: object) -> None:
        """Forget what links ``key`` (and every key of its group)."""
        self._linked.pop(key, None)
        if isinstance(known, _Linked):
            for other in known.keys:
                self._linked.pop(other, None)

    async def _fold_round(self, events: Sequence[Event]) -> None:
        keys = {event.profile_key for event in events}
        missing = [key for key in keys if key not in self._profiles or key not in self._linked]
        if missing:
            await self._load(missing)
        for event in events:
            key = event.profile_key
            profile = self._profiles.get(key)
            if profile is None:
                profile = self._profiles[key] = Profile()
                # the load just made found nothing: nothing links it (yet)
                self._linked.setdefault(key, None)
            fold(profile, event)
            self._dirty.add(key)

    def forget(self, key: str) -> set[str]:
        """Drop a profile someone else changed, and what links it (both are
        loaded again when read); returns the keys whose person it touched."""
        if key not in self._dirty and key not in self._staged:
            self._profiles.pop(key, None)
        known = self._linked.get(key)
        self._drop_links(key, known)
        return {key} | (known.keys if known is not None else set())

    # -- reading ------------------------------------------------------------

    def in_memory(self, key: str) -> Profile | None:
        """The person's profile if all of it is in memory now (no store
        read), else None. Callers must not change it."""
        person = self._person(key, None)
        return person.profile if isinstance(person, Person) else None

    async def get(self, key: str) -> Profile | None:
        """The profile of the person ``key`` is, as of the last folded round.
        Callers must not change it."""
        person = await self.person(key)
        return person.profile if person is not None else None

    async def person(self, key: str, at: datetime | None = None) -> Person | None:
        """The person ``key`` is (for an anonymous id, the one it was at
        ``at``: a shared device changes hands; None: now), as of the last
        folded round; None when no events were seen for any of their ids."""
        person = self._person(key, at)
        if person is self:
            for _ in range(2):  # again when links were learned while it loaded
                if await self._load([key]):
                    break
            person = self._person(key, at)
        if person is self:
            # nothing is stored under it (or links kept arriving): its own profile, if any
            profile = self._profiles.get(key)
            return Person(profile, (key,)) if profile is not None else None
        return person if isinstance(person, Person) else None

    def person_keys(self, key: str) -> frozenset[str]:
        """The keys known in memory to be linked to ``key`` (and itself)."""
        linked = self._linked.get(key)
        return linked.keys | {key} if linked is not None else frozenset((key,))

    def _person(self, key: str, at: datetime | None) -> Person | ProfileBook | None:
        """The person, without I/O: ``self`` when something must be loaded first."""
        if key not in self._linked:
            return self
        linked = self._linked[key]
        person = linked.person(key, at) if linked is not None else None
        if linked is None or person is None:
            profile = self._profiles.get(key)
            if profile is None:
                return None
            self._profiles.move_to_end(key)
            return Person(profile, (key,))
        if at is None and (known := linked.merged.get(person)) is not None:
            for part in known.keys:
                if part in self._profiles:
                    self._profiles.move_to_end(part)
            return Person(known.profile, (key, *(k for k in known.keys if k != key)), *_others(key, known))
        merged = Profile(user_id=person)
        keys: dict[str, None] = {key: None}
        seen = False
        for part, span in linked.parts(person):
            keys[part] = None
            profile = self._profiles.get(part)
            if profile is None:
                continue
            self._profiles.move_to_end(part)
            seen = True
            merge(merged, profile if span is None else restrict(profile, *span))
        if not seen:
            return None
        found = Person(merged, tuple(keys))
        if at is None:
            linked.merged[person] = found
        return Person(merged, found.keys, *_others(key, found))

    async def _load(self, keys: Sequence[str]) -> bool:
        """Load the people of keys whose links are not known (the links and
        every linked key's profile, in one store call), each key at most once
        at a time. Profiles in memory are kept: they are as new or newer.
        False when a fold learned links meanwhile: what was read may miss
        them, so it says nothing of who is linked (load again)."""
        settled = True
        waiting = [self._loading[key] for key in keys if key in self._loading]
        wanted = [key for key in keys if key not in self._loading and key not in self._linked]
        if wanted:
            loop = asyncio.get_running_loop()
            futures = {key: loop.create_future() for key in wanted}
            self._loading.update(futures)
            learned = self._links_learned
            try:
                found = await self._links.load_people(wanted)
            except BaseException as exc:
                for key, future in futures.items():
                    del self._loading[key]
                    future.set_exception(exc)
                    future.exception()  # retrieved here; the raise below reports it
                raise
            for key, profile in found.profiles.items():
                # a fold may have created it while we waited: keep that one
                if key not in self._profiles:
                    self._profiles[key] = profile
            settled = learned == self._links_learned
            if settled:  # else the next read loads again
                for group in _components(found.links):
                    linked = _Linked(group)
                    for key in linked.keys:
                        self._linked[key] = linked
                for key in wanted:
                    if key in self._profiles:
                        self._linked.setdefault(key, None)
            for key, future in futures.items():
                del self._loading[key]
                future.set_result(self._profiles.get(key))
        for future in waiting:
            await future
        return settled

    # -- saving -------------------------------------------------------------

    async def save_now(self) -> None:
        """Save every profile folded so far (a walk through the stored
        profiles then sees them all)."""
        await self._flush()

    def _evict(self) -> None:
        excess = len(self._profiles) - self._max_cached
        if excess <= 0:
            return
        # the oldest few only: copying every key of a 100,000-entry OrderedDict
        # costs about 10 ms, and this runs after every fold once the cache is full
        for key in list(itertools.islice(self._profiles, excess * 2)):
            if excess <= 0:
                break
            if key not in self._dirty and key not in self._staged and key not in self._loading:
                del self._profiles[key]
                self._drop_links(key, self._linked.get(key))
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
        """Save the dirty profiles (after the save under way, if any); returns
        the seconds spent encoding them."""
        async with self._saving:
            return await self._save_dirty()

    async def _save_dirty(self) -> float:
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
