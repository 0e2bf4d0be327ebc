"""Screenshots of rendered emails with a headless Chromium, for ``sendtime preview``."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Final

from sendtime.cli._output import CommandError

CHROMIUM_NAMES: Final = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_INSTALL_HINT: Final = (
    "install Chromium (Debian: apt-get install chromium) or give its path with --chromium PATH"
)
#: Flags for a quiet, throwaway headless Chromium: no sandbox (it refuses to
#: run as root with one), no GPU, and no calls home while it renders.
CHROMIUM_FLAGS: Final = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"


def find_chromium(given: str | None) -> str:
    if given is not None:
        found = shutil.which(given)
        if found is None:
            raise CommandError(f"--chromium {given}: not an executable program; {CHROMIUM_INSTALL_HINT}")
        return found
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found is not None:
            return found
    raise CommandError(
        f"no Chromium on PATH (looked for {', '.join(CHROMIUM_NAMES)}); {CHROMIUM_INSTALL_HINT}"
    )


def screenshot(chromium: str, html: str, png: Path, width: int, height: int, timeout: float) -> None:
    """Screenshot ``html`` into ``png`` with a fresh, throwaway Chromium profile."""
    target = png.resolve()
    with tempfile.TemporaryDirectory(prefix="sendtime-preview-") as scratch:
        folder = Path(scratch)
        page = folder / "email.html"
        page.write_text(html, encoding="utf-8")
        log_path = folder / "chromium.log"
        command = [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={folder / 'profile'}",
            f"--window-size={width},{height}",
            f"--screenshot={target}",
            page.as_uri(),
        ]
        target.unlink(missing_ok=True)  # so a stale file cannot pass for this screenshot
        # Output to a file, not a pipe: Chromium's helpers may outlive it and
        # hold a pipe open. Its own session, so a timeout can end all of them.
        with log_path.open("wb") as log:
            process = subprocess.Popen(  # noqa: S603 - the executable is the user's choice
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
            try:
                code = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                code = None
            finally:
                _end_group(process)
        if code is None:
            raise CommandError(f"Chromium took longer than {timeout:g} s (see --chromium-timeout)")
        problem = ""
        if code != 0:
            problem = f"Chromium exited with status {code}"
        elif not target.is_file() or not target.read_bytes().startswith(PNG_SIGNATURE):
            problem = "Chromium wrote no PNG"
        if problem:
            tail = _tail(log_path.read_text(errors="replace"), 8)
            raise CommandError(f"{problem}; its last output:\n{tail}" if tail else problem)


def _end_group(process: subprocess.Popen[bytes]) -> None:
    """Kill what is left of the Chromium we started (its session's process group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _tail(text: str, count: int) -> str:
    return "\n".join(f"  {line}" for line in text.strip().splitlines()[-count:])
