"""The interfaces the domain needs from the outside world. Adapters in
sendtime.server.store implement them; the domain never imports an adapter."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from sendtime.server.domain.events import Event
from sendtime.server.domain.profile import Profile


@dataclass(frozen=True, slots=True)
class Appended:
    #: Per event: True if it was new, False if its message_id was seen before
    #: (then nothing of it was stored).
    is_new: list[bool]
    #: The store's position after the commit that made these events durable:
    #: every event at or before it is durable.
    position: int


class EventStore(Protocol):
    async def append(self, events: Sequence[Event]) -> Appended:
        """Store ``events`` durably and exactly once. Returns only once the new
        events are durable. Raises Overloaded when too much is queued."""
        ...


class ProfileStore(Protocol):
    async def load_profiles(self, keys: Sequence[str]) -> dict[str, Profile]: ...

    async def save_profiles(self, rows: Sequence[tuple[str, bytes]], position: int) -> None:
        """Write encoded profiles and the event position they include, atomically."""
        ...

    async def profiles_position(self) -> int:
        """The event position the saved profiles include."""
        ...

    async def replay(self, after: int) -> tuple[list[Event], int]:
        """The stored events past ``after`` and the last position."""
        ...
