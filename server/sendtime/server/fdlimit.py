"""The process's open-file limit must hold both edges' connection bounds.

A common default soft limit is 1,024 descriptors: 1,100 connections then take
both edges down at once (accept fails for gRPC and HTTP alike). At start the
soft limit is raised, up to the hard limit, to what the bounds need; when the
hard limit is lower, a warning says which settings to lower.
"""

from __future__ import annotations

import logging
import resource
from typing import Final

from sendtime.server.settings import Settings

log = logging.getLogger("sendtime")

#: Descriptors beside client connections: the store's files, render workers'
#: pipes, upstream and relay connections, logs.
RESERVE: Final = 512


def needed_open_files(settings: Settings) -> int:
    return settings.http.max_connections + settings.grpc.max_connections + RESERVE


def fit_open_files(settings: Settings) -> int:
    """Raise the soft RLIMIT_NOFILE to what the settings need (within the hard
    limit); returns the limit in force."""
    needed = needed_open_files(settings)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft < needed:
        log.warning(
            "the open-file limit is %d, under the %d that http.max_connections (%d) and"
            " grpc.max_connections (%d) need with %d to spare: lower them or raise ulimit -n",
            soft,
            needed,
            settings.http.max_connections,
            settings.grpc.max_connections,
            RESERVE,
        )
    return soft
