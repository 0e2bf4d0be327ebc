"""Broadcasts: one template to a segment's users, each email made at its own send time.

A broadcast's life, one way:

    scheduled -> planning -> sending -> done
        |           |          |  ^
        |           |          v  |
        |           |        paused
        '-----------'----------'-----> cancelled

- *scheduled*: waiting for its start. A broadcast for "now" or a UTC instant
  starts then; one for a local time starts when that time first comes
  anywhere (UTC+14), so every user's moment is still ahead when it is planned.
- *planning*: the audience is resolved once, here, by streaming the stored
  profiles through the segment. Each recipient gets one row in the delivery
  ledger keyed by (broadcast, user) with its due time: a user who joins the
  segment later gets nothing from this broadcast. A crash while planning plans
  again at the next start (rows already written stay; the key keeps one per user).
- *sending*: the dispatcher sends the rows as they come due, with every check
  a flow's send has (consent, suppression, caps, quiet hours, unsubscribe),
  content fetched at each email's own send time.
- *paused*: the remaining rows are parked (due at ``PARKED``); resuming plans
  their times again from the resume, at the same rate and local times.
- *cancelled*: the remaining rows are cancelled; what was sent stays sent.

Everything here is pure: times, the schedule, the progress counts.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Final
from zoneinfo import ZoneInfo

import msgspec

from sendtime.server.domain.events import is_known_timezone
from sendtime.server.domain.flows import PlannedSend, send_key

#: Parked sends are due then: never, until resumed.
PARKED: Final = datetime(9000, 1, 1, tzinfo=UTC)
#: The ledger's flow id of a broadcast's sends starts with this.
FLOW_PREFIX: Final = "broadcast:"
#: The largest UTC offset there is (Kiribati): a local time comes first there.
_MAX_AHEAD: Final = timedelta(hours=14)


class BroadcastState(enum.StrEnum):
    SCHEDULED = "scheduled"
    PLANNING = "planning"
    SENDING = "sending"
    PAUSED = "paused"
    DONE = "done"
    CANCELLED = "cancelled"


ACTIVE_STATES: Final = frozenset(
    {BroadcastState.SCHEDULED, BroadcastState.PLANNING, BroadcastState.SENDING, BroadcastState.PAUSED}
)


class SendAtKind(enum.StrEnum):
    NOW = "now"
    #: One instant for everyone.
    INSTANT = "instant"
    #: A wall-clock time in each user's own time zone.
    LOCAL = "local"


class Broadcast(msgspec.Struct, kw_only=True):
    id: str
    idempotency_key: str
    name: str
    template_id: str
    segment: str
    #: The segment's expression when the broadcast was made (a later change
    #: of the segment does not change who this broadcast goes to).
    expression: str
    #: "" for a transactional broadcast (no consent, caps, quiet hours or suppression).
    subscription_group: str
    sender: str
    send_at_kind: SendAtKind
    #: NOW and INSTANT: when. LOCAL: None.
    send_at: datetime | None
    #: LOCAL: the wall-clock time, ISO without a zone ("2026-12-04T19:00").
    local_time: str = ""
    #: LOCAL: for users whose time zone is unknown.
    fallback_zone: str = "UTC"
    #: Emails per second at most (0: as fast as the dispatcher goes).
    rate_per_s: float = 0.0
    #: Sends not made by then are skipped (None: no end).
    end_at: datetime | None = None
    require_blocks: tuple[str, ...] = ()
    state: BroadcastState = BroadcastState.SCHEDULED
    created_at: datetime
    started_at: datetime | None = None
    planned_at: datetime | None = None
    paused_at: datetime | None = None
    finished_at: datetime | None = None
    #: Users in the segment when it started, and profiles the segment erred on.
    audience: int = 0
    segment_errors: int = 0
    #: Why it was cancelled or could not be planned.
    reason: str = ""
    #: While it is planned: the replica planning it, and until when that
    #: replica holds it unless it renews the hold (see ``planning_held``).
    planner: str = ""
    plan_held_until: datetime | None = None

    @property
    def flow_id(self) -> str:
        return FLOW_PREFIX + self.id

    @property
    def transactional(self) -> bool:
        return not self.subscription_group

    def start_at(self) -> datetime:
        """When its audience is resolved and its sends planned."""
        if self.send_at is not None:
            return self.send_at
        return _local_naive(self.local_time).replace(tzinfo=UTC) - _MAX_AHEAD

    def base_time(self, timezone: str, planned_at: datetime) -> datetime:
        """A recipient's moment before any rate limit: the send time, or the
        local time in their zone (their fallback when unknown); never before
        ``planned_at`` (a zone whose moment has passed gets it at once)."""
        if self.send_at_kind is SendAtKind.LOCAL:
            zone = timezone if timezone and is_known_timezone(timezone) else self.fallback_zone
            at = _in_zone(self.local_time, zone)
        else:
            at = self.send_at or planned_at
        return max(at, planned_at)


@lru_cache(maxsize=1024)
def _in_zone(local_time: str, zone: str) -> datetime:
    return _local_naive(local_time).replace(tzinfo=ZoneInfo(zone)).astimezone(UTC)


def _local_naive(local_time: str) -> datetime:
    return datetime.fromisoformat(local_time).replace(tzinfo=None)


def broadcast_id(idempotency_key: str) -> str:
    """The same key always names the same broadcast."""
    return "bc_" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:20]


def recipient_send_key(broadcast: Broadcast, profile_key: str) -> str:
    """One ledger row per (broadcast, user)."""
    return send_key(broadcast.flow_id, 1, profile_key, "broadcast")


def paced(base_times: Sequence[datetime], rate_per_s: float) -> list[datetime]:
    """Due times for recipients in order of ``base_times`` (sorted): each at
    its own moment, but at most ``rate_per_s`` per second overall."""
    if rate_per_s <= 0:
        return list(base_times)
    gap = timedelta(seconds=1 / rate_per_s)
    due: list[datetime] = []
    last: datetime | None = None
    for base in base_times:
        at = base if last is None or base >= last + gap else last + gap
        due.append(at)
        last = at
    return due


@dataclass(frozen=True, slots=True)
class PlannedRecipient:
    profile_key: str
    user_id: str
    anonymous_id: str
    base: datetime


def plan_sends(
    broadcast: Broadcast, recipients: Iterable[PlannedRecipient], now: datetime
) -> list[PlannedSend]:
    """The ledger rows of ``recipients``, due by their own moment and the rate."""
    ordered = sorted(recipients, key=lambda r: (r.base, r.profile_key))
    return ledger_rows(broadcast, ordered, paced([r.base for r in ordered], broadcast.rate_per_s), now)


def ledger_rows(
    broadcast: Broadcast, ordered: Sequence[PlannedRecipient], due: Sequence[datetime], now: datetime
) -> list[PlannedSend]:
    """The ledger rows of recipients already ordered and paced."""
    return [
        PlannedSend(
            send_key=recipient_send_key(broadcast, r.profile_key),
            flow_id=broadcast.flow_id,
            template_id=broadcast.template_id,
            profile_key=r.profile_key,
            user_id=r.user_id,
            anonymous_id=r.anonymous_id,
            entry_key="broadcast",
            entry_message_id=broadcast.id,
            # the recipient's own moment: resuming after a pause plans from it again
            entry_time=r.base,
            received_at=now,
            due_at=at,
            subscription_group=broadcast.subscription_group,
        )
        for r, at in zip(ordered, due, strict=True)
    ]


def replanned(
    broadcast: Broadcast, remaining: Sequence[tuple[int, datetime]], resumed_at: datetime
) -> list[tuple[int, datetime]]:
    """New due times for the parked sends (id, own moment) of a resumed broadcast."""
    ordered = sorted(remaining, key=lambda r: (max(r[1], resumed_at), r[0]))
    due = paced([max(moment, resumed_at) for _, moment in ordered], broadcast.rate_per_s)
    return [(send_id, at) for (send_id, _), at in zip(ordered, due, strict=True)]


# -- progress ------------------------------------------------------------------

#: Skip reasons as the dispatcher words them, by the start of the text.
_SKIP_CLASSES: Final = (
    ("the profile has no email", "no_email"),
    ("opted out", "opted_out"),
    ("no opt-in", "opted_out"),
    ("suppressed", "suppressed"),
    ("frequency cap", "capped"),
    ("quiet hours", "quiet_hours"),
    ("nothing to show", "missing_block"),
    ("cannot address", "bad_address"),
    ("past the broadcast's end", "ended"),
)
SKIP_REASONS: Final = ("no_email", "opted_out", "suppressed", "capped", "quiet_hours", "missing_block",
                       "bad_address", "ended", "other")  # fmt: skip


def skip_reason(reason: str) -> str:
    for start, name in _SKIP_CLASSES:
        if reason.startswith(start):
            return name
    return "other"


@dataclass(slots=True)
class Progress:
    audience: int = 0
    #: Rows in the ledger (one per recipient planned so far).
    planned: int = 0
    #: Still to go: waiting for their time (parked ones included) or being sent.
    scheduled: int = 0
    in_flight: int = 0
    sent: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    failed: int = 0
    uncertain: int = 0
    cancelled: int = 0

    @property
    def settled(self) -> int:
        return self.sent + sum(self.skipped.values()) + self.failed + self.uncertain + self.cancelled

    @property
    def finished(self) -> bool:
        return self.scheduled == 0 and self.in_flight == 0


def progress(audience: int, counts: Mapping[tuple[str, str], int]) -> Progress:
    """Progress from the ledger's counts by (status, reason)."""
    result = Progress(audience=audience)
    for (status, reason), count in counts.items():
        result.planned += count
        if status == "scheduled":
            result.scheduled += count
        elif status in ("sending", "relaying"):
            result.in_flight += count
        elif status == "sent":
            result.sent += count
        elif status == "skipped":
            name = skip_reason(reason)
            result.skipped[name] = result.skipped.get(name, 0) + count
        elif status == "failed":
            result.failed += count
        elif status == "uncertain":
            result.uncertain += count
        elif status == "cancelled":
            result.cancelled += count
    return result


def planning_held(broadcast: Broadcast, *, holder: str, now: datetime, hold_s: float) -> Broadcast | None:
    """``broadcast`` held for planning by ``holder`` until ``hold_s`` from
    ``now``, or None when it may not be: a scheduled one begins its planning;
    one being planned is renewed for its holder, and taken over by another
    replica only once its holder stopped renewing (died). A pause or cancel
    while it is planned changes its state, not the hold. With replicas, this
    keeps one planner per broadcast (each would walk every profile and write
    every row again); one server alone holds for 0 s, so after a restart it
    plans again at once."""
    until = now + timedelta(seconds=hold_s)
    if broadcast.state is BroadcastState.SCHEDULED:
        return msgspec.structs.replace(
            broadcast,
            state=BroadcastState.PLANNING,
            started_at=broadcast.started_at or now,
            planner=holder,
            plan_held_until=until,
        )
    planning = broadcast.state is BroadcastState.PLANNING
    stopped = broadcast.state in (BroadcastState.PAUSED, BroadcastState.CANCELLED)
    if broadcast.planner == holder and broadcast.planned_at is None and (planning or stopped):
        return msgspec.structs.replace(broadcast, plan_held_until=until)
    lapsed = broadcast.plan_held_until is None or broadcast.plan_held_until <= now
    if planning and lapsed:
        return msgspec.structs.replace(broadcast, planner=holder, plan_held_until=until)
    return None
