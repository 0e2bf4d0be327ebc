"""Segments and broadcasts, as services over the ports.

``Segments`` keeps the named segments (``[[segments]]`` in the settings and
those made through the API), counts and samples them, and resolves a
broadcast's audience. A walk through the audience streams the stored
profiles from the store in pages (keyset order), and evaluates each page in a
worker process (``SegmentEvaluator``): the event loop only passes bytes
along, so ingest and content calls go on while a 100,000-user segment is
evaluated, and the GIL is not shared with a thread doing CPU work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from sendtime.server.domain.errors import InvalidInput, NotFound
from sendtime.server.domain.ports import BroadcastStore, ProfileStore
from sendtime.server.domain.profiles import ProfileBook
from sendtime.server.domain.segments import (
    Matches,
    Recipient,
    Segment,
    check_name,
    compile_segment,
    evaluate_batch,
)

log = logging.getLogger(__name__)

MAX_SAMPLE: Final = 100


class SegmentEvaluator:
    """Evaluates a segment over pages of stored profiles: in worker processes
    (``processes`` > 0), else in a thread of this process."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None

    async def evaluate(
        self, expression: str, rows: Sequence[tuple[str, bytes]], now: datetime, keep: bool
    ) -> Matches:
        if self.processes <= 0:
            return await asyncio.to_thread(evaluate_batch, expression, rows, now, keep)
        loop = asyncio.get_running_loop()
        for _ in range(2):
            if self._pool is None:
                # spawned, not forked: a fork of a process running an event
                # loop and threads copies their locks in whatever state they are
                self._pool = ProcessPoolExecutor(
                    self.processes, mp_context=multiprocessing.get_context("spawn")
                )
            try:
                return await loop.run_in_executor(self._pool, evaluate_batch, expression, rows, now, keep)
            except BrokenProcessPool:
                log.warning("a segment worker process died; starting new ones")
                self._pool = None
        return await asyncio.to_thread(evaluate_batch, expression, rows, now, keep)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await asyncio.to_thread(pool.shutdown, True, cancel_futures=True)


@dataclass(slots=True)
class SegmentScan:
    """What a walk through the stored profiles found."""

    scanned: int = 0
    matched: int = 0
    recipients: list[Recipient] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    elapsed_s: float = 0.0

    def add(self, matches: Matches) -> None:
        self.scanned += matches.scanned
        self.matched += matches.matched
        if matches.recipients:
            self.recipients.extend(matches.recipients)
        self.errors += matches.errors
        if matches.first_error and not self.first_error:
            self.first_error = matches.first_error


@dataclass(frozen=True, slots=True)
class SampledUser:
    user_id: str
    anonymous_id: str
    email: str
    timezone: str


class Segments:
    def __init__(
        self,
        *,
        store: BroadcastStore,
        profiles: ProfileStore,
        book: ProfileBook,
        configured: Sequence[Segment],
        evaluator: SegmentEvaluator,
        batch: int,
        clock: Callable[[], datetime],
    ) -> None:
        self._store = store
        self._profiles = profiles
        self._book = book
        self._configured = {s.name: s for s in configured}
        self._evaluator = evaluator
        self._batch = batch
        self._clock = clock
        # a walk at a time: two at once would only share the same cores
        self._walking = asyncio.Lock()

    @staticmethod
    def check_configured(configured: Sequence[Segment]) -> None:
        """At start: every [[segments]] expression compiles (else the server does not start)."""
        for index, segment in enumerate(configured):
            compile_segment(segment.expression, field=f"segments[{index}].expression")

    async def save(self, name: str, expression: str, description: str = "") -> Segment:
        """Make or replace a segment made through the API."""
        check_name(name, field="segment.name")
        if name in self._configured:
            raise InvalidInput.field(
                "segment.name", f"{name!r} is defined in the settings ([[segments]]); change it there"
            )
        compile_segment(expression, field="segment.expression")
        segment = Segment(name=name, expression=expression.strip(), description=description, source="api")
        await self._store.save_segment(segment)
        return segment

    async def get(self, name: str) -> Segment:
        segment = self._configured.get(name) or await self._store.get_segment(name)
        if segment is None:
            raise NotFound(f"no segment named {name!r}")
        return segment

    async def all(self) -> list[Segment]:
        stored = [s for s in await self._store.list_segments() if s.name not in self._configured]
        return sorted([*self._configured.values(), *stored], key=lambda s: s.name)

    async def expression_of(self, segment: str, expression: str) -> str:
        """The expression a request means: a segment's by name, or one given
        as it is (exactly one of the two), checked."""
        if bool(segment) == bool(expression):
            raise InvalidInput.field("segment", "give either a segment name or an expression, not both")
        if segment:
            return (await self.get(segment)).expression
        return compile_segment(expression).expression

    async def count(self, segment: str, expression: str) -> SegmentScan:
        source = await self.expression_of(segment, expression)
        return await self.walk(source, self._clock(), keep=False)

    async def sample(
        self, segment: str, expression: str, limit: int
    ) -> tuple[SegmentScan, list[SampledUser]]:
        if not 0 < limit <= MAX_SAMPLE:
            raise InvalidInput.field("limit", f"must be between 1 and {MAX_SAMPLE}")
        source = await self.expression_of(segment, expression)
        scan = await self.walk(source, self._clock(), keep=True, enough=limit)
        users = []
        for recipient in scan.recipients[:limit]:
            profile = await self._book.get(recipient.profile_key)
            email = profile.traits.get("email") if profile is not None else None
            users.append(
                SampledUser(
                    recipient.user_id,
                    recipient.anonymous_id,
                    str(email.value) if email is not None else "",
                    recipient.timezone,
                )
            )
        return scan, users

    async def walk(
        self, expression: str, now: datetime, *, keep: bool, enough: int | None = None
    ) -> SegmentScan:
        """Evaluate ``expression`` over every stored profile (or until
        ``enough`` matched), a page at a time, several pages in flight."""
        async with self._walking:
            # what the book folded but has not saved yet is part of "now"
            await self._book.save_now()
            started = time.perf_counter()
            scan = SegmentScan()
            window = max(2, 2 * self._evaluator.processes)
            pending: set[asyncio.Future[Matches]] = set()
            after = ""
            try:
                while True:
                    rows = await self._profiles.scan_profiles(after, self._batch)
                    if rows:
                        after = rows[-1][0]
                        pending.add(
                            asyncio.ensure_future(self._evaluator.evaluate(expression, rows, now, keep))
                        )
                    if pending and (len(pending) >= window or not rows):
                        done, pending = await asyncio.wait(
                            pending,
                            return_when=asyncio.FIRST_COMPLETED if rows else asyncio.ALL_COMPLETED,
                        )
                        for finished in done:
                            scan.add(finished.result())
                    if not rows or (enough is not None and scan.matched >= enough):
                        break
            finally:
                for future in pending:
                    future.cancel()
                for future in pending:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await future
            scan.elapsed_s = time.perf_counter() - started
            return scan
