"""Reading profiles: who is asked for, and what a caller gets back."""

from __future__ import annotations

from sendtime.server.domain.errors import NotFound
from sendtime.server.domain.events import Identity
from sendtime.server.domain.profile import ProfileView, view
from sendtime.server.domain.profiles import ProfileBook


class ProfileQueries:
    def __init__(self, profiles: ProfileBook) -> None:
        self._profiles = profiles

    async def get(self, *, user_id: str = "", anonymous_id: str = "") -> ProfileView:
        identity = Identity.exactly_one(user_id, anonymous_id)
        person = await self._profiles.person(identity.key)
        if person is None:
            who = f"user {user_id!r}" if user_id else f"anonymous id {anonymous_id!r}"
            raise NotFound(f"no events were ever seen for {who}")
        shown = view(person.profile)
        shown.linked_user_ids = list(person.linked_user_ids)
        shown.linked_anonymous_ids = list(person.linked_anonymous_ids)
        return shown
