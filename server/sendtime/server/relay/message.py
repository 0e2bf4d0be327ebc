"""Building the RFC 5322 message: multipart/alternative (text, then HTML), the
headers mailbox providers require, and RFC 8058 one-click unsubscribe.

Header values come from user data (names) and templates (subjects): they go
through ``email.headerregistry`` with the SMTP policy, which refuses CR and LF
in any header, and we strip control characters first, so no data can add a
header or a line to the message.
"""

from __future__ import annotations

import re
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, parseaddr
from typing import Final

from sendtime.server.relay.base import OutgoingEmail

_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]+")


def clean_header(value: str) -> str:
    """One line of text: control characters (CR, LF, tabs, NUL, ...) become spaces."""
    return _CONTROL.sub(" ", value).strip()


def address(display_name: str, email: str) -> Address:
    local, at, domain = clean_header(email).rpartition("@")
    if not at or not local or not domain:
        raise ValueError(f"{email!r} is not an email address")
    return Address(display_name=clean_header(display_name), username=local, domain=domain)


def parse_address(text: str) -> Address:
    """'Shop <shop@example.com>' or a bare address."""
    name, email = parseaddr(clean_header(text))
    return address(name, email)


def build(
    *,
    send_key: str,
    message_id_domain: str,
    sender: str,
    recipient_email: str,
    recipient_name: str,
    reply_to: str,
    subject: str,
    html: str,
    text: str,
    date: datetime,
    list_id: str,
    unsubscribe_url: str = "",
    unsubscribe_mailto: str = "",
) -> OutgoingEmail:
    """The finished email for one send. The Message-ID is derived from the
    send's idempotency key, so a retried send carries the same Message-ID and
    receivers that de-duplicate on it see one message."""
    from_address = parse_address(sender)
    to_address = address(recipient_name, recipient_email)
    message_id = f"<{send_key}@{clean_header(message_id_domain)}>"
    message = EmailMessage(policy=SMTP)
    message["From"] = from_address
    message["To"] = to_address
    if reply_to:
        message["Reply-To"] = parse_address(reply_to)
    message["Subject"] = clean_header(subject)
    message["Date"] = format_datetime(date)
    message["Message-ID"] = message_id
    headers: dict[str, str] = {}
    if list_id:
        headers["List-ID"] = f"<{clean_header(list_id)}>"
    targets = [f"<{clean_header(url)}>" for url in (unsubscribe_url, unsubscribe_mailto) if url]
    if targets:
        headers["List-Unsubscribe"] = ", ".join(targets)
    if unsubscribe_url:
        # RFC 8058: providers POST "List-Unsubscribe=One-Click" to the https URL
        headers["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    for name, value in headers.items():
        message[name] = value
    message.set_content(text)
    message.add_alternative(html, subtype="html")
    return OutgoingEmail(
        idempotency_key=send_key,
        message_id=message_id,
        sender=str(from_address),
        recipient=str(to_address),
        reply_to=str(parse_address(reply_to)) if reply_to else "",
        subject=str(message["Subject"]),
        html=html,
        text=text,
        headers=headers,
        mime=message.as_bytes(),
        envelope_from=from_address.addr_spec,
        envelope_to=to_address.addr_spec,
    )
