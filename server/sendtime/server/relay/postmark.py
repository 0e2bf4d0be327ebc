"""Postmark's single-send API: POST /email with X-Postmark-Server-Token.

Success is HTTP 200 with ``ErrorCode`` 0 and the id in ``MessageID``. Refusals
come as HTTP 422 with ``{"ErrorCode": n, "Message": ...}``: 406 (inactive
recipient: bounced or complained before), 300 (invalid email request), 10 (bad
token), 405/412/413 (account may not send) are for good; 100 (maintenance) and
429 (rate limit) pass. HTTP 401 is a bad token, 429 and 5xx are transient.
Postmark has no idempotency key; our key rides in ``Metadata`` so bounce and
complaint webhooks can name the send.
"""

from __future__ import annotations

from typing import Any, Final

from sendtime.server.relay._addresses import plain_address
from sendtime.server.relay._http import JSON_HEADERS, HttpRelayBase, Reply, encode_json, failure
from sendtime.server.relay.base import OutgoingEmail
from sendtime.server.relay.config import PostmarkConfig

#: Postmark API error codes that may clear up by themselves.
TRANSIENT_ERROR_CODES: Final = frozenset({100, 429})


def request_body(email: OutgoingEmail, *, message_stream: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "From": plain_address(email.sender),
        "To": plain_address(email.recipient),
        "Subject": email.subject,
        "HtmlBody": email.html,
        "TextBody": email.text,
        "MessageStream": message_stream,
        "Metadata": {"idempotency_key": email.idempotency_key},
    }
    if email.reply_to:
        body["ReplyTo"] = plain_address(email.reply_to)
    if email.headers:
        body["Headers"] = [{"Name": name, "Value": value} for name, value in email.headers.items()]
    return body


def _error(reply: Reply) -> tuple[int | None, str]:
    document = reply.json()
    if isinstance(document, dict):
        code = document.get("ErrorCode")
        message = str(document.get("Message") or "")
        if isinstance(code, int):
            return code, f"ErrorCode {code}: {message}" if message else f"ErrorCode {code}"
        return None, message
    return None, reply.text()


class PostmarkRelay(HttpRelayBase):
    name = "postmark"
    idempotent = False

    def __init__(self, config: PostmarkConfig) -> None:
        super().__init__(timeout_s=config.timeout_s)
        self._url = config.base_url.rstrip("/") + "/email"
        self._headers = {**JSON_HEADERS, "X-Postmark-Server-Token": config.server_token}
        self._stream = config.message_stream

    async def attempt(self, email: OutgoingEmail) -> str:
        body = encode_json(request_body(email, message_stream=self._stream))
        reply = await self._post(self._url, headers=self._headers, data=body)
        code, reason = _error(reply)
        if 200 <= reply.status < 300 and not code:
            document = reply.json()
            message_id = document.get("MessageID") if isinstance(document, dict) else None
            # accepted even without an id: a retry would send it twice
            return str(message_id) if message_id else email.message_id
        # the error code can only make a failure transient; otherwise the status decides
        raise failure(self.name, reply, reason, transient=True if code in TRANSIENT_ERROR_CODES else None)
