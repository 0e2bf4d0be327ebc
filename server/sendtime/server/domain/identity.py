"""Who an id belongs to: anonymous ids linked to user ids, user ids aliased to
each other, and the rules that keep two people apart.

Segment's semantics, which every CDP and ESP sendtime talks to follows:

- an ``identify`` or ``track`` that carries both a ``userId`` and an
  ``anonymousId`` links the anonymous id to the user (the visitor logged in or
  gave an email); ``alias`` with an anonymous ``previousId`` does the same;
- ``alias`` from one user id to another (``previousId`` a user id) says they
  are one person: the only way two user ids become one;
- **a user id is never merged into another user id by an anonymous id
  alone.** A shared device (one browser, two shoppers logging in in turn)
  links one anonymous id to two users; they stay two people. An anonymous
  event is the person's whose link to that anonymous id is the latest at or
  before the event's time, and, for events before any link, the first linked
  user's (the visitor who browsed, then identified).

Everything here is decided by event time, not arrival order: the same links in
any order give the same answers, so replicas and replays agree. Pure: no I/O.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from sendtime.server.domain.events import Event, EventKind


@dataclass(frozen=True, slots=True, order=True)
class Link:
    """An anonymous id seen with a user id, at the event's time."""

    at: datetime
    message_id: str
    anonymous_id: str = field(compare=False)
    user_id: str = field(compare=False)


@dataclass(frozen=True, slots=True)
class UserAlias:
    """``alias`` from one user id to another: the two are one person."""

    previous_id: str
    user_id: str


class Identities:
    """The links and aliases learned so far, and what they say."""

    def __init__(self, links: Iterable[Link] = (), aliases: Iterable[UserAlias] = ()) -> None:
        #: anonymous id -> its links, ordered by (time, message id)
        self._links: dict[str, list[Link]] = {}
        #: user id -> the user id it was merged under (union-find, by rank of name)
        self._parent: dict[str, str] = {}
        #: person -> the anonymous ids linked to any of its user ids
        self._anonymous: dict[str, set[str]] = {}
        for link in links:
            self.add_link(link)
        for alias in aliases:
            self.add_alias(alias)

    # -- learning ---------------------------------------------------------------

    def add_link(self, link: Link) -> bool:
        """Learns ``link``; False when it was known already."""
        links = self._links.setdefault(link.anonymous_id, [])
        index = bisect.bisect_left(links, link)
        if index < len(links) and links[index] == link:
            return False
        links.insert(index, link)
        self._anonymous.setdefault(self.person(link.user_id), set()).add(link.anonymous_id)
        return True

    def add_alias(self, alias: UserAlias) -> bool:
        """Makes two user ids one person; False when they were one already.
        The person's name is the smaller id: the same whatever the order."""
        first, second = self.person(alias.previous_id), self.person(alias.user_id)
        if first == second:
            return False
        keep, gone = min(first, second), max(first, second)
        self._parent[gone] = keep
        self._anonymous.setdefault(keep, set()).update(self._anonymous.pop(gone, set()))
        return True

    # -- answers ----------------------------------------------------------------

    def person(self, user_id: str) -> str:
        """The name of the person ``user_id`` belongs to (itself unless aliased)."""
        root = user_id
        while (parent := self._parent.get(root)) is not None:
            root = parent
        while user_id != root:  # path compression: later lookups are one step
            self._parent[user_id], user_id = root, self._parent[user_id]
        return root

    def owner(self, anonymous_id: str, at: datetime) -> str | None:
        """The person an anonymous event at ``at`` belongs to; None while the
        anonymous id is linked to nobody."""
        links = self._links.get(anonymous_id)
        if not links:
            return None
        # the latest link at or before ``at``; before the first, the first
        index = bisect.bisect_right([link.at for link in links], at) - 1
        return self.person(links[max(index, 0)].user_id)

    def spans(self, anonymous_id: str, person: str) -> list[tuple[datetime | None, datetime | None]]:
        """The times (from, until; None: no bound) in which the anonymous id's
        events are the person's, as ``owner`` says: ``[(None, None)]`` when
        they all are, ``[]`` when none are."""
        links = self._links.get(anonymous_id, [])
        root = self.person(person)
        spans: list[tuple[datetime | None, datetime | None]] = []
        for index, link in enumerate(links):
            if self.person(link.user_id) != root:
                continue
            start = None if index == 0 else link.at
            end = links[index + 1].at if index + 1 < len(links) else None
            if spans and spans[-1][1] == start:
                spans[-1] = (spans[-1][0], end)  # the same person linked again
            else:
                spans.append((start, end))
        return [span for span in spans if span[0] is None or span[1] is None or span[0] < span[1]]

    def anonymous_ids(self, person: str) -> frozenset[str]:
        """Every anonymous id ever linked to the person (some may be shared
        with another person: ``owner`` says whose each event is)."""
        return frozenset(self._anonymous.get(self.person(person), ()))

    def user_ids(self, person: str) -> frozenset[str]:
        """Every user id known to be the person (itself, and those aliased to it)."""
        root = self.person(person)
        members = {root}
        for user in list(self._parent):
            if self.person(user) == root:
                members.add(user)
        return frozenset(members)


# -- links as stored --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IdLink:
    """One stored link between two profile keys, as the stores keep it.

    ``from_key`` is ``a:<anonymous id>`` (an anonymous id seen with the user)
    or ``u:<user id>`` (``alias`` from that user id); ``to_key`` is always
    ``u:<user id>``. One event may write two: an ``alias`` does not say
    whether its ``previousId`` was an anonymous id or a user id (Segment's
    libraries send the anonymous id; a server that renames users sends the
    old user id), so it links both, and a key that was never used links
    nothing that exists."""

    from_key: str
    to_key: str
    at: datetime
    message_id: str


def links_of(event: Event) -> tuple[IdLink, ...]:
    """The links ``event`` carries (most carry none)."""
    user = event.identity.user_id
    if not user:
        return ()
    to_key = f"u:{user}"
    if event.kind is EventKind.ALIAS:
        previous = event.previous_id
        if not previous or previous == user:
            return ()
        return (
            IdLink(f"a:{previous}", to_key, event.timestamp, event.message_id),
            IdLink(f"u:{previous}", to_key, event.timestamp, event.message_id),
        )
    anonymous = event.identity.anonymous_id
    if anonymous and event.kind in (EventKind.IDENTIFY, EventKind.TRACK):
        return (IdLink(f"a:{anonymous}", to_key, event.timestamp, event.message_id),)
    return ()


def identities_from(links: Iterable[IdLink]) -> Identities:
    """What the stored ``links`` say, whatever their order."""
    anonymous: list[Link] = []
    aliases: list[UserAlias] = []
    for link in links:
        user = link.to_key[2:]
        if link.from_key.startswith("a:"):
            anonymous.append(Link(link.at, link.message_id, link.from_key[2:], user))
        else:
            aliases.append(UserAlias(link.from_key[2:], user))
    return Identities(anonymous, aliases)
