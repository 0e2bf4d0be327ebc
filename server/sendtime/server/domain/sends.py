"""A send and its life: the delivery ledger's record, and the rules checked
right before one is relayed (consent, suppression, frequency cap, quiet hours).

Status moves one way:

    scheduled -> sending -> relaying -> sent
                    |           |-----> failed     (the ESP refused it for good)
                    |           |-----> uncertain  (crashed while the ESP had it; not resent)
                    |           '-----> scheduled  (transient failure: retried later)
                    '-----> cancelled | skipped | scheduled (held for quiet hours)

"relaying" is written, durably, right before the message is handed to the
ESP: a restart re-sends what was claimed but never handed over, and never what
might have reached the ESP, unless the ESP de-duplicates by our key.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

import msgspec

from sendtime.server.domain.events import is_known_timezone


class SendStatus(enum.StrEnum):
    SCHEDULED = "scheduled"
    SENDING = "sending"
    RELAYING = "relaying"
    SENT = "sent"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"
    UNCERTAIN = "uncertain"


class SendOutcome(enum.StrEnum):
    """What one go at a claimed send came to (metrics, logs, spans): a final
    status, or one of the two that schedule the send again later."""

    SENT = "sent"
    FAILED = "failed"
    UNCERTAIN = "uncertain"  # the ESP may have taken it: not resent
    SKIPPED = "skipped"
    CANCELLED = "cancelled"
    RETRY = "retry"  # a transient failure: scheduled again later
    HELD = "held"  # quiet hours or a paused broadcast: scheduled again later

    @classmethod
    def of(cls, status: SendStatus) -> SendOutcome:
        """The outcome of a send that ended in this final status."""
        return cls(status.value)


FINAL_STATUSES = frozenset(
    {SendStatus.SENT, SendStatus.FAILED, SendStatus.CANCELLED, SendStatus.SKIPPED, SendStatus.UNCERTAIN}
)


class SendRecord(msgspec.Struct, kw_only=True):
    id: int
    send_key: str
    flow_id: str
    template_id: str
    profile_key: str
    user_id: str
    anonymous_id: str
    entry_key: str
    entry_message_id: str
    entry_time: datetime
    received_at: datetime
    due_at: datetime
    status: SendStatus
    reason: str
    attempts: int
    relay: str
    esp_message_id: str
    template_version: str
    subscription_group: str
    created_at: datetime
    updated_at: datetime
    accepted_at: datetime | None

    @property
    def transactional(self) -> bool:
        return not self.subscription_group

    @property
    def latency(self) -> timedelta | None:
        """From the triggering event's arrival to the ESP's acceptance."""
        return self.accepted_at - self.received_at if self.accepted_at else None


@dataclass(frozen=True, slots=True)
class QuietHours:
    start: time
    end: time
    default_timezone: str
    #: True: hold the send until the quiet hours end; False: skip it.
    hold: bool

    def next_allowed(self, now: datetime, timezone: str | None) -> datetime | None:
        """None when ``now`` is outside the quiet hours in the user's time zone,
        else when they end."""
        zone = ZoneInfo(timezone if timezone and is_known_timezone(timezone) else self.default_timezone)
        local = now.astimezone(zone)
        clock = local.time()
        if self.start <= self.end:
            quiet = self.start <= clock < self.end
        else:  # across midnight, e.g. 21:00 to 08:00
            quiet = clock >= self.start or clock < self.end
        if not quiet:
            return None
        end = local.replace(hour=self.end.hour, minute=self.end.minute, second=0, microsecond=0)
        if end <= local:
            end += timedelta(days=1)
        return end.astimezone(now.tzinfo)


@dataclass(frozen=True, slots=True)
class FrequencyCap:
    count: int
    period: timedelta
