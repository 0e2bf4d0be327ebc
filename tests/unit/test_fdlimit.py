"""The open-file limit is raised to hold the edges' connection bounds (in a
child process: the limit is the process's own)."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

CHILD = """
import resource, sys
from sendtime.server.fdlimit import fit_open_files, needed_open_files
from sendtime.server.settings import Settings
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
settings = Settings()
print(needed_open_files(settings), fit_open_files(settings), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


def test_a_low_soft_limit_is_raised_to_what_the_bounds_need() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 2000:
        pytest.skip(f"the hard open-file limit here is {hard}: nothing to raise to")
    result = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, check=True, timeout=60
    )
    needed, returned, in_force = map(int, result.stdout.split())
    assert needed == 512 + 256 + 512
    assert returned == in_force == needed
