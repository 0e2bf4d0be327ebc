"""SendGrid's v3 Mail Send API: POST /v3/mail/send with a bearer API key.

A 202 means accepted; the message id is the X-Message-Id response header.
Errors come as ``{"errors": [{"message", "field", "help"}]}``. SendGrid has no
idempotency key, so a retry after a lost 202 can send twice (``idempotent`` is
False and the delivery ledger narrows that window). Our idempotency key rides
in ``custom_args`` so SendGrid's event webhook can name the send it is about.
"""

from __future__ import annotations

from typing import Any

from sendtime.server.relay._addresses import split_address
from sendtime.server.relay._http import JSON_HEADERS, HttpRelayBase, Reply, encode_json, failure
from sendtime.server.relay.base import OutgoingEmail
from sendtime.server.relay.config import SendGridConfig


def _address(text: str) -> dict[str, str]:
    name, address = split_address(text)
    return {"email": address, "name": name} if name else {"email": address}


def request_body(email: OutgoingEmail) -> dict[str, Any]:
    body: dict[str, Any] = {
        "personalizations": [{"to": [_address(email.recipient)]}],
        "from": _address(email.sender),
        "subject": email.subject,
        # SendGrid wants text/plain before text/html, and no empty values
        "content": [
            {"type": kind, "value": value}
            for kind, value in (("text/plain", email.text), ("text/html", email.html))
            if value
        ],
        "custom_args": {"idempotency_key": email.idempotency_key},
    }
    if email.reply_to:
        body["reply_to"] = _address(email.reply_to)
    if email.headers:
        body["headers"] = dict(email.headers)
    return body


def _reason(reply: Reply) -> str:
    document = reply.json()
    if isinstance(document, dict) and isinstance(document.get("errors"), list):
        messages = [
            f"{error.get('field')}: {error.get('message')}"
            if error.get("field")
            else str(error.get("message"))
            for error in document["errors"]
            if isinstance(error, dict)
        ]
        return "; ".join(messages)
    return reply.text()


class SendGridRelay(HttpRelayBase):
    name = "sendgrid"
    idempotent = False

    def __init__(self, config: SendGridConfig) -> None:
        super().__init__(timeout_s=config.timeout_s)
        self._url = config.base_url.rstrip("/") + "/v3/mail/send"
        self._headers = {**JSON_HEADERS, "Authorization": f"Bearer {config.api_key}"}

    async def attempt(self, email: OutgoingEmail) -> str:
        reply = await self._post(self._url, headers=self._headers, data=encode_json(request_body(email)))
        if 200 <= reply.status < 300:
            # accepted even without the header: a retry would send it twice
            return reply.headers.get("X-Message-Id") or email.message_id
        raise failure(self.name, reply, _reason(reply))
