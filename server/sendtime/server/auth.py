"""API keys and scopes. The edges extract the key (bearer token, Basic user
name, Segment write key) and ask here; this module never sees a transport."""

from __future__ import annotations

from dataclasses import dataclass

from sendtime.server.domain.errors import PermissionDenied, Unauthenticated
from sendtime.server.settings import DEV_KEY, AuthSettings, Scope, hash_key


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    scopes: frozenset[Scope]

    def require(self, scope: Scope) -> None:
        if scope not in self.scopes:
            raise PermissionDenied(f"API key {self.name!r} lacks the {scope.value!r} scope")


class Authenticator:
    def __init__(self, settings: AuthSettings) -> None:
        self._by_hash = {k.hash: Principal(k.name, frozenset(k.scopes)) for k in settings.keys}
        # Only while no key is configured: a server given real keys must not
        # also open every scope to a key everybody knows.
        if settings.dev_key and not settings.keys:
            self._by_hash[hash_key(DEV_KEY)] = Principal("dev", frozenset(Scope))

    def authenticate(self, key: str | None) -> Principal:
        if not key:
            raise Unauthenticated("an API key is required (authorization: Bearer KEY)")
        # A lookup by digest leaks through timing at most how much of a
        # guess's SHA-256 matches a stored one, which tells nothing about the
        # key itself: no constant-time comparison of the keys is needed.
        principal = self._by_hash.get(hash_key(key))
        if principal is None:
            raise Unauthenticated("unknown API key")
        return principal

    def authorize(self, key: str | None, scope: Scope) -> Principal:
        principal = self.authenticate(key)
        principal.require(scope)
        return principal
