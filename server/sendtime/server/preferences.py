"""Email preferences: which subscription groups a recipient gets, and changing them.

The recipient opens the page from the link in any email (a signed token that
names them, like the unsubscribe link). The groups shown are the configured
flows' groups and any the profile holds a consent for. A change is an identify
event carrying the consent, ingested like any other: durable before the page
answers, folded by event time, visible in the profile API and obeyed by the
next send. Turning a group back on also lifts a one-click unsubscribe from it;
never a bounce or a complaint, which are about the address and are shown as
such.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime

from sendtime.server.domain.errors import InvalidInput, NotFound
from sendtime.server.domain.events import ConsentState, EventKind, IncomingEvent, TraitsUpdate
from sendtime.server.domain.ingest import Ingestor, Outcome, utc_now
from sendtime.server.domain.ports import SuppressionList
from sendtime.server.domain.profile import Profile
from sendtime.server.domain.profiles import ProfileBook
from sendtime.server.domain.unsubscribe import UnsubscribeTokens

#: The suppression reason a one-click unsubscribe records, and the one a
#: resubscribe may lift.
UNSUBSCRIBED = "unsubscribed"


@dataclass(frozen=True, slots=True)
class GroupState:
    group: str
    subscribed: bool
    #: Why not, for a group the recipient does not get; "" when subscribed.
    why_not: str = ""
    #: False when the recipient cannot turn it on here (their address bounced
    #: or complained: a matter for the address, not for a preference).
    changeable: bool = True


@dataclass(frozen=True, slots=True)
class PreferencesView:
    profile_key: str
    groups: tuple[GroupState, ...]


class Preferences:
    def __init__(
        self,
        *,
        tokens: UnsubscribeTokens,
        profiles: ProfileBook,
        suppressions: SuppressionList,
        ingestor: Ingestor,
        groups: Collection[str],
        require_opt_in: bool,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._tokens = tokens
        self._profiles = profiles
        self._suppressions = suppressions
        self._ingestor = ingestor
        self._groups = frozenset(g for g in groups if g)
        self._require_opt_in = require_opt_in
        self._clock = clock

    async def show(self, token: str) -> PreferencesView:
        """What the token's recipient gets; refuses forged, altered or expired tokens."""
        key = self._tokens.verify(token, self._clock()).profile_key
        profile = await self._profile(key)
        groups = sorted(self._groups | profile.consent.keys())
        email = profile.traits.get("email")
        address = f"email:{str(email.value).lower()}" if email is not None and email.value else ""
        states = [await self._state(key, address, group, profile) for group in groups]
        return PreferencesView(key, tuple(states))

    async def update(self, token: str, wanted: Mapping[str, bool]) -> PreferencesView:
        """Record the recipient's choice for each group in ``wanted``, durably, then show the result."""
        current = await self.show(token)
        known = {state.group: state for state in current.groups}
        for group in wanted:
            if group not in known:
                raise InvalidInput.field("group", f"{group!r} is not a subscription group of these emails")
        changes = {
            group: on
            for group, on in wanted.items()
            if known[group].changeable and known[group].subscribed != on
        }
        if changes:
            await self._record(current.profile_key, changes)
            for group, on in changes.items():
                if on:
                    await self._suppressions.unsuppress(current.profile_key, group, UNSUBSCRIBED)
        return await self.show(token)

    async def _profile(self, key: str) -> Profile:
        profile = await self._profiles.get(key)
        if profile is None:  # a token is only made for a profile that got an email
            raise NotFound("no profile for this link any more")
        return profile

    async def _state(self, key: str, address: str, group: str, profile: Profile) -> GroupState:
        consent = profile.consent.get(group)
        if address and await self._suppressions.is_suppressed([address], group):
            return GroupState(group, False, "your address bounced or was reported", changeable=False)
        if consent is not None and str(consent.value) == ConsentState.OPTED_OUT:
            return GroupState(group, False, "you turned it off")
        if await self._suppressions.is_suppressed([key], group):
            return GroupState(group, False, "you unsubscribed by a link in an email")
        if self._require_opt_in and consent is None:
            return GroupState(group, False, "you have not turned it on")
        return GroupState(group, True)

    async def _record(self, key: str, changes: Mapping[str, bool]) -> None:
        kind, _, ident = key.partition(":")
        event = IncomingEvent(
            # a fresh id: the same choice made again later is a new choice
            message_id=f"preferences:{uuid.uuid4()}",
            kind=EventKind.IDENTIFY,
            user_id=ident if kind == "u" else "",
            anonymous_id=ident if kind == "a" else "",
            timestamp=self._clock(),
            traits=TraitsUpdate(
                consent={
                    g: ConsentState.OPTED_IN if on else ConsentState.OPTED_OUT for g, on in changes.items()
                }
            ),
        )
        (ack,) = await self._ingestor.ingest([event])
        if ack.outcome is Outcome.REJECTED:
            raise ack.error or InvalidInput("the change was not stored")
