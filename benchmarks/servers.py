"""Servers under test, each in a process of its own: started (on given cores
with ``taskset`` when asked), awaited until they print their ready line, and
stopped with SIGTERM (graceful)."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Final, Self

REPO: Final = Path(__file__).resolve().parent.parent

_SENDTIME_READY: Final = re.compile(
    r"sendtime serving gRPC on (?P<grpc>\S+):(?P<grpc_port>\d+), HTTP on (?P<http>https?://\S+:\d+),"
)


class ServerFailed(RuntimeError):
    pass


class ServerProcess:
    """``with ServerProcess(name, argv, ready=regex) as server:`` waits for the
    ready line; ``server.match`` holds its groups. The server's stderr goes to
    ``log_path``; its stdout after the ready line is drained and discarded."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        ready: re.Pattern[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        start_timeout_s: float = 30.0,
        cores: str | None = None,
    ) -> None:
        self.name = name
        #: taskset's core list the process (and what it starts) runs on; None: any
        self.cores = cores
        self._argv = ["taskset", "-c", cores, *argv] if cores is not None else list(argv)
        self._ready = ready
        self.log_path = log_path
        # the server is configured here only, not by SENDTIME_* settings of the caller's shell
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("SENDTIME_")}
        self._env = {**inherited, **(env or {})}
        self._start_timeout_s = start_timeout_s
        self._process: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.match: re.Match[str] | None = None
        self.exit_code: int | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def start(self) -> None:
        self._log = self.log_path.open("w")
        env = dict(self._env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), env.get("PYTHONPATH"))))
        self._process = subprocess.Popen(
            self._argv,
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=REPO,
            text=True,
        )
        assert self._process.stdout is not None
        threading.Thread(target=self._pump, args=(self._process.stdout,), daemon=True).start()
        deadline = time.monotonic() + self._start_timeout_s
        while self.match is None:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise ServerFailed(
                    f"{self.name} printed no ready line in {self._start_timeout_s:.0f} s"
                ) from None
            if line is None:
                self.stop()
                raise ServerFailed(f"{self.name} exited before it was ready:\n{self.log_tail()}")
            self.match = self._ready.search(line)

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            if self.match is None:
                self._lines.put(line)
        self._lines.put(None)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then wait; SIGKILL if it does not stop in time."""
        process = self._process
        if process is None:
            return 0
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.exit_code = process.returncode
        self._log.close()
        return process.returncode

    def kill(self) -> None:
        """SIGKILL: no drain, no last save (the soak's crash)."""
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        self.exit_code = process.returncode if process is not None else None
        self._log.close()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def sendtime_server(
    data_dir: Path,
    log_dir: Path,
    overrides: Mapping[str, str] | None = None,
    *,
    cores: str | None = None,
    start_timeout_s: float = 30.0,
    python_args: Sequence[str] = (),
) -> ServerProcess:
    """``sendtime serve`` as production runs it (uvloop, graceful SIGTERM), on free ports.
    ``python_args`` go before ``-m sendtime.server`` (``-m benchmarks.tracemem ... --``)."""
    env = {
        "SENDTIME_GRPC__HOST": "127.0.0.1",
        "SENDTIME_GRPC__PORT": "0",
        "SENDTIME_HTTP__HOST": "127.0.0.1",
        "SENDTIME_HTTP__PORT": "0",
        "SENDTIME_STORAGE__DATA_DIR": str(data_dir),
        "SENDTIME_LOG_LEVEL": "WARNING",
        **(overrides or {}),
    }
    return ServerProcess(
        "sendtime",
        [sys.executable, *python_args, "-m", "sendtime.server", "serve"],
        ready=_SENDTIME_READY,
        log_path=log_dir / "sendtime.log",
        env=env,
        cores=cores,
        start_timeout_s=start_timeout_s,
    )
