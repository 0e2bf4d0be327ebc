"""How hard the property tests at the doors try: a few dozen examples each in
``make test`` (seconds), as many as FUZZ_EXAMPLES says in ``make fuzz``."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings


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
