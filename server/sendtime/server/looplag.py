"""How late the event loop runs: the answer reserve grows with it.

Under load, a finished answer waits for the loop (and the transport) before it
reaches the caller; a fixed reserve is then too small and answers arrive after
the caller's deadline. This samples the loop's lateness every few
milliseconds and keeps a decaying maximum, so the content pipeline can keep
back as much time as the loop is currently losing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Final

_INTERVAL_S: Final = 0.005
#: How fast an old peak is forgotten: halves in about 0.2 s of samples.
_DECAY: Final = 0.985


class LoopLag:
    def __init__(self) -> None:
        self._peak = 0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def recent_peak_s(self) -> float:
        """A decaying maximum of how late the loop ran lately, in seconds."""
        return self._peak

    def start(self) -> None:
        self._task = asyncio.create_task(self._sample(), name="sendtime-loop-lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _sample(self) -> None:
        while True:
            asked = time.monotonic()
            await asyncio.sleep(_INTERVAL_S)
            late = time.monotonic() - asked - _INTERVAL_S
            self._peak = max(late, self._peak * _DECAY)
