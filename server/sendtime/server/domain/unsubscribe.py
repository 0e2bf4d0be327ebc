"""Signed, expiring tokens for the links in an email: RFC 8058 one-click
unsubscribe, and the email preferences page.

A token names the user (profile key) and the subscription group, and expires.
It is ``base64url(payload) "." base64url(HMAC-SHA256(secret, purpose + payload))``:
the server needs no lookup to trust it, and any change to it, a token signed
with another secret, or a token made for the other purpose (a preferences
token used to unsubscribe) is refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

import msgspec

from sendtime.server.domain.errors import InvalidInput, PermissionDenied

DEFAULT_LIFETIME: Final = timedelta(days=90)
#: Signed into preferences tokens, so that one is never an unsubscribe token
#: (whose purpose is empty: the tokens made before preferences existed).
PREFERENCES_PURPOSE: Final = b"preferences\x00"


class _Payload(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    profile_key: str
    group: str
    expires: int  # unix seconds


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    profile_key: str
    group: str


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(_Payload).decode


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class UnsubscribeTokens:
    def __init__(
        self, secret: bytes, *, lifetime: timedelta = DEFAULT_LIFETIME, purpose: bytes = b""
    ) -> None:
        if len(secret) < 16:
            raise ValueError("the unsubscribe secret must be at least 16 bytes")
        self._secret = secret
        self._lifetime = lifetime
        self._purpose = purpose

    def _sign(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, self._purpose + payload, hashlib.sha256).digest()

    def issue(self, profile_key: str, group: str, now: datetime) -> str:
        payload = _encode(_Payload(profile_key, group, int((now + self._lifetime).timestamp())))
        return f"{_b64(payload)}.{_b64(self._sign(payload))}"

    def verify(self, token: str, now: datetime) -> Unsubscribe:
        encoded, dot, signature = token.partition(".")
        if not dot:
            raise InvalidInput.field("token", "is not a token from one of our emails")
        try:
            payload = _unb64(encoded)
            given = _unb64(signature)
        except (ValueError, TypeError):
            raise InvalidInput.field("token", "is not a token from one of our emails") from None
        if not hmac.compare_digest(given, self._sign(payload)):
            raise PermissionDenied("the link was altered or not made by this server")
        try:
            decoded = _decode(payload)
        except (msgspec.ValidationError, msgspec.DecodeError):
            raise InvalidInput.field("token", "is not a token from one of our emails") from None
        if decoded.expires < now.timestamp():
            raise PermissionDenied("the link has expired")
        return Unsubscribe(decoded.profile_key, decoded.group)


class EmailLinks:
    """The signed links one email carries: one-click unsubscribe from its
    subscription group, and the preferences page of its recipient. Both are
    under the server's public address, which ``base_url`` gives when asked (the
    HTTP edge's own address is known only once it listens)."""

    def __init__(self, secret: bytes, base_url: Callable[[], str]) -> None:
        self.unsubscribe_tokens = UnsubscribeTokens(secret)
        self.preferences_tokens = UnsubscribeTokens(secret, purpose=PREFERENCES_PURPOSE)
        self._base_url = base_url

    def unsubscribe_url(self, profile_key: str, group: str, now: datetime) -> str:
        token = self.unsubscribe_tokens.issue(profile_key, group, now)
        return f"{self._base_url().rstrip('/')}/v1/unsubscribe/{token}"

    def preferences_url(self, profile_key: str, now: datetime) -> str:
        token = self.preferences_tokens.issue(profile_key, "", now)
        return f"{self._base_url().rstrip('/')}/v1/preferences/{token}"
