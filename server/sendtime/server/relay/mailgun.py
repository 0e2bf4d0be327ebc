"""Mailgun's MIME send: POST /v3/{domain}/messages.mime, HTTP basic auth with
user "api" and the API key, as multipart/form-data with the whole message as
the file field ``message`` and the envelope recipient as ``to``.

Success is HTTP 200 with ``{"id": "<...>", "message": "Queued. Thank you."}``;
the id is returned without its angle brackets, the form Mailgun's events use.
Errors carry ``{"message": ...}`` (sometimes plain text). Mailgun has no
idempotency key; our key rides as the custom variable ``v:idempotency_key``.
"""

from __future__ import annotations

import base64
from urllib.parse import quote

import aiohttp

from sendtime.server.relay._addresses import bare_address
from sendtime.server.relay._http import HttpRelayBase, Reply, failure
from sendtime.server.relay.base import OutgoingEmail
from sendtime.server.relay.config import MailgunConfig


def form(email: OutgoingEmail) -> aiohttp.FormData:
    data = aiohttp.FormData()
    data.add_field("to", email.envelope_to or bare_address(email.recipient))
    data.add_field("v:idempotency_key", email.idempotency_key)
    data.add_field("message", email.mime, filename="message.mime", content_type="message/rfc822")
    return data


def _reason(reply: Reply) -> str:
    document = reply.json()
    if isinstance(document, dict) and document.get("message"):
        return str(document["message"])
    return reply.text()


class MailgunRelay(HttpRelayBase):
    name = "mailgun"
    idempotent = False

    def __init__(self, config: MailgunConfig) -> None:
        super().__init__(timeout_s=config.timeout_s)
        self._url = f"{config.base_url.rstrip('/')}/v3/{quote(config.domain, safe='')}/messages.mime"
        self._headers = {
            "Accept": "application/json",
            "Authorization": "Basic " + base64.b64encode(f"api:{config.api_key}".encode()).decode("ascii"),
        }

    async def attempt(self, email: OutgoingEmail) -> str:
        reply = await self._post(self._url, headers=self._headers, data=form(email))
        if 200 <= reply.status < 300:
            document = reply.json()
            message_id = document.get("id") if isinstance(document, dict) else None
            # accepted even without an id: a retry would send it twice
            return str(message_id).strip("<>") if message_id else email.message_id
        raise failure(self.name, reply, _reason(reply))
