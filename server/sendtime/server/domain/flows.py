"""Triggered flows: which events schedule a send, and which cancel one.

``FlowPlanner.plan`` is a pure function of a batch of newly stored events: the
store runs it inside the transaction that stores them, so a scheduled send or
a cancellation is exactly as durable as the event that caused it, and a
restart can neither lose nor repeat one.

One idempotency key per send, ``send_key(flow, step, user, entry key)``: the
store keeps one send per key, which is how re-entry rules hold (once per key;
once per period puts the period's number in the key) and how a duplicate
trigger can never become a second email.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import msgspec

from sendtime.server.domain.events import Event, EventKind

_OBJECT: Final = msgspec.json.Decoder(dict[str, Any])
#: Exit rows for "any exit event" use this entry key.
ANY_ENTRY: Final = "*"
#: The entry key of flows keyed by the user alone.
USER_ENTRY: Final = "user"
_MAX_MEMOISED_KEYS: Final = 200_000
_EARLIEST: Final = datetime.min.replace(tzinfo=UTC)
_LATEST: Final = datetime.max.replace(tzinfo=UTC)


class ExitOn(enum.StrEnum):
    #: The exit event's property named by the flow's entry_key equals the entry's key.
    SAME_KEY = "same_key"
    #: Any exit event after the entry.
    ANY = "any"


class Reentry(enum.StrEnum):
    ONCE_PER_KEY = "once_per_key"
    ONCE_PER_PERIOD = "once_per_period"


@dataclass(frozen=True, slots=True)
class Flow:
    id: str
    template: str
    entry_event: str
    #: Property equals value, all of them, for an event to enter.
    entry_filter: Mapping[str, Any]
    #: The entry event's property that keys the send (e.g. cart_id); "" keys
    #: it by the user alone (one per user, or per user per period).
    entry_key: str
    delay: timedelta
    exit_events: tuple[str, ...]
    exit_on: ExitOn
    reentry: Reentry
    reentry_period: timedelta
    #: "" for transactional sends (no consent, caps or suppression by group).
    subscription_group: str
    sender: str
    reply_to: str = ""
    #: Blocks that must have data, else the send is skipped.
    require_blocks: tuple[str, ...] = ()
    #: An entry event older than this on arrival enters nothing (None: no limit).
    max_entry_age: timedelta | None = None

    @property
    def transactional(self) -> bool:
        return not self.subscription_group


class PlannedSend(msgspec.Struct, gc=False, frozen=True, kw_only=True):
    # A Struct, not a dataclass: the planner builds one per entering event, and
    # a frozen dataclass pays an object.__setattr__ per field to be built.
    # gc=False, like events: plain values, never part of a reference cycle.
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
    subscription_group: str


class PlannedExit(msgspec.Struct, gc=False, frozen=True, kw_only=True):
    profile_key: str
    flow_id: str
    #: ANY_ENTRY when the exit applies to every entry of the flow.
    entry_key: str
    event_time: datetime
    event_name: str


def send_key(flow_id: str, step: int, profile_key: str, entry_key: str) -> str:
    """The idempotency key of one send: the same inputs always give the same key."""
    raw = f"{flow_id}\x1f{step}\x1f{profile_key}\x1f{entry_key}".encode()
    return "snd_" + hashlib.sha256(raw).hexdigest()[:32]


class FlowPlanner:
    def __init__(self, flows: Sequence[Flow]) -> None:
        self.flows = tuple(flows)
        self._by_entry: dict[str, list[Flow]] = {}
        self._by_exit: dict[str, list[Flow]] = {}
        for flow in self.flows:
            self._by_entry.setdefault(flow.entry_event, []).append(flow)
            for name in flow.exit_events:
                self._by_exit.setdefault(name, []).append(flow)
        # Most entries repeat a key already planned (every view of a browse week,
        # every add to one cart): remember the keys made rather than hash again.
        self._send_keys: dict[tuple[str, str, str], str] = {}

    def plan(
        self, events: Sequence[Event], scheduled: Container[str] = frozenset()
    ) -> tuple[list[PlannedSend], list[PlannedExit]]:
        """The sends and exits ``events`` cause, in event order. ``scheduled``:
        send keys known to be in the ledger already; an entry on one of them
        changes nothing (one send per key), so it is not planned again."""
        sends: list[PlannedSend] = []
        exits: list[PlannedExit] = []
        for event in events:
            if event.kind is not EventKind.TRACK:
                continue
            entering = self._by_entry.get(event.name)
            exiting = self._by_exit.get(event.name)
            if entering is None and exiting is None:
                continue  # the common case: nothing to look at
            properties = _Properties(event)
            for flow in entering or ():
                planned = _entry(flow, event, properties, scheduled, self._send_key)
                if planned is not None:
                    sends.append(planned)
            exits.extend(_exit(flow, event, properties) for flow in exiting or ())
        return sends, exits

    def _send_key(self, flow_id: str, profile_key: str, entry_key: str) -> str:
        """``send_key`` of a flow's first step, memoised (bounded)."""
        known = self._send_keys.get((flow_id, profile_key, entry_key))
        if known is None:
            if len(self._send_keys) >= _MAX_MEMOISED_KEYS:
                self._send_keys.clear()
            known = self._send_keys[flow_id, profile_key, entry_key] = send_key(
                flow_id, 1, profile_key, entry_key
            )
        return known


class _Properties:
    """An event's properties, read from the typed payload validation already
    decoded where that gives the same value as the JSON would, and from the
    JSON (decoded at most once) only for the others.

    Ids and strings read the same either way; a float field does not (the JSON
    ``5`` is the payload's ``5.0``, which ``str`` spells differently), nor does
    a list of products, nor an unknown property (a payload keeps none)."""

    __slots__ = ("_decoded", "_event")

    def __init__(self, event: Event) -> None:
        self._event = event
        self._decoded: dict[str, Any] | None = None

    def get(self, name: str) -> Any:
        payload = self._event.payload
        if payload is not None and name in payload.__struct_fields__:
            value = getattr(payload, name)
            if value is None or (type(value) is str or type(value) is int):
                return value
        if self._decoded is None:
            self._decoded = _decode_properties(self._event)
        return self._decoded.get(name)


def _decode_properties(event: Event) -> dict[str, Any]:
    # validated at ingest (JSON, UTF-8, depth): never fails here. But this runs
    # inside the store's transaction, where raising would fail the events beside it.
    try:
        return _OBJECT.decode(event.properties or b"{}")
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return {}


def _entry(
    flow: Flow,
    event: Event,
    properties: _Properties,
    scheduled: Container[str],
    first_step_key: Callable[[str, str, str], str],
) -> PlannedSend | None:
    if flow.max_entry_age is not None and event.received_at - event.timestamp > flow.max_entry_age:
        return None  # history (an import, a replay): the moment for this email has passed
    if flow.entry_filter and any(properties.get(name) != value for name, value in flow.entry_filter.items()):
        return None
    if flow.entry_key:
        value = properties.get(flow.entry_key)
        if value is None or value == "":
            return None  # nothing to key the send by: e.g. a cart event with no cart_id
        entry_key = str(value)
    else:
        entry_key = USER_ENTRY
    key_part = entry_key
    if flow.reentry is Reentry.ONCE_PER_PERIOD:
        period = int(event.timestamp.timestamp() // flow.reentry_period.total_seconds())
        key_part = f"{entry_key}@{period}"
    profile_key = event.profile_key
    key = first_step_key(flow.id, profile_key, key_part)
    if key in scheduled:
        return None
    return PlannedSend(
        send_key=key,
        flow_id=flow.id,
        template_id=flow.template,
        profile_key=profile_key,
        user_id=event.identity.user_id,
        anonymous_id=event.identity.anonymous_id,
        entry_key=entry_key,
        entry_message_id=event.message_id,
        entry_time=event.timestamp,
        received_at=event.received_at,
        # from when the event happened, but never in the past of its arrival
        # by more than the delay (a late event still gets its reminder)
        due_at=_shifted(max(event.timestamp, _shifted(event.received_at, -flow.delay)), flow.delay),
        subscription_group=flow.subscription_group,
    )


def _shifted(moment: datetime, delta: timedelta) -> datetime:
    """``moment + delta``, held at the calendar's ends instead of raising
    OverflowError: the planner runs inside the store's transaction, where an
    exception would fail every event committed together with this one.
    (Validation refuses such times; this holds whatever reaches here anyway.)"""
    try:
        return moment + delta
    except OverflowError:
        return _LATEST if delta > timedelta(0) else _EARLIEST


def _exit(flow: Flow, event: Event, properties: _Properties) -> PlannedExit:
    entry_key = ANY_ENTRY
    if flow.exit_on is ExitOn.SAME_KEY and flow.entry_key:
        value = properties.get(flow.entry_key)
        entry_key = str(value) if value not in (None, "") else ANY_ENTRY
    return PlannedExit(
        profile_key=event.profile_key,
        flow_id=flow.id,
        entry_key=entry_key,
        event_time=event.timestamp,
        event_name=event.name,
    )
