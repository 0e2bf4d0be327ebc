"""Addresses as ESP APIs want them: a display name and a bare address apart.

OutgoingEmail carries header-ready addresses ("Shop <shop@example.com>", the
name perhaps RFC 2047 encoded); JSON APIs take the name as plain text and the
address on its own, and SMTP's envelope takes the bare address.
"""

from __future__ import annotations

from email.header import decode_header, make_header
from email.utils import formataddr, parseaddr


def split_address(text: str) -> tuple[str, str]:
    """(display name as plain text, bare address); the name may be ""."""
    name, address = parseaddr(text)
    if "=?" in name:
        name = str(make_header(decode_header(name)))
    return name, address or text.strip()


def bare_address(text: str) -> str:
    return split_address(text)[1]


def plain_address(text: str) -> str:
    """RFC 5322 form with the name in plain text where it is ASCII (quoted when it
    must be) and RFC 2047 encoded otherwise: what Postmark's address fields parse."""
    name, address = split_address(text)
    return formataddr((name, address)) if name else address
