"""Ingestion: validate a batch, store what is valid, answer per event.

Every edge (gRPC unary, gRPC stream, Segment HTTP, webhooks) goes through
``Ingestor.ingest``, so an event is judged the same way whichever door it came
through, and a bad event never sinks the good ones beside it.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sendtime.server.domain.errors import InvalidInput
from sendtime.server.domain.events import Event, IncomingEvent, validate
from sendtime.server.domain.ports import EventStore

log = logging.getLogger(__name__)


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


#: Told of every batch of newly stored events, after the commit and before the acks.
StoredListener = Callable[[Sequence[Event]], None]


class Ingestor:
    def __init__(
        self,
        store: EventStore,
        clock: Callable[[], datetime] = utc_now,
        listeners: Sequence[StoredListener] = (),
    ) -> None:
        self._store = store
        self._clock = clock
        self._listeners = tuple(listeners)

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
            is_new = await self._store.append(valid)
            stored = []
            for index, event, new in zip(positions, valid, is_new, strict=True):
                outcome = Outcome.ACCEPTED if new else Outcome.DUPLICATE
                acks[index] = Ack(index, event.message_id, outcome)
                if new:
                    stored.append(event)
            if stored:
                self._notify(stored)
        return [ack for ack in acks if ack is not None]

    def _notify(self, stored: list[Event]) -> None:
        for listener in self._listeners:
            try:
                listener(stored)
            except Exception:
                # The events are committed: their acks must go out whatever a
                # listener (a cache, a model) makes of them.
                log.exception("a listener failed on %d stored events", len(stored))
