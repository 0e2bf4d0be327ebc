"""The interfaces the domain needs from the outside world, one per kind of data.

Backends (``sendtime.server.store.sqlite``, later others) implement them; the
domain, the dispatcher, the delivery API and the status page depend on these
and never import a backend. Only the server factory picks one.

- ``EventStore``: events and their de-duplication by message id;
- ``ProfileStore``: folded profiles, saved in batches with the event position they include;
- ``IdentityLinks``: which ids are one person (written by the event store
  with the events that carry them), read together with the profiles;
- ``CatalogStore``: catalog updates made through the API;
- ``DeliveryLedger``: one row per send and its state machine (see domain.sends);
- ``SuppressionList``: who gets no more marketing;
- ``ExitLog``: exit events, for the last check before relay;
- ``BroadcastStore``: segments, broadcasts and their rows in the ledger.

An ``EventStore`` plans flow sends for each commit through a ``SendPlanner``
(a pure domain step) inside the transaction that stores the events, so a
planned send is exactly as durable as its entry event, and tells a
``CommitListener`` of every commit, in commit order, before the appends return.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

import msgspec

from sendtime.server.domain.broadcasts import Broadcast, BroadcastState
from sendtime.server.domain.catalog import Product
from sendtime.server.domain.events import Event
from sendtime.server.domain.flows import PlannedExit, PlannedSend
from sendtime.server.domain.identity import IdLink
from sendtime.server.domain.profile import Profile
from sendtime.server.domain.segments import Segment
from sendtime.server.domain.sends import SendRecord, SendStatus

# -- events ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Appended:
    #: Per event: True if it was new, False if its message_id was seen before
    #: (then nothing of it was stored).
    is_new: list[bool]
    #: A mark in this process's commit order, for ``AfterCommit.settled``:
    #: the commit that made these events durable and every one before it are
    #: through once the listener has settled this mark. What it counts is the
    #: backend's: on SQLite the event log's position; on PostgreSQL this
    #: replica's own count of rounds that stored new events (not the shared
    #: events table's position, which other replicas' commits also advance).
    position: int
    #: Events that could not be stored (their index in the append, and why):
    #: their own write failed, alone, so nothing of them was kept. Their
    #: ``is_new`` is False.
    failed: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CommittedRound:
    """What one durable commit of appended events made true."""

    #: The events stored for the first time, in commit order.
    new_events: list[Event]
    #: Every event at or before this position is durable.
    position: int
    #: The earliest due time of the sends the round scheduled (None: none).
    earliest_due: datetime | None
    #: The touched profiles as the commit wrote them, for a backend that folds
    #: in the events' transaction (None: the profile book folds them).
    profiles: dict[str, Profile] | None = None


class CommitListener(Protocol):
    def committed(self, round_: CommittedRound) -> None:
        """Called on the event loop, in commit order, for every commit that
        stored new events, before any of its appends return."""
        ...

    def committed_elsewhere(self, profile_keys: Sequence[str], earliest_due: datetime | None) -> None:
        """Another replica committed events of these users (what is cached of
        them is stale), scheduling sends due from ``earliest_due``."""
        ...


class SendPlanner(Protocol):
    def plan(
        self, events: Sequence[Event], scheduled: Container[str]
    ) -> tuple[list[PlannedSend], list[PlannedExit]]:
        """The sends and exits ``events`` cause. Pure: the same events give the
        same plan. ``scheduled`` holds send keys known to exist already (a hint)."""
        ...


class EventStore(Protocol):
    async def append(self, events: Sequence[Event]) -> Appended:
        """Store ``events`` durably and exactly once, with the sends and exits
        they plan. Returns only once the new events are durable. Raises
        Overloaded when too much is queued, Unavailable when closing."""
        ...

    async def replay_track_events(
        self, names: Sequence[str], consume: Callable[[str, str, bytes], None]
    ) -> int:
        """Call ``consume(profile_key, name, properties)`` for every stored track
        event with one of ``names``, oldest first; returns how many. For start-up."""
        ...


# -- profiles ----------------------------------------------------------------


class ProfileStore(Protocol):
    #: True when the event store folds and writes profiles in the events'
    #: transaction (then saving is not the profile book's job: it never
    #: calls save_profiles, and there is nothing to replay).
    writes_profiles_with_events: bool

    async def load_profiles(self, keys: Sequence[str]) -> dict[str, Profile]: ...

    async def stage_profiles(self, rows: Sequence[tuple[str, bytes]]) -> None:
        """Write encoded profiles aside, not saved yet: the next ``save_profiles``
        saves them (before its own rows) with its position, atomically. Staged
        rows that no save followed (a crash) are dropped when the store opens."""
        ...

    async def save_profiles(self, rows: Sequence[tuple[str, bytes]], position: int) -> None:
        """Write the staged profiles, then encoded profiles ``rows``, and the
        event position they include, atomically."""
        ...

    async def profiles_position(self) -> int:
        """The event position the saved profiles include."""
        ...

    async def replay(self, after: int) -> tuple[list[Event], int]:
        """The stored events past ``after`` and the last position."""
        ...

    async def scan_profiles(self, after: str, limit: int) -> list[tuple[str, bytes]]:
        """Up to ``limit`` stored profiles (key, msgpack) with keys after
        ``after``, in key order: one page of a walk through every profile."""
        ...


# -- identity links ----------------------------------------------------------

#: How many keys one read follows links to. A person has a handful; an id
#: shared by very many (a shop's kiosk, a bot) stops there rather than pull
#: in thousands of strangers' profiles.
MAX_LINKED_KEYS = 200


@dataclass(frozen=True, slots=True)
class People:
    """What one read found for some profile keys."""

    #: The stored profiles of the keys asked for and of every key linked to them.
    profiles: dict[str, Profile]
    #: Every link reachable from the keys asked for (at most MAX_LINKED_KEYS
    #: keys are followed).
    links: list[IdLink]


class IdentityLinks(Protocol):
    """Links between ids (domain.identity). The event store writes the links
    an event carries (domain.identity.links_of) in the transaction that stores
    the event, so a link is exactly as durable as its event."""

    async def load_people(self, keys: Sequence[str]) -> People:
        """The links reachable from ``keys`` and the stored profiles of every
        key they reach, in one read: the first touch of an id costs what
        loading its profile alone did."""
        ...


# -- catalog -----------------------------------------------------------------


class CatalogStore(Protocol):
    async def save_products(self, products: Sequence[Product]) -> None:
        """Keep catalog updates across restarts."""
        ...

    async def load_products(self) -> list[Product]: ...


# -- the delivery ledger -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class DueSends:
    #: Claimed: now "sending", attempts counted.
    records: list[SendRecord]
    #: The earliest due time of the sends still scheduled (None: there are none).
    next_due: datetime | None


@dataclass(frozen=True, slots=True)
class LastChecks:
    """What must still hold when a send is handed to the ESP."""

    profile_key: str
    #: No exit event of this flow entry since its entry time (flow_id "": none to look for).
    flow_id: str
    entry_key: str
    entry_time: datetime
    #: None of ``subjects`` suppressed for ``group`` (no subjects: not checked).
    group: str
    subjects: Sequence[str]
    #: Fewer than ``cap_count`` marketing sends since ``cap_since`` (None: no cap).
    cap_since: datetime | None
    cap_count: int
    #: The send is still the claim that counted this attempt (0: not checked).
    #: A claim that outlived its lease may have been claimed again elsewhere.
    attempt: int = 0
    #: Every profile key of the person (domain.identity; empty: the send's
    #: alone): an exit under any of them ends the entry, and the cap counts
    #: the sends to all of them.
    person_keys: Sequence[str] = ()
    #: A send of the same flow and entry key to another of the person's keys,
    #: entered at or after this time and handed to the ESP, makes this one a
    #: duplicate (None: not looked for): one cart filled under two ids, one email.
    duplicate_since: datetime | None = None


@dataclass(frozen=True, slots=True)
class HandOver:
    #: The send is "relaying" now: the message may go to the ESP. When False
    #: and no check failed, the send was not "sending" any more: something
    #: else settled it (nothing in sendtime does while it renders).
    handed_over: bool
    exit_event: str | None = None
    suppressed: bool = False
    capped: bool = False
    #: Marketing sends since ``cap_since`` (counted for a send the cap stopped).
    sent: int = 0
    #: Another of the person's keys had this flow entry's email already.
    duplicate: bool = False


class DeliveryLedger(Protocol):
    async def schedule_send(self, planned: PlannedSend) -> SendRecord:
        """A send asked for through the API: scheduled once per key (asking
        again returns the first, whatever happened to it since)."""
        ...

    async def claim_due(self, now: datetime, limit: int) -> DueSends:
        """Mark up to ``limit`` due sends "sending" (durably, attempts counted)
        and return them, with the earliest due time of those still scheduled."""
        ...

    async def update_send(
        self,
        send_id: int,
        status: SendStatus,
        *,
        expect: SendStatus,
        reason: str = "",
        due_at: datetime | None = None,
        relay: str | None = None,
        esp_message_id: str | None = None,
        template_version: str | None = None,
        accepted_at: datetime | None = None,
        attempt: tuple[int, str, str] | None = None,
    ) -> bool:
        """Move a send from ``expect`` to ``status`` (False if it was not in
        ``expect`` any more, e.g. an exit cancelled it), with an attempt row
        (attempt number, outcome, detail)."""
        ...

    async def hand_over(
        self, send_id: int, *, relay: str, template_version: str, checks: LastChecks
    ) -> HandOver:
        """In one transaction: run ``checks`` (exits, suppressions, frequency
        cap) and, when none stops the send, move it from "sending" to
        "relaying". Exits and suppressions committed before are never missed."""
        ...

    async def recover_interrupted(
        self, *, relay_idempotent: bool, now: datetime | None = None
    ) -> tuple[int, int]:
        """After a crash: claimed sends never handed over go back to scheduled;
        those the ESP may have taken are retried only when it de-duplicates by
        our key, else marked uncertain. Returns (rescheduled, uncertain). A
        ledger shared by several processes recovers only the claims whose
        lease ran out by ``now``; one process's ledger, every claim."""
        ...

    async def get_send(
        self, *, send_id: int | None = None, send_key: str | None = None
    ) -> SendRecord | None: ...

    async def list_sends(
        self,
        *,
        profile_key: str | None = None,
        flow_id: str | None = None,
        limit: int = 50,
        before_id: int | None = None,
    ) -> list[SendRecord]:
        """Newest first; ``before_id`` pages on."""
        ...

    async def flow_counts(self) -> dict[str, dict[str, int]]:
        """Sends by flow id, then by status."""
        ...

    async def sent_since(self, profile_key: str, since: datetime) -> int:
        """Marketing sends to this profile key since ``since`` that count against
        frequency caps: accepted, or handed to the ESP and not yet answered."""
        ...


class SuppressionList(Protocol):
    async def suppress(self, subject: str, group: str, reason: str, source: str) -> bool:
        """Add a suppression (subject "u:<id>", "a:<id>" or "email:<address>";
        group a subscription group or "*"); False when it was already there."""
        ...

    async def is_suppressed(self, subjects: Sequence[str], group: str) -> bool: ...

    async def unsuppress(self, subject: str, group: str, reason: str) -> bool:
        """Lift a suppression given for ``reason`` (a resubscribe lifts an
        unsubscribe, never a bounce); False when there was none."""
        ...


class ExitLog(Protocol):
    async def exit_since(self, profile_key: str, flow_id: str, entry_key: str, since: datetime) -> str | None:
        """The name of an exit event of this flow entry at or after ``since``
        (None: there is none). Exits are written with the events that cause them."""
        ...


# -- segments and broadcasts -------------------------------------------------


class BroadcastStore(Protocol):
    async def save_segment(self, segment: Segment) -> None:
        """Add or replace the segment of that name."""
        ...

    async def get_segment(self, name: str) -> Segment | None: ...

    async def list_segments(self) -> list[Segment]: ...

    async def create_broadcast(self, broadcast: Broadcast) -> tuple[Broadcast, bool]:
        """Store ``broadcast`` unless one with its idempotency key exists:
        returns the stored one and whether it was made now."""
        ...

    async def get_broadcast(self, broadcast_id: str) -> Broadcast | None: ...

    async def list_broadcasts(self, *, active_only: bool = False, limit: int = 100) -> list[Broadcast]:
        """Newest first."""
        ...

    async def update_broadcast(self, broadcast: Broadcast, *, expect: Sequence[BroadcastState]) -> bool:
        """Write ``broadcast`` if its stored state is one of ``expect`` (False: it was not)."""
        ...

    async def change_broadcast(
        self, broadcast_id: str, change: Callable[[Broadcast], Broadcast | None]
    ) -> Broadcast | None:
        """Read the stored broadcast, and write what ``change`` makes of it,
        as one step no other writer comes between (``change`` is pure and
        quick: it may run in the store's writer thread). Returns what was
        written; None when ``change`` said None or there is no such broadcast."""
        ...

    async def add_recipients(self, sends: Sequence[PlannedSend]) -> int:
        """Schedule a broadcast's sends (one per key: those already there are
        left as they are); returns how many are new."""
        ...

    async def park_sends(self, flow_id: str, parked_at: datetime) -> int:
        """Make the scheduled sends of ``flow_id`` due at ``parked_at`` (never, in practice)."""
        ...

    async def parked_sends(self, flow_id: str, parked_at: datetime) -> list[tuple[int, datetime]]:
        """The parked sends: (send id, entry time)."""
        ...

    async def reschedule_sends(self, due: Sequence[tuple[int, datetime]]) -> int:
        """Set the due time of scheduled sends (send id, due at)."""
        ...

    async def settle_remaining(self, flow_id: str, status: SendStatus, reason: str) -> int:
        """Move every scheduled send of ``flow_id`` to ``status``; returns how many."""
        ...

    async def send_counts(self, flow_id: str) -> dict[tuple[str, str], int]:
        """The sends of ``flow_id`` by (status, reason)."""
        ...


# -- one backend -------------------------------------------------------------


class StoreStats(msgspec.Struct, frozen=True):
    commits: int
    """Rounds of appended events committed."""
    events: int
    """Events written (duplicates included: the INSERT skips them)."""
    queued_events: int
    """Events handed to the writer and not yet durable."""
    scheduled: dict[str, int]
    """Sends scheduled, by flow id ("" for sends asked for through the API)."""
    cancelled: dict[str, int]
    """Scheduled sends cancelled by an exit event as it was stored, by flow id."""


class Storage(Protocol):
    """One opened backend: a port per kind of data. The event store is made
    last, once its planner and commit listener exist (they need the others)."""

    @property
    def profiles(self) -> ProfileStore: ...
    @property
    def links(self) -> IdentityLinks: ...
    @property
    def catalog(self) -> CatalogStore: ...
    @property
    def ledger(self) -> DeliveryLedger: ...
    @property
    def suppressions(self) -> SuppressionList: ...
    @property
    def exits(self) -> ExitLog: ...
    @property
    def broadcasts(self) -> BroadcastStore: ...

    def event_store(self, planner: SendPlanner, listener: CommitListener) -> EventStore:
        """The event store (at most one per backend)."""
        ...

    def stats(self) -> StoreStats: ...

    async def close(self) -> None:
        """Commit everything handed over so far, then close."""
        ...
