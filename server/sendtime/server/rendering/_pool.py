"""Rendering in worker processes, beside the event loop rather than on it.

Liquid, MJML and the text part are CPU work that holds the GIL (mjml-python
too): on the event loop a render stalls every other call for about a
millisecond, and threads would not run two at once. Worker processes
(sendtime.server.rendering._worker) render on the other cores while the loop
goes on serving.

The server keeps the parsed templates (it needs their blocks and fallbacks to
gather the data); a worker gets only plain data, the template's file and
version and the render context, over a pipe the event loop reads itself: no
helper threads, so no GIL hand-offs between them and the loop. An email a
worker cannot render (the file changed since the server parsed it, a worker
died, a context that does not pickle) is rendered in the server's process, so
every call still gets its email from the version the server picked.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import pickle
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any, Final, Protocol, cast

from ._template import RenderedEmail, Template

log = logging.getLogger(__name__)

#: A message on a worker's pipes: this many bytes of length (big-endian), then a pickle.
LENGTH_BYTES: Final = 4
_WORKER_ARGV: Final = (sys.executable, "-m", "sendtime.server.rendering._worker")
_STOP_TIMEOUT_S: Final = 5.0
_RESTART_INTERVAL_S: Final = 1.0
_START_TIMEOUT_S: Final = 30.0


class Renderable(Protocol):
    def render(self, context: Mapping[str, Any]) -> Any: ...


class WorkerGoneError(Exception):
    """The worker process ended before it answered."""


class RenderPool:
    """``processes`` worker processes; 0 renders on the event loop, as before.

    ``await pool.start()`` once on the running loop, ``await pool.render(template,
    context)`` per email, ``await pool.aclose()`` at shutdown."""

    def __init__(self, processes: int, *, argv: tuple[str, ...] = _WORKER_ARGV) -> None:
        self.processes = processes
        self._argv = argv
        self._workers: list[_Worker | None] = [None] * processes
        self._started_at = [float("-inf")] * processes
        self._closed = False

    async def start(self) -> None:
        """Starts every worker and waits until each has imported what it needs
        (a few hundred ms of CPU that would otherwise compete with the server's
        first calls). A worker not ready in time is left to finish starting;
        emails are rendered in the server meanwhile."""
        workers = [await self._start_worker(slot) for slot in range(self.processes)]
        try:
            async with asyncio.timeout(_START_TIMEOUT_S):
                await asyncio.gather(*(asyncio.shield(w.ready) for w in workers))
        except TimeoutError:
            log.warning(
                "render workers not ready after %.0f s; rendering in the server meanwhile", _START_TIMEOUT_S
            )
        except WorkerGoneError:
            log.warning("a render worker ended while starting; rendering in the server meanwhile")

    async def render(self, template: Renderable, context: Mapping[str, Any]) -> RenderedEmail:
        if not self.processes or self._closed or not isinstance(template, Template):
            return template.render(context)  # type: ignore[no-any-return]
        try:
            request = pickle.dumps(
                (str(template.path), template.version, dict(context)), protocol=pickle.HIGHEST_PROTOCOL
            )
        except (pickle.PicklingError, TypeError, AttributeError):
            return template.render(context)
        worker = await self._least_busy()
        if worker is None:  # none is ready: starting, or restarting after a crash
            return template.render(context)
        try:
            answer = await worker.ask(request)
        except WorkerGoneError:
            log.warning("a render worker ended; rendering %s in the server instead", template.id)
            return template.render(context)
        email, records = pickle.loads(answer)  # noqa: S301 (our own worker's pipe)
        for name, level, message in records:
            logging.getLogger(name).log(level, "%s", message)
        if email is None:  # the worker could not render this version
            return template.render(context)
        assert isinstance(email, RenderedEmail)
        return email

    async def _least_busy(self) -> _Worker | None:
        """The ready worker with the fewest requests waiting, or None. A dead
        one is replaced, but not more than once a second (one that dies at
        start must not be started again for every email); until its
        replacement is ready, the others (or the server) render."""
        best: _Worker | None = None
        now = time.monotonic()
        for slot, worker in enumerate(self._workers):
            if worker is None or not worker.alive:
                if now - self._started_at[slot] >= _RESTART_INTERVAL_S:
                    await self._start_worker(slot)
                continue
            if not worker.ready.done():
                continue
            if best is None or worker.waiting < best.waiting:
                best = worker
        return best

    async def _start_worker(self, slot: int) -> _Worker:
        self._started_at[slot] = time.monotonic()
        loop = asyncio.get_running_loop()
        _, worker = await loop.subprocess_exec(
            _Worker, *self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None
        )
        self._workers[slot] = worker
        return worker

    async def aclose(self) -> None:
        """Ends every worker: end of input, then a kill for one that does not stop."""
        self._closed = True
        workers = [w for w in self._workers if w is not None]
        self._workers = [None] * self.processes
        await asyncio.gather(*(w.stop(_STOP_TIMEOUT_S) for w in workers))


class _Worker(asyncio.SubprocessProtocol):
    """One worker process: requests written to its stdin, answers read from its
    stdout in the same order."""

    def __init__(self) -> None:
        self._transport: asyncio.SubprocessTransport | None = None
        self._requests: asyncio.WriteTransport | None = None
        self._buffer = bytearray()
        self._waiting: collections.deque[asyncio.Future[bytes]] = collections.deque()
        loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[None] = loop.create_future()
        #: Done when the worker has said it is ready (its first message).
        self.ready: asyncio.Future[None] = loop.create_future()
        self.alive = True

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's, hence casts, not checks
        self._transport = cast("asyncio.SubprocessTransport", transport)
        self._requests = cast("asyncio.WriteTransport", self._transport.get_pipe_transport(0))

    def ask(self, request: bytes) -> asyncio.Future[bytes]:
        if not self.alive or self._requests is None:
            raise WorkerGoneError
        answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._requests.write(len(request).to_bytes(LENGTH_BYTES, "big") + request)
        self._waiting.append(answer)
        return answer

    def pipe_data_received(self, fd: int, data: bytes | bytearray) -> None:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= LENGTH_BYTES:
            end = LENGTH_BYTES + int.from_bytes(buffer[:LENGTH_BYTES], "big")
            if len(buffer) < end:
                return
            answer = bytes(buffer[LENGTH_BYTES:end])
            del buffer[:end]
            if not self.ready.done():
                self.ready.set_result(None)  # the first message says the worker is ready
                continue
            waiter = self._waiting.popleft()
            if not waiter.done():  # the caller may have given up meanwhile
                waiter.set_result(answer)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd == 1:
            self._gone()

    def process_exited(self) -> None:
        self._gone()
        if not self._exited.done():
            self._exited.set_result(None)

    def _gone(self) -> None:
        self.alive = False
        if not self.ready.done():
            self.ready.set_exception(WorkerGoneError())
            self.ready.exception()  # retrieved: nobody need wait for it
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_exception(WorkerGoneError())

    async def stop(self, timeout_s: float) -> None:
        if self._requests is not None:
            self._requests.close()
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(self._exited)
        except TimeoutError:
            if self._transport is not None:
                with contextlib.suppress(ProcessLookupError):
                    self._transport.kill()
                await self._exited
        if self._transport is not None:
            self._transport.close()


__all__ = ["RenderPool", "Renderable", "WorkerGoneError"]
