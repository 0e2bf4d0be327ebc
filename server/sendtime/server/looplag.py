"""How late the event loop runs: the answer reserve grows with it.

Under load, a finished answer waits for the loop (and the transport) before it
reaches the caller; a fixed reserve is then too small and answers arrive after
the caller's deadline. This samples the loop's lateness every few
milliseconds and keeps a decaying maximum, so the content pipeline can keep
back as much time as the loop is currently losing.

A stall long enough to make callers miss deadlines is logged, with the time
the cyclic garbage collector spent since the last sample (gc callbacks), so a
stall can be told from a collection.

It also keeps full collections short. The data a server holds arrives after
start (profiles folded from ingest, cached blocks), so the gc.freeze() at
start does not cover it, and a full collection walks all of it: with the
content benchmark's 20,000 loaded users that stalled the loop 140-170 ms, with
100,000 over the 300 ms default budget, and every call in flight missed its
deadline at once. So when a full collection took long (FREEZE_AFTER_GC_S),
its survivors are frozen (moved to the permanent generation, which
collections never walk): the next full collection walks only what was
promoted since. The cost: a reference cycle among frozen objects that later
becomes garbage is never freed (plain garbage still is, by reference
counting). The profiles and cached blocks that make up the heap are trees
without cycles, and a freeze happens only after the heap grew enough to make
a collection slow, so what leaks is at most some of the calls in flight at
those few moments.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from typing import Any, Final

log = logging.getLogger(__name__)

_INTERVAL_S: Final = 0.005
#: How fast an old peak is forgotten: halves in about 0.2 s of samples.
_DECAY: Final = 0.985
#: A lateness worth a warning: a good share of a 300 ms default budget.
STALL_S: Final = 0.05
#: A full collection this long froze its survivors (see above).
FREEZE_AFTER_GC_S: Final = 0.01


class LoopLag:
    def __init__(self, *, freeze_after_gc_s: float = FREEZE_AFTER_GC_S) -> None:
        self._freeze_after_gc_s = freeze_after_gc_s
        self._peak = 0.0
        self._task: asyncio.Task[None] | None = None
        self.stalls = 0
        self.worst_stall_s = 0.0
        #: Seconds the cyclic collector ran since the last sample, and its
        #: longest single collection (with its generation) overall.
        self._gc_s = 0.0
        self._gc_started = 0.0
        self.worst_gc_s = 0.0
        self.worst_gc_generation = -1
        #: Full collections whose survivors were frozen.
        self.freezes = 0
        self._quiet_until = 0.0

    @property
    def recent_peak_s(self) -> float:
        """A decaying maximum of how late the loop ran lately, in seconds."""
        return self._peak

    def start(self) -> None:
        gc.callbacks.append(self._on_gc)
        self._task = asyncio.create_task(self._sample(), name="sendtime-loop-lag")

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on_gc)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        now = time.perf_counter()
        if phase == "start":
            self._gc_started = now
            return
        took = now - self._gc_started
        if info.get("generation") == 2 and took >= self._freeze_after_gc_s:
            # Right after a full collection every object is in the oldest
            # generation and has just been found alive: exactly the survivors.
            gc.freeze()
            self.freezes += 1
        self._gc_s += took
        if took > self.worst_gc_s:
            self.worst_gc_s = took
            self.worst_gc_generation = int(info.get("generation", -1))

    async def _sample(self) -> None:
        while True:
            asked = time.monotonic()
            await asyncio.sleep(_INTERVAL_S)
            late = time.monotonic() - asked - _INTERVAL_S
            self._peak = max(late, self._peak * _DECAY)
            if late >= STALL_S:
                self.stalls += 1
                self.worst_stall_s = max(self.worst_stall_s, late)
                if asked >= self._quiet_until:  # at most one line a second
                    self._quiet_until = asked + 1.0
                    log.warning(
                        "the event loop ran %.0f ms late (%.0f ms of it garbage collection; %d stalls so far)",
                        late * 1000,
                        self._gc_s * 1000,
                        self.stalls,
                    )
            self._gc_s = 0.0
