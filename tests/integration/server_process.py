"""Run `sendtime serve` as a real child process, for tests that kill or signal it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks.harness import rss_mib

READY = re.compile(rb"sendtime serving gRPC on [\d.]+:(?P<grpc>\d+), HTTP on https?://[\d.]+:(?P<http>\d+)")


@dataclass
class ServerProcess:
    process: asyncio.subprocess.Process
    grpc_port: int
    http_port: int
    stderr: str = ""

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    async def wait(self, timeout: float = 30.0) -> int:
        """Wait for the exit, reading the pipes to their end (kept in .stderr)."""
        _, stderr = await asyncio.wait_for(self.process.communicate(), timeout)
        self.stderr = stderr.decode()
        assert self.process.returncode is not None
        return self.process.returncode


async def start_server(
    data_dir: Path | None,
    *,
    grpc_port: int = 0,
    http_port: int = 0,
    config: Path | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> ServerProcess:
    """``data_dir`` None: the settings' own (a relative one under ``cwd``)."""
    environ = {
        **os.environ,
        "SENDTIME_GRPC__PORT": str(grpc_port),
        "SENDTIME_HTTP__PORT": str(http_port),
        "SENDTIME_SHUTDOWN_GRACE_S": "5",
        **(env or {}),
    }
    if data_dir is not None:
        environ["SENDTIME_STORAGE__DATA_DIR"] = str(data_dir)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sendtime.server",
        "serve",
        *(["--config", str(config)] if config is not None else []),
        env=environ,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 30)
    match = READY.search(line)
    if match is None:
        process.kill()
        stderr = (await process.stderr.read()).decode() if process.stderr else ""
        raise RuntimeError(f"sendtime did not start: {line!r} {stderr}")
    return ServerProcess(process, int(match["grpc"]), int(match["http"]))


@dataclass
class ChildServer:
    """A ``sendtime serve`` child process for synchronous tests (hypothesis
    drives them): a crash fails the test that caused it, not the whole run."""

    process: subprocess.Popen[bytes]
    grpc_port: int
    http_port: int

    def alive(self) -> bool:
        return self.process.poll() is None

    def rss_mib(self) -> float:
        """Resident memory of the server and its render workers."""
        return rss_mib(self.process.pid)


@contextmanager
def child_server(data_dir: Path, *, config: Path | None = None) -> Iterator[ChildServer]:
    env = {
        **os.environ,
        "SENDTIME_GRPC__PORT": "0",
        "SENDTIME_HTTP__PORT": "0",
        "SENDTIME_STORAGE__DATA_DIR": str(data_dir),
        "SENDTIME_SHUTDOWN_GRACE_S": "5",
        "SENDTIME_LOG_LEVEL": "WARNING",
    }
    with subprocess.Popen(  # leaving the block closes the pipe and reaps the process
        [sys.executable, "-m", "sendtime.server", "serve", *(["--config", str(config)] if config else [])],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    ) as process:
        assert process.stdout is not None
        match = READY.search(process.stdout.readline())
        if match is None:
            process.kill()
            raise AssertionError("sendtime did not start")
        try:
            yield ChildServer(process, int(match["grpc"]), int(match["http"]))
        finally:
            process.terminate()
            process.wait(30)


class Result(NamedTuple):
    """A ``sendtime`` command's exit code and output."""

    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    def error(self) -> Any:
        """With --json, an error is one JSON object on stderr, and stdout is empty."""
        assert self.stdout == "", self.stdout
        return json.loads(self.stderr)


async def run_sendtime(
    *args: str,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    stdin: str | None = None,
    timeout: float = 90,
) -> Result:
    """``sendtime ARGS`` (the client's command) in ``cwd``, with none of the
    caller's SENDTIME_* settings but ``env``'s, and ``stdin`` as its input."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SENDTIME_")} | dict(env or {})
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sendtime.cli",
        *args,
        env=environ,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(None if stdin is None else stdin.encode()), timeout)
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())
