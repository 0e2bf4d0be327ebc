"""The interfaces the domain needs from the outside world. Adapters in
sendtime.server.store implement them; the domain never imports an adapter."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from sendtime.server.domain.events import Event
from sendtime.server.domain.profile import Profile


class EventStore(Protocol):
    async def append(self, events: Sequence[Event]) -> list[bool]:
        """Store ``events`` durably and fold them into their profiles, all in one
        transaction. Returns, per event, True if it was new and False if its
        message_id was seen before (then nothing of it was applied). Returns
        only once the new events are durable. Raises Overloaded when too much
        is queued."""
        ...

    async def get_profile(self, profile_key: str) -> Profile | None: ...

    async def close(self) -> None:
        """Finish what was handed in, then release the store."""
        ...
