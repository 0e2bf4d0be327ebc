"""How hard the property tests at the doors try: a few dozen examples each in
``make test`` (seconds), as many as FUZZ_EXAMPLES says in ``make fuzz``; and
how much the fuzzed server's memory may grow meanwhile."""

from __future__ import annotations

import os
from typing import Final

from hypothesis import HealthCheck, settings

#: How much more resident memory (the server and its render workers) the
#: server may hold after the fuzzing than after its first answers, in MiB:
#: bounded caches and pools fill, and nothing a request leaves behind adds up.
RSS_GROWTH_BOUND_MIB: Final = 64.0


def door_settings(examples: int) -> settings:
    """``examples`` per test, or FUZZ_EXAMPLES when it is set (``make fuzz``)."""
    return settings(
        max_examples=int(os.environ.get("FUZZ_EXAMPLES", examples)),
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
        ],
    )
