"""What a segment worker process does as it starts (``SegmentEvaluator``'s
pool initializer): it must not outlive the server. A server killed with
SIGKILL cannot stop its workers, and a worker left behind would keep the
server's stdout and stderr open (a supervisor waiting for them would wait for
ever) and its memory. So the kernel kills it when the server dies (Linux's
PR_SET_PDEATHSIG), and elsewhere a thread watches for the server to go."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time
from typing import Final

_PR_SET_PDEATHSIG: Final = 1
_WATCH_EVERY_S: Final = 1.0


#: Below the server's priority: a segment walk is background work, and the
#: event loop's ingest and content calls must keep their latency beside it.
_NICENESS: Final = 10


def started(server_pid: int) -> None:
    with contextlib.suppress(OSError):
        os.nice(_NICENESS)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != server_pid:  # it died before the line above
        os._exit(1)
    threading.Thread(target=_watch, args=(server_pid,), name="server-watch", daemon=True).start()


def _watch(server_pid: int) -> None:
    while os.getppid() == server_pid:
        time.sleep(_WATCH_EVERY_S)
    os._exit(1)
