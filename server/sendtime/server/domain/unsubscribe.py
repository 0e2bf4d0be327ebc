"""Signed, expiring unsubscribe tokens (RFC 8058 one-click links).

A token names the user (profile key) and the subscription group, and expires.
It is ``base64url(payload) "." base64url(HMAC-SHA256(secret, payload))``: the
server needs no lookup to trust it, and any change to it, or a token signed
with another secret, is refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

import msgspec

from sendtime.server.domain.errors import InvalidInput, PermissionDenied

DEFAULT_LIFETIME: Final = timedelta(days=90)


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
    def __init__(self, secret: bytes, *, lifetime: timedelta = DEFAULT_LIFETIME) -> None:
        if len(secret) < 16:
            raise ValueError("the unsubscribe secret must be at least 16 bytes")
        self._secret = secret
        self._lifetime = lifetime

    def _sign(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, payload, hashlib.sha256).digest()

    def issue(self, profile_key: str, group: str, now: datetime) -> str:
        payload = _encode(_Payload(profile_key, group, int((now + self._lifetime).timestamp())))
        return f"{_b64(payload)}.{_b64(self._sign(payload))}"

    def verify(self, token: str, now: datetime) -> Unsubscribe:
        encoded, dot, signature = token.partition(".")
        if not dot:
            raise InvalidInput.field("token", "is not an unsubscribe token")
        try:
            payload = _unb64(encoded)
            given = _unb64(signature)
        except (ValueError, TypeError):
            raise InvalidInput.field("token", "is not an unsubscribe token") from None
        if not hmac.compare_digest(given, self._sign(payload)):
            raise PermissionDenied("the unsubscribe link was altered or not made by this server")
        try:
            decoded = _decode(payload)
        except (msgspec.ValidationError, msgspec.DecodeError):
            raise InvalidInput.field("token", "is not an unsubscribe token") from None
        if decoded.expires < now.timestamp():
            raise PermissionDenied("the unsubscribe link has expired")
        return Unsubscribe(decoded.profile_key, decoded.group)
