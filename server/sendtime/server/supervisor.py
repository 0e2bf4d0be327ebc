"""``sendtime serve --workers N``: N server processes on one host, sharing the
gRPC and HTTP ports (SO_REUSEPORT: the kernel spreads connections over them),
so one host uses all its cores. The supervisor starts them, restarts one that
dies, and on SIGTERM/SIGINT stops them all gracefully.

Workers share nothing but the database, so this needs the PostgreSQL backend
(the SQLite file has one writer, in one process). Port 0 is resolved here
first, so that every worker binds the same free port: the supervisor keeps a
bound, non-listening SO_REUSEPORT socket on it (it takes no connections) so
that no other program takes the port while a worker restarts.

gRPC clients keep a connection open, and SO_REUSEPORT spreads connections,
not calls: a client should open several channels or balance per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Final

from sendtime.server.settings import Settings

log = logging.getLogger("sendtime.supervisor")

#: A worker that dies sooner than this after its start is restarted after a pause.
_QUICK_DEATH_S: Final = 5.0
_RESTART_PAUSE_S: Final = 1.0


class WorkersRefused(Exception):
    """--workers asked for with a backend that cannot share."""


def check_workers(settings: Settings, workers: int) -> None:
    if workers > 1 and settings.storage.backend != "postgres":
        raise WorkersRefused(
            f"--workers {workers} needs storage.backend = 'postgres': the SQLite backend keeps its data in"
            " one file with one writer, in one process. Run one process, or set storage.backend and"
            " storage.postgres_dsn (see README, 'Running several replicas')."
        )


def _reserve(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class Supervisor:
    def __init__(self, settings: Settings, workers: int, config: Path | None) -> None:
        self._settings = settings
        self._workers = workers
        self._config = config
        self._held = [
            _reserve(settings.grpc.host, settings.grpc.port),
            _reserve(settings.http.host, settings.http.port),
        ]
        self.grpc_port = self._held[0].getsockname()[1]
        self.http_port = self._held[1].getsockname()[1]
        self._stop = asyncio.Event()
        self._drains: set[asyncio.Task[None]] = set()
        self._processes: dict[int, asyncio.subprocess.Process] = {}

    def _argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "sendtime.server",
            "serve",
            *(["--config", str(self._config)] if self._config is not None else []),
        ]

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            "SENDTIME_SERVER__WORKERS": "1",
            "SENDTIME_GRPC__PORT": str(self.grpc_port),
            "SENDTIME_HTTP__PORT": str(self.http_port),
            "SENDTIME_GRPC__REUSE_PORT": "true",
            "SENDTIME_HTTP__REUSE_PORT": "true",
        }

    async def _start_worker(self, slot: int) -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            *self._argv(), env=self._env(), stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL
        )
        assert process.stdout is not None
        line = await process.stdout.readline()  # its ready line, or nothing if it failed
        if not line.startswith(b"sendtime serving"):
            await process.wait()
            raise RuntimeError(f"worker {slot} did not start (exit {process.returncode}); see its log above")
        drain = asyncio.create_task(_drain(process.stdout))
        self._drains.add(drain)
        drain.add_done_callback(self._drains.discard)
        self._processes[slot] = process
        return process

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        try:
            await asyncio.gather(*(self._start_worker(slot) for slot in range(self._workers)))
        except RuntimeError as exc:
            log.error("cannot start: %s", exc)
            await self._stop_all()
            return 1
        scheme = "https" if self._settings.http.tls else "http"
        pids = ",".join(str(p.pid) for p in self._processes.values())
        print(
            f"sendtime serving gRPC on {self._settings.grpc.host}:{self.grpc_port}, "
            f"HTTP on {scheme}://{self._settings.http.host}:{self.http_port}, "
            f"{self._workers} workers (pids {pids})",
            flush=True,
        )
        watchers = [asyncio.create_task(self._watch(slot)) for slot in range(self._workers)]
        await self._stop.wait()
        for watcher in watchers:
            watcher.cancel()
        await self._stop_all()
        for sock in self._held:
            sock.close()
        return 0

    async def _watch(self, slot: int) -> None:
        """Restart the worker in ``slot`` whenever it dies."""
        while not self._stop.is_set():
            process = self._processes[slot]
            started = time.monotonic()
            code = await process.wait()
            if self._stop.is_set():
                return
            log.error("worker %d (pid %d) exited with %s; restarting it", slot, process.pid, code)
            if time.monotonic() - started < _QUICK_DEATH_S:
                await asyncio.sleep(_RESTART_PAUSE_S)
            while not self._stop.is_set():
                try:
                    process = await self._start_worker(slot)
                except RuntimeError as exc:
                    log.error("%s; trying again", exc)
                    await asyncio.sleep(_RESTART_PAUSE_S)
                else:
                    print(f"sendtime worker {slot} restarted (pid {process.pid})", flush=True)
                    break

    async def _stop_all(self) -> None:
        grace = self._settings.shutdown_grace_s + 10.0
        for process in self._processes.values():
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        for process in self._processes.values():
            try:
                await asyncio.wait_for(process.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()


async def _drain(stream: asyncio.StreamReader) -> None:
    """Pass a worker's output on (and keep its pipe from filling)."""
    while line := await stream.readline():
        sys.stdout.buffer.write(line)
        sys.stdout.flush()


def supervise(settings: Settings, workers: int, config: Path | None) -> int:
    import uvloop

    return uvloop.run(Supervisor(settings, workers, config).run())
