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
from typing import Protocol

import msgspec

from sendtime.server.domain.errors import InvalidInput, SendtimeError
from sendtime.server.domain.events import DEFAULT_WINDOW, Event, EventWindow, IncomingEvent, validate
from sendtime.server.domain.ports import EventStore


class Outcome(enum.Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


class Ack(msgspec.Struct, frozen=True):
    # A Struct, not a frozen dataclass: one is built per event, and a frozen
    # dataclass pays an object.__setattr__ per field. (Tracked by the garbage
    # collector, unlike events: an error's traceback can close a cycle.)
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


class Settled(Protocol):
    async def settled(self, position: int) -> None:
        """Returns once what follows the commits up to ``position`` is done
        (domain.commits.AfterCommit)."""
        ...


class IngestObserver(Protocol):
    """Told of every batch's outcome (metrics)."""

    def acked(self, acks: Sequence[Ack], stored: Sequence[Event], acked_at: datetime) -> None:
        """``stored``: the events stored for the first time, durable at ``acked_at``."""
        ...

    def refused(self, count: int, reason: str) -> None:
        """``count`` valid events refused whole (the store is overloaded or closing)."""
        ...


def utc_now() -> datetime:
    return datetime.now(UTC)


class Ingestor:
    def __init__(
        self,
        store: EventStore,
        after_commit: Settled,
        clock: Callable[[], datetime] = utc_now,
        observer: IngestObserver | None = None,
        window: EventWindow = DEFAULT_WINDOW,
    ) -> None:
        self._observer = observer
        self._window = window
        self._store = store
        self._after_commit = after_commit
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
                valid.append(validate(candidate, received_at, self._window))
            except InvalidInput as error:
                acks[index] = Ack(index, candidate.message_id, Outcome.REJECTED, error)
            else:
                positions.append(index)
        stored: list[Event] = []
        if valid:
            try:
                appended = await self._store.append(valid)
            except SendtimeError as error:
                if self._observer is not None:
                    self._observer.refused(len(valid), error.reason)
                raise
            # Read-your-writes: whoever reads after the ack sees the event.
            await self._after_commit.settled(appended.position)
            failed = appended.failed
            for offset, (index, event, new) in enumerate(zip(positions, valid, appended.is_new, strict=True)):
                if failed and offset in failed:
                    # Its own write failed, alone: nothing of it was stored.
                    unstored = InvalidInput(
                        f"the event could not be stored: {failed[offset]}", reason="NOT_STORABLE"
                    )
                    acks[index] = Ack(index, event.message_id, Outcome.REJECTED, unstored)
                elif new:
                    stored.append(event)
                    acks[index] = Ack(index, event.message_id, Outcome.ACCEPTED)
                else:
                    acks[index] = Ack(index, event.message_id, Outcome.DUPLICATE)
        done = [ack for ack in acks if ack is not None]
        if self._observer is not None:
            self._observer.acked(done, stored, self._clock())
        return done
