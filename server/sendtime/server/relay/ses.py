"""Amazon SES API v2 SendEmail: POST /v2/email/outbound-emails on
email.{region}.amazonaws.com, signed with SigV4 (signing name "ses"), the
whole MIME message base64-encoded in ``Content.Raw.Data``.

Success is HTTP 200 with ``{"MessageId": ...}``. Errors follow AWS's REST-JSON
protocol: the error type in the X-Amzn-ErrorType header (or ``__type`` /
``code`` in the body) and the text in ``message``. TooManyRequestsException
(429), throttling and 5xx are transient; MessageRejected,
MailFromDomainNotVerifiedException, AccountSuspendedException,
SendingPausedException, BadRequestException (400) and bad credentials (403)
are not. SendEmail takes no idempotency token.
"""

from __future__ import annotations

import base64
from typing import Any, Final

from yarl import URL

from sendtime.server.relay._addresses import bare_address
from sendtime.server.relay._http import JSON_HEADERS, HttpRelayBase, Reply, encode_json, failure
from sendtime.server.relay._sigv4 import host_header, sign
from sendtime.server.relay.base import OutgoingEmail
from sendtime.server.relay.config import SesConfig

PATH: Final = "/v2/email/outbound-emails"
SIGNING_NAME: Final = "ses"
#: Error types worth another try whatever the status code says.
TRANSIENT_ERRORS: Final = frozenset(
    {"TooManyRequestsException", "ThrottlingException", "Throttling", "InternalServiceErrorException"}
)


def request_body(email: OutgoingEmail, *, configuration_set: str = "") -> dict[str, Any]:
    body: dict[str, Any] = {
        "FromEmailAddress": email.envelope_from or bare_address(email.sender),
        "Destination": {"ToAddresses": [email.envelope_to or bare_address(email.recipient)]},
        "Content": {"Raw": {"Data": base64.b64encode(email.mime).decode("ascii")}},
    }
    if configuration_set:
        body["ConfigurationSetName"] = configuration_set
    return body


def _error(reply: Reply) -> tuple[str, str]:
    document = reply.json()
    kind = reply.headers.get("X-Amzn-ErrorType", "")
    message = reply.text()
    if isinstance(document, dict):
        kind = kind or str(document.get("__type") or document.get("code") or "")
        message = str(document.get("message") or document.get("Message") or message)
    # "TooManyRequestsException:http://internal.amazon.com/..." or "aws.ses#MessageRejected"
    kind = kind.split(":", 1)[0].rsplit("#", 1)[-1]
    return kind, f"{kind}: {message}" if kind else message


class SesRelay(HttpRelayBase):
    name = "ses"
    idempotent = False

    def __init__(self, config: SesConfig) -> None:
        super().__init__(timeout_s=config.timeout_s)
        base = config.base_url or f"https://email.{config.region}.amazonaws.com"
        self._url = URL(base.rstrip("/") + PATH)
        self._config = config

    async def attempt(self, email: OutgoingEmail) -> str:
        config = self._config
        body = encode_json(request_body(email, configuration_set=config.configuration_set))
        headers = {**JSON_HEADERS, "Host": host_header(self._url)}
        headers |= sign(
            method="POST",
            url=self._url,
            headers={"Content-Type": JSON_HEADERS["Content-Type"]},
            body=body,
            region=config.region,
            service=SIGNING_NAME,
            access_key_id=config.access_key_id,
            secret_access_key=config.secret_access_key,
            session_token=config.session_token,
        )
        reply = await self._post(str(self._url), headers=headers, data=body)
        if 200 <= reply.status < 300:
            document = reply.json()
            message_id = document.get("MessageId") if isinstance(document, dict) else None
            # accepted even without an id: a retry would send it twice
            return str(message_id) if message_id else email.message_id
        kind, reason = _error(reply)
        raise failure(self.name, reply, reason, transient=True if kind in TRANSIENT_ERRORS else None)
