"""The API key of an HTTP request's Authorization header, read one way for
every HTTP door: a Bearer token, or the user name of Basic credentials (how
Segment's libraries send a write key, and what a browser's login prompt
sends). Each door adds its own fallback: the Segment doors the write key in
the body, the status page ``?key=``."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping

from sendtime.server.domain.errors import Unauthenticated


def names_a_key(headers: Mapping[str, str]) -> bool:
    """Whether the Authorization header is one that carries a key (Bearer or
    Basic): then it alone says what the key is, or that there is none."""
    return headers.get("Authorization", "").partition(" ")[0].lower() in ("bearer", "basic")


def header_key(headers: Mapping[str, str]) -> str | None:
    """The key the Authorization header gives; None when it gives none (no
    header, an empty one, or another scheme). Basic credentials that are not
    base64 are refused: they were meant as a key, and are not one."""
    scheme, _, value = headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return value.strip() or None
    if scheme.lower() == "basic":
        try:
            user, _, _password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise Unauthenticated("the Basic credentials are not valid base64") from None
        return user or None
    return None
