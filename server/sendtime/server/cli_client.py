"""Client commands of the ``sendtime`` CLI (track, identify, profile).
Placeholder: filled in with the Python client."""

from __future__ import annotations

from typing import Any


def add_commands(commands: Any) -> None:
    del commands
