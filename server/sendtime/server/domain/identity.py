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
