"""What happens to an event once it is stored, in order, in one place.

1. Plan flows. In the transaction that stores the events, the event store
   calls the ``SendPlanner`` (domain.flows.FlowPlanner, pure): a scheduled
   send or a cancellation is exactly as durable as the event that caused it.
2. The store tells ``AfterCommit.committed`` of the commit, on the event loop
   and in commit order, before any of the commit's appends return (even when
   the caller that asked has gone away). From here:
3. Wake the dispatcher at the earliest due time the commit scheduled.
4. Fold the new events into profiles (domain.profiles), one commit after
   another, so a reader on the loop always sees whole commits. (A backend
   that folds in the events' transaction, for several replicas, hands over
   the profiles it wrote instead.) A commit on another replica drops what
   this one holds of its users (``committed_elsewhere``).
5. Learn from them (recommendations) and drop the cached content of every
   id of each touched person (the ids linked to the events' ids, and those
   the events link), so the next content request, under any of them, sees
   the event.
6. Ack: ``Ingestor`` waits for ``settled(position)`` before it answers, so
   whoever reads after an ack sees the event (read-your-writes).

Every collaborator is passed in at construction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime

from sendtime.server.domain.events import Event
from sendtime.server.domain.ports import CommittedRound
from sendtime.server.domain.profiles import ProfileBook

log = logging.getLogger(__name__)


class AfterCommit:
    def __init__(
        self,
        *,
        profiles: ProfileBook,
        learn: Callable[[Sequence[Event]], None],
        invalidate_user: Callable[[str], None],
        wake_dispatcher: Callable[[datetime], None],
    ) -> None:
        self._profiles = profiles
        self._learn = learn
        self._invalidate_user = invalidate_user
        self._wake_dispatcher = wake_dispatcher
        self._rounds: asyncio.Queue[CommittedRound] = asyncio.Queue()
        self._settled = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """After ``profiles.start()``: what it folded at start counts as settled."""
        self._settled = self._profiles.folded_position
        self._task = asyncio.create_task(self._follow(), name="sendtime-after-commit")

    async def close(self) -> None:
        """Finish the commits told so far, then stop."""
        if self._task is None:
            return
        await self._rounds.join()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    def committed(self, round_: CommittedRound) -> None:
        """The event store's CommitListener (steps 2 and 3)."""
        if round_.earliest_due is not None:
            try:
                self._wake_dispatcher(round_.earliest_due)
            except Exception:  # the appends must be answered whatever happens
                log.exception("waking the dispatcher failed")
        if round_.new_events:
            self._rounds.put_nowait(round_)

    def committed_elsewhere(self, profile_keys: Sequence[str], earliest_due: datetime | None) -> None:
        """Another replica's commit: what this one holds of those users is stale."""
        touched: set[str] = set()
        for key in profile_keys:
            touched |= self._profiles.forget(key)
        self._invalidate(touched)
        if earliest_due is not None:
            self._wake_dispatcher(earliest_due)

    async def settled(self, position: int) -> None:
        """Returns once every commit up to ``position`` went through steps 3-5."""
        if max(self._settled, self._profiles.folded_position) >= position:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((position, waiter))
        await waiter

    async def _follow(self) -> None:
        while True:
            round_ = await self._rounds.get()
            try:
                touched = await self._profiles.fold(round_.new_events, round_.position, round_.profiles)
            except Exception:
                # The events are durable and a restart folds them again from the
                # last save (the book stops saving): never hold every ack hostage.
                log.exception(
                    "folding %d events failed; profiles are no longer saved", len(round_.new_events)
                )
            else:
                self._learned(round_.new_events, touched)
            finally:
                self._rounds.task_done()
            self._settled = max(self._settled, round_.position)
            self._release_waiters()

    def _learned(self, events: Sequence[Event], touched: Iterable[str]) -> None:
        try:
            self._learn(events)
        except Exception:
            log.exception("learning from %d events failed", len(events))
        self._invalidate(touched)

    def _invalidate(self, keys: Iterable[str]) -> None:
        """Drop the cached content of ``keys``: each id of a person whose
        profile changed (content asked under any id answers for the person)."""
        for key in keys:
            try:
                self._invalidate_user(key)
            except Exception:
                log.exception("dropping the cached content of %s failed", key)

    def _release_waiters(self) -> None:
        still = []
        for position, waiter in self._waiters:
            if position <= self._settled:
                if not waiter.done():
                    waiter.set_result(None)
            else:
                still.append((position, waiter))
        self._waiters = still
