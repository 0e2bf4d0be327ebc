"""Ingestion: validate a batch, store what is valid, answer per event.

Every edge (gRPC unary, gRPC stream, Segment HTTP, webhooks) goes through
``Ingestor.ingest``, so an event is judged the same way whichever door it came
through, and a bad event never sinks the good ones beside it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sendtime.server.domain.errors import InvalidInput
from sendtime.server.domain.events import Event, IncomingEvent, validate
from sendtime.server.domain.ports import EventStore
from sendtime.server.domain.profiles import ProfileBook


class Outcome(enum.Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class Ack:
    index: int
    message_id: str
    outcome: Outcome
    error: InvalidInput | None = None


@dataclass(frozen=True, slots=True)
class Undecodable:
    """An event the edge could not even decode (not JSON, wrong shape). It is
    rejected in its place, like any invalid event, without sinking the batch."""

    message_id: str
    error: InvalidInput


def utc_now() -> datetime:
    return datetime.now(UTC)


class Ingestor:
    def __init__(
        self, store: EventStore, profiles: ProfileBook, clock: Callable[[], datetime] = utc_now
    ) -> None:
        self._store = store
        self._profiles = profiles
        self._clock = clock

    async def ingest(self, incoming: Sequence[IncomingEvent | Undecodable]) -> list[Ack]:
        """One ack per event, in input order. Accepted and duplicate acks are
        returned only after the store made the batch durable."""
        received_at = self._clock()
        acks: list[Ack | None] = [None] * len(incoming)
        valid: list[Event] = []
        positions: list[int] = []
        for index, candidate in enumerate(incoming):
            if isinstance(candidate, Undecodable):
                acks[index] = Ack(index, candidate.message_id, Outcome.REJECTED, candidate.error)
                continue
            try:
                valid.append(validate(candidate, received_at))
            except InvalidInput as error:
                acks[index] = Ack(index, candidate.message_id, Outcome.REJECTED, error)
            else:
                positions.append(index)
        if valid:
            appended = await self._store.append(valid)
            # Read-your-writes: whoever reads after the ack sees the event.
            await self._profiles.wait_folded(appended.position)
            for index, event, new in zip(positions, valid, appended.is_new, strict=True):
                outcome = Outcome.ACCEPTED if new else Outcome.DUPLICATE
                acks[index] = Ack(index, event.message_id, outcome)
        return [ack for ack in acks if ack is not None]
