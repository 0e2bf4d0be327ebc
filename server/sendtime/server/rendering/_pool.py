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

Workers are used only while this process may run on more than one core: on
one (a container given one CPU, a process pinned with taskset) a worker would
take its render's CPU from the same core as the event loop, and add the
pipe's copies and a second process to schedule; the email is rendered in
place then. The cores are read again every second (a deployment may move the
process).

A worker is waited for only the time the caller can spare (``timeout_s``);
a late, busy, starting or dead worker means a render in the server, never a
missed deadline. A worker that stays silent far past the limit is killed, and
a dead one is replaced in the background, with a growing delay if it keeps
dying.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol, cast

from ._template import RenderedEmail, Template

log = logging.getLogger(__name__)

#: A message on a worker's pipes: this many bytes of length (big-endian), then a pickle.
LENGTH_BYTES: Final = 4
#: No answer is anywhere near this big (an email is tens of kB): a longer
#: frame means the pipe carries something else (stray output), and nothing
#: after it can be trusted, so the worker is treated as dead.
MAX_FRAME_BYTES: Final = 64 * 1024 * 1024
_WORKER_ARGV: Final = (sys.executable, "-m", "sendtime.server.rendering._worker")
_STOP_TIMEOUT_S: Final = 5.0
_START_TIMEOUT_S: Final = 30.0
#: How long a render waits for a worker when the caller gives no limit.
DEFAULT_TIMEOUT_S: Final = 1.0
#: Requests already waiting at the least busy worker beyond which the server
#: renders itself. Not small: a render on the event loop stalls every other
#: call for its millisecond, so under a burst waiting in a worker is the
#: better place (each wait is bounded by its time limit anyway); this bound
#: keeps a worker that fell behind from holding an unbounded queue. Content
#: benchmark, cold renders at 64 in flight: 879 calls/s, p99 119 ms with 32
#: against 834 calls/s, p99 131 ms with 4.
MAX_WAITING: Final = 32
#: A worker that has not answered a request this many times its limit after
#: it was sent (and at least _MIN_OVERDUE_S) is stuck: it is killed and replaced.
_OVERDUE_FACTOR: Final = 4.0
_MIN_OVERDUE_S: Final = 1.0
#: Delay before restarting a worker that died without doing any work, doubled
#: for each further such death in a row, up to the cap (one that dies at start
#: must not be started again and again).
_RESTART_BASE_S: Final = 0.5
_RESTART_MAX_S: Final = 60.0
#: A worker that answered a render, or lived this long, was healthy: its death
#: restarts the backoff.
_HEALTHY_AFTER_S: Final = 60.0
#: What a worker's render is assumed to take before one has been timed.
_FIRST_SERVICE_S: Final = 0.002
#: Weight of the latest render in the running estimate of a worker's render time.
_SERVICE_WEIGHT: Final = 0.1
#: How often the cores this process may run on are read again.
_CORES_RECHECK_S: Final = 1.0


def cores_allowed() -> int:
    """The cores this process may run on now (its CPU affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity on this platform
        return os.cpu_count() or 1


class Renderable(Protocol):
    def render(self, context: Mapping[str, Any]) -> Any: ...


class WorkerGoneError(Exception):
    """The worker process ended before it answered."""


class RenderPool:
    """``processes`` worker processes; 0 renders on the event loop, as before.

    ``await pool.start()`` once on the running loop, ``await pool.render(template,
    context, timeout_s=...)`` per email, ``await pool.aclose()`` at shutdown."""

    def __init__(
        self,
        processes: int,
        *,
        argv: tuple[str, ...] = _WORKER_ARGV,
        cores: Callable[[], int] = cores_allowed,
    ) -> None:
        self.processes = processes
        self._argv = argv
        self._cores = cores
        #: The cores last read, and when to read them again.
        self._cores_seen = 0
        self._cores_read_at = -math.inf
        self._workers: list[_Worker | None] = [None] * processes
        #: Deaths in a row of each slot's workers without useful work.
        self._failures = [0] * processes
        self._restarts: dict[int, asyncio.TimerHandle] = {}
        self._spawning: set[asyncio.Task[None]] = set()
        self._closed = False
        #: A running estimate of one render's time in a worker: a request that
        #: would wait behind more than its time limit is rendered here at once.
        self._service_s = _FIRST_SERVICE_S

    async def start(self) -> None:
        """Starts every worker and waits until each has imported what it needs
        (a few hundred ms of CPU that would otherwise compete with the server's
        first calls). A worker not ready in time is left to finish starting;
        emails are rendered in the server meanwhile."""
        for slot in range(self.processes):
            await self._spawn(slot)
        workers = [w for w in self._workers if w is not None]
        try:
            async with asyncio.timeout(_START_TIMEOUT_S):
                await asyncio.gather(*(asyncio.shield(w.ready) for w in workers))
        except TimeoutError:
            log.warning(
                "render workers not ready after %.0f s; rendering in the server meanwhile", _START_TIMEOUT_S
            )
        except WorkerGoneError:
            log.warning("a render worker ended while starting; rendering in the server meanwhile")

    async def render(
        self,
        template: Renderable,
        context: Mapping[str, Any],
        *,
        timeout_s: float | None = None,
    ) -> RenderedEmail:
        """The email, from a worker if one answers within ``timeout_s`` (default
        DEFAULT_TIMEOUT_S), else rendered here."""
        if not self.processes or self._closed or not isinstance(template, Template):
            return template.render(context)  # type: ignore[no-any-return]
        if self._one_core():  # a worker would only take the event loop's core
            return template.render(context)
        limit = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
        if limit <= 0:  # no time to wait for anyone
            return template.render(context)
        worker = self._least_busy()
        if worker is None:  # none is ready (starting, restarting) or all are behind
            return template.render(context)
        ahead = worker.waiting
        if (ahead + 1) * self._service_s > limit:
            return template.render(context)  # its queue cannot be got through in time
        try:
            request = pickle.dumps(
                (str(template.path), template.version, dict(context)), protocol=pickle.HIGHEST_PROTOCOL
            )
        except (pickle.PicklingError, TypeError, AttributeError):
            return template.render(context)
        answer = worker.ask(request)
        number = worker.asked
        sent = time.monotonic()
        try:
            async with asyncio.timeout(limit):
                # a timeout cancels `answer`: its late reply is read and dropped
                reply = await answer
            # this render and the ones ahead of it: one render's share
            service = (time.monotonic() - sent) / (ahead + 1)
            self._service_s += _SERVICE_WEIGHT * (service - self._service_s)
        except TimeoutError:
            # it took at least this long: the estimate grows, so later calls skip the queue
            self._service_s += _SERVICE_WEIGHT * (limit / (ahead + 1) - self._service_s)
            worker.kill_unless_answered(number, max(limit * _OVERDUE_FACTOR, _MIN_OVERDUE_S))
            return template.render(context)
        except WorkerGoneError:
            return template.render(context)  # its death was logged when it happened
        email, records = pickle.loads(reply)  # noqa: S301 (our own worker's pipe)
        for name, level, message in records:
            logging.getLogger(name).log(level, "%s", message)
        if email is None:  # the worker could not render this version
            return template.render(context)
        assert isinstance(email, RenderedEmail)
        return email

    def _one_core(self) -> bool:
        now = time.monotonic()
        if now >= self._cores_read_at + _CORES_RECHECK_S:
            self._cores_read_at = now
            self._cores_seen = self._cores()
        return self._cores_seen <= 1

    def _least_busy(self) -> _Worker | None:
        """The ready worker with the fewest requests waiting, unless even it
        has MAX_WAITING; else None."""
        best: _Worker | None = None
        for worker in self._workers:
            if worker is None or not worker.alive or not worker.ready.done():
                continue
            if best is None or worker.waiting < best.waiting:
                best = worker
        if best is None or best.waiting >= MAX_WAITING:
            return None
        return best

    async def _spawn(self, slot: int) -> None:
        """Starts the slot's worker; a failure to start is logged and retried later."""
        loop = asyncio.get_running_loop()
        try:
            await loop.subprocess_exec(
                lambda: self._new_worker(slot),
                *self._argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=None,
            )
        except OSError as error:
            self._workers[slot] = None
            self._failures[slot] += 1
            delay = self._restart_delay(slot)
            log.warning(
                "cannot start render worker %d (%s); rendering in the server, trying again in %.1f s",
                slot,
                error,
                delay,
            )
            self._restart_later(slot, delay)
            return
        worker = self._workers[slot]
        if self._closed and worker is not None:  # closed while it was starting
            await worker.stop(_STOP_TIMEOUT_S)

    def _new_worker(self, slot: int) -> _Worker:
        # In the slot from the start: a worker that exits before
        # subprocess_exec returns is still seen, and replaced.
        worker = _Worker(on_exit=lambda w: self._exited(slot, w))
        self._workers[slot] = worker
        return worker

    def _exited(self, slot: int, worker: _Worker) -> None:
        if self._closed or self._workers[slot] is not worker:
            return  # stopped on purpose
        self._workers[slot] = None
        worker.close()
        healthy = worker.answered > 0 or time.monotonic() - worker.started_at >= _HEALTHY_AFTER_S
        self._failures[slot] = 0 if healthy else self._failures[slot] + 1
        delay = self._restart_delay(slot)
        log.warning(
            "render worker %d (pid %s) exited with code %s; rendering in the server, restarting it in %.1f s",
            slot,
            worker.pid,
            worker.returncode,
            delay,
        )
        self._restart_later(slot, delay)

    def _restart_delay(self, slot: int) -> float:
        failures = self._failures[slot]
        return 0.0 if not failures else min(_RESTART_BASE_S * 2 ** (failures - 1), _RESTART_MAX_S)

    def _restart_later(self, slot: int, delay: float) -> None:
        def restart() -> None:
            del self._restarts[slot]
            if self._closed:
                return
            task = asyncio.ensure_future(self._spawn(slot))
            self._spawning.add(task)
            task.add_done_callback(self._spawning.discard)

        self._restarts[slot] = asyncio.get_running_loop().call_later(delay, restart)

    async def aclose(self) -> None:
        """Ends every worker: end of input, then a kill for one that does not stop."""
        self._closed = True
        for handle in self._restarts.values():
            handle.cancel()
        self._restarts.clear()
        # a worker being started stops itself once started (see _spawn)
        await asyncio.gather(*self._spawning, return_exceptions=True)
        workers = [w for w in self._workers if w is not None]
        self._workers = [None] * self.processes
        await asyncio.gather(*(w.stop(_STOP_TIMEOUT_S) for w in workers))


class _Worker(asyncio.SubprocessProtocol):
    """One worker process: requests written to its stdin, answers read from its
    stdout in the same order."""

    def __init__(self, on_exit: Callable[[_Worker], None] | None = None) -> None:
        self._on_exit = on_exit
        self._transport: asyncio.SubprocessTransport | None = None
        self._requests: asyncio.WriteTransport | None = None
        self._buffer = bytearray()
        self._waiting: collections.deque[asyncio.Future[bytes]] = collections.deque()
        loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[None] = loop.create_future()
        #: Done when the worker has said it is ready (its first message).
        self.ready: asyncio.Future[None] = loop.create_future()
        self.alive = True
        self.started_at = time.monotonic()
        #: Requests sent and answers read, ever: request n is answered once answered >= n.
        self.asked = 0
        self.answered = 0
        self.pid: int | None = None

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def returncode(self) -> int | None:
        return self._transport.get_returncode() if self._transport is not None else None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's, hence casts, not checks
        self._transport = cast("asyncio.SubprocessTransport", transport)
        self._requests = cast("asyncio.WriteTransport", self._transport.get_pipe_transport(0))
        self.pid = self._transport.get_pid()

    def ask(self, request: bytes) -> asyncio.Future[bytes]:
        if not self.alive or self._requests is None:
            raise WorkerGoneError
        answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._requests.write(len(request).to_bytes(LENGTH_BYTES, "big") + request)
        self._waiting.append(answer)
        self.asked += 1
        return answer

    def kill_unless_answered(self, number: int, after_s: float) -> None:
        """Kills the worker if request ``number`` is still unanswered ``after_s`` from now."""

        def check() -> None:
            if self.alive and self.answered < number:
                log.warning(
                    "render worker (pid %s) is stuck: %.1f s without an answer; killing it", self.pid, after_s
                )
                self.kill()

        asyncio.get_running_loop().call_later(after_s, check)

    def kill(self) -> None:
        self._gone()
        if self._transport is not None:
            with contextlib.suppress(ProcessLookupError):
                self._transport.kill()

    def pipe_data_received(self, fd: int, data: bytes | bytearray) -> None:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= LENGTH_BYTES:
            size = int.from_bytes(buffer[:LENGTH_BYTES], "big")
            if size > MAX_FRAME_BYTES:
                log.error(
                    "render worker (pid %s) wrote %d bytes that are not an answer; killing it",
                    self.pid,
                    len(buffer),
                )
                buffer.clear()
                self.kill()
                return
            end = LENGTH_BYTES + size
            if len(buffer) < end:
                return
            answer = bytes(buffer[LENGTH_BYTES:end])
            del buffer[:end]
            if not self.ready.done():
                self.ready.set_result(None)  # the first message says the worker is ready
                continue
            self.answered += 1
            if not self._waiting:
                # asyncio may report the exit before the last output, and the
                # exit already failed every waiter: nobody waits for this one
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
        if self._on_exit is not None:
            self._on_exit(self)

    def _gone(self) -> None:
        self.alive = False
        if not self.ready.done():
            self.ready.set_exception(WorkerGoneError())
            self.ready.exception()  # retrieved: nobody need wait for it
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_exception(WorkerGoneError())

    def close(self) -> None:
        """Releases the transport of a worker that has exited."""
        if self._transport is not None:
            self._transport.close()

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
        self.close()


__all__ = ["DEFAULT_TIMEOUT_S", "MAX_WAITING", "RenderPool", "Renderable", "WorkerGoneError"]
