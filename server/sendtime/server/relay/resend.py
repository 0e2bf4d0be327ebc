"""Resend's send API: POST /emails with a bearer API key.

Success is HTTP 200 with ``{"id": ...}``. Resend de-duplicates by the
``Idempotency-Key`` header for 24 hours, answering a repeat with the first
send's id, so a retry after a lost answer cannot become a second email
(``idempotent`` is True). Errors are ``{"statusCode", "name", "message"}``;
409 ``concurrent_idempotent_requests`` (the first try is still in flight) is
worth another try, 409 ``invalid_idempotent_request`` (same key, other
payload) is not.
"""

from __future__ import annotations

import hashlib
from typing import Any, Final

from sendtime.server.relay._addresses import split_address
from sendtime.server.relay._http import JSON_HEADERS, HttpRelayBase, Reply, encode_json, failure
from sendtime.server.relay.base import OutgoingEmail
from sendtime.server.relay.config import ResendConfig

#: Resend refuses longer idempotency keys; longer ones are sent as their digest.
MAX_KEY_CHARS: Final = 256


def idempotency_key(key: str) -> str:
    if len(key) <= MAX_KEY_CHARS:
        return key
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _from(text: str) -> str:
    # Resend takes an unquoted, unencoded display name in "from" (it refuses
    # RFC 2047 encoded words there), so the name goes in as plain text.
    name, address = split_address(text)
    return f"{name} <{address}>" if name else address


def request_body(email: OutgoingEmail) -> dict[str, Any]:
    body: dict[str, Any] = {
        "from": _from(email.sender),
        "to": [email.recipient],
        "subject": email.subject,
        "html": email.html,
        "text": email.text,
    }
    if email.reply_to:
        body["reply_to"] = [email.reply_to]
    if email.headers:
        body["headers"] = dict(email.headers)
    return body


def _error(reply: Reply) -> tuple[str, str]:
    document = reply.json()
    if isinstance(document, dict):
        name = str(document.get("name") or "")
        message = str(document.get("message") or "")
        return name, f"{name}: {message}" if name else message
    return "", reply.text()


class ResendRelay(HttpRelayBase):
    name = "resend"
    idempotent = True

    def __init__(self, config: ResendConfig) -> None:
        super().__init__(timeout_s=config.timeout_s)
        self._url = config.base_url.rstrip("/") + "/emails"
        self._headers = {**JSON_HEADERS, "Authorization": f"Bearer {config.api_key}"}

    async def attempt(self, email: OutgoingEmail) -> str:
        headers = {**self._headers, "Idempotency-Key": idempotency_key(email.idempotency_key)}
        reply = await self._post(self._url, headers=headers, data=encode_json(request_body(email)))
        if 200 <= reply.status < 300:
            document = reply.json()
            message_id = document.get("id") if isinstance(document, dict) else None
            return str(message_id) if message_id else email.message_id
        name, reason = _error(reply)
        raise failure(
            self.name, reply, reason, transient=True if name == "concurrent_idempotent_requests" else None
        )
