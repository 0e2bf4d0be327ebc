"""ESP feedback: bounces, spam complaints and unsubscribes reported by the ESP
become suppressions, so no marketing email goes to that address again.

- SendGrid's Event Webhook: a JSON array of events, signed with ECDSA P-256
  (the signature is over the timestamp header followed by the raw body; the
  public key is the one SendGrid shows for the webhook). A timestamp further
  from now than the tolerance is refused, so a captured request cannot be
  replayed later.
- Postmark's Bounce and Spam Complaint webhooks: one JSON object each;
  Postmark does not sign them, so the webhook URL carries Basic credentials
  that must match the configured ones.

Suppressions are keyed by (address, group), so an event reported twice (ESPs
retry webhooks) adds nothing the second time.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sendtime.server.domain.errors import InvalidInput, PermissionDenied, Unauthenticated

ALL_GROUPS: Final = "*"
_SENDGRID_SUPPRESS: Final = {
    "bounce": (ALL_GROUPS, "bounced"),
    "dropped": (ALL_GROUPS, "dropped by the ESP"),
    "spamreport": (ALL_GROUPS, "marked as spam"),
    "unsubscribe": ("marketing", "unsubscribed at the ESP"),
    "group_unsubscribe": ("marketing", "unsubscribed at the ESP"),
}
_POSTMARK_HARD: Final = frozenset(
    {"HardBounce", "BadEmailAddress", "SpamNotification", "ManuallyDeactivated", "Blocked", "SpamComplaint"}
)


@dataclass(frozen=True, slots=True)
class Suppression:
    address: str
    group: str
    reason: str
    source: str

    @property
    def subject(self) -> str:
        return f"email:{self.address.lower()}"


_array = msgspec.json.Decoder(list[dict[str, Any]])
_object = msgspec.json.Decoder(dict[str, Any])


#: Unix seconds have 10 digits until the year 2286: a longer timestamp is none.
_MAX_TIMESTAMP_DIGITS: Final = 12


class SendGridFeedback:
    def __init__(
        self, public_key_base64: str, *, tolerance_s: float = 600.0, clock: Callable[[], float] = time.time
    ) -> None:
        self._tolerance_s = tolerance_s
        self._clock = clock
        try:
            key = serialization.load_der_public_key(base64.b64decode(public_key_base64))
        except (ValueError, binascii.Error) as exc:
            raise ValueError(
                f"delivery.feedback.sendgrid_public_key is not a base64 DER key: {exc}"
            ) from None
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ValueError("delivery.feedback.sendgrid_public_key must be an ECDSA key")
        self._key = key

    def verify(self, body: bytes, signature: str | None, timestamp: str | None) -> None:
        signature, timestamp = self.check_headers(signature, timestamp)
        try:
            self._key.verify(
                base64.b64decode(signature), timestamp.encode() + body, ec.ECDSA(hashes.SHA256())
            )
        except (InvalidSignature, ValueError, binascii.Error):
            raise PermissionDenied("the SendGrid event webhook signature does not match") from None

    def check_headers(self, signature: str | None, timestamp: str | None) -> tuple[str, str]:
        """Both headers there and the timestamp recent (checked before the body
        is read); returns them."""
        if not signature or not timestamp:
            raise Unauthenticated("SendGrid's signature and timestamp headers are required")
        if not (timestamp.isascii() and timestamp.isdigit()) or len(timestamp) > _MAX_TIMESTAMP_DIGITS:
            raise Unauthenticated("SendGrid's timestamp header must be Unix seconds")
        age = abs(self._clock() - int(timestamp))
        if age > self._tolerance_s:
            raise Unauthenticated(
                f"SendGrid's timestamp is {age:.0f} s away from now; the tolerance is {self._tolerance_s:.0f} s"
            )
        return signature, timestamp

    def suppressions(self, body: bytes) -> list[Suppression]:
        try:
            events = _array.decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise InvalidInput.field("body", f"is not a SendGrid event array: {exc}") from None
        found = []
        for event in events:
            rule = _SENDGRID_SUPPRESS.get(str(event.get("event", "")))
            email = event.get("email")
            if rule is not None and isinstance(email, str) and "@" in email:
                group, reason = rule
                found.append(Suppression(email, group, reason, "sendgrid"))
        return found


class PostmarkFeedback:
    def __init__(self, username: str, password: str) -> None:
        if not username or not password:
            raise ValueError("delivery.feedback.postmark_username and _password are both required")
        self._expected = base64.b64encode(f"{username}:{password}".encode()).decode()

    def verify(self, authorization: str | None) -> None:
        scheme, _, credentials = (authorization or "").partition(" ")
        if scheme.lower() != "basic" or not hmac.compare_digest(credentials.strip(), self._expected):
            raise Unauthenticated("Postmark webhooks must carry the configured Basic credentials")

    def suppressions(self, body: bytes) -> list[Suppression]:
        try:
            event = _object.decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise InvalidInput.field("body", f"is not a Postmark webhook object: {exc}") from None
        email = event.get("Email")
        if not isinstance(email, str) or "@" not in email:
            return []
        record = event.get("RecordType")
        if record == "SpamComplaint":
            return [Suppression(email, ALL_GROUPS, "marked as spam", "postmark")]
        if record == "Bounce" and event.get("Type") in _POSTMARK_HARD:
            return [Suppression(email, ALL_GROUPS, f"bounced ({event.get('Type')})", "postmark")]
        if record == "SubscriptionChange" and event.get("SuppressSending") is True:
            return [Suppression(email, "marketing", "unsubscribed at the ESP", "postmark")]
        return []


def dedupe(suppressions: Sequence[Suppression]) -> list[Suppression]:
    seen: dict[tuple[str, str], Suppression] = {}
    for item in suppressions:
        seen.setdefault((item.subject, item.group), item)
    return list(seen.values())
