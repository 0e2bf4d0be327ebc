"""The small decisions inside the relays: which failure an answer stands for,
where a queue id hides in an SMTP reply, what an outbox file is called, how an
address is split for a JSON API."""

from __future__ import annotations

import ssl

import aiosmtplib
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from sendtime.server.relay._addresses import bare_address, plain_address, split_address
from sendtime.server.relay._http import Reply, failure
from sendtime.server.relay.base import PermanentFailure, TransientFailure
from sendtime.server.relay.outbox import file_name
from sendtime.server.relay.resend import idempotency_key
from sendtime.server.relay.smtp import data_payload, failure_for, queue_id


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("2.0.0 Ok: queued as 4QX7Z1", "4QX7Z1"),  # Postfix
        ("OK id=1tZxyQ-0007Ab-Cd", "1tZxyQ-0007Ab-Cd"),  # Exim
        ("2.0.0 4BH2Lm8x012345 Message accepted for delivery", "4BH2Lm8x012345"),  # Sendmail
        (
            "Ok 0100018c1f6a9a8b-7c6d5e4f-3a2b-4c1d-9e8f-0a1b2c3d4e5f-000000",
            "0100018c1f6a9a8b-7c6d5e4f-3a2b-4c1d-9e8f-0a1b2c3d4e5f-000000",
        ),
        ("Ok 0100018c1f6a9a8b-000000", "0100018c1f6a9a8b-000000"),  # Amazon SES
        ("OK", None),
        ("2.0.0 OK  1700000000 d2e1a72fcca58-6c3b1f0a8esm123456pfb.12 - gsmtp", None),
    ],
)
def test_queue_id(reply: str, expected: str | None) -> None:
    assert queue_id(reply) == expected


@pytest.mark.parametrize(
    ("message", "payload"),
    [
        (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
        (b"a\r\n.b\r\n..c\r\n.", b"a\r\n..b\r\n...c\r\n..\r\n.\r\n"),  # leading dots doubled
        (b".first", b"..first\r\n.\r\n"),
        (b"bare\nlf\rcr\r\n.x", b"bare\r\nlf\r\ncr\r\n..x\r\n.\r\n"),  # line endings made CRLF
        (b"", b"\r\n.\r\n"),
    ],
)
def test_smtp_data_payload_is_what_aiosmtplib_would_send(message: bytes, payload: bytes) -> None:
    assert data_payload(message) == payload
    normalized = aiosmtplib.protocol.normalize_message_line_endings(message)
    assert payload == aiosmtplib.protocol.PERIOD_REGEX.sub(b"..", normalized) + b".\r\n"


def test_smtp_codes_pick_the_failure() -> None:
    assert isinstance(failure_for(aiosmtplib.SMTPDataError(451, "4.3.0 try later")), TransientFailure)
    refused = failure_for(aiosmtplib.SMTPRecipientRefused(550, "5.1.1 User unknown", "x@example.com"))
    assert isinstance(refused, PermanentFailure)
    assert refused.reason == "smtp: 550 5.1.1 User unknown"
    all_refused = aiosmtplib.SMTPRecipientsRefused(
        [aiosmtplib.SMTPRecipientRefused(452, "4.2.2 Mailbox full", "x")]
    )
    assert isinstance(failure_for(all_refused), TransientFailure)
    assert isinstance(failure_for(aiosmtplib.SMTPServerDisconnected("gone")), TransientFailure)
    assert isinstance(failure_for(ConnectionRefusedError(111, "Connection refused")), TransientFailure)
    assert isinstance(failure_for(aiosmtplib.SMTPReadTimeoutError("slow")), TransientFailure)
    assert isinstance(failure_for(aiosmtplib.SMTPException("STARTTLS not supported")), PermanentFailure)
    assert isinstance(failure_for(ssl.SSLCertVerificationError("unknown CA")), PermanentFailure)


def reply(status: int, body: bytes = b"", **headers: str) -> Reply:
    return Reply(status, CIMultiDictProxy(CIMultiDict(headers)), body)


def test_http_status_picks_the_failure() -> None:
    throttled = failure("esp", reply(429, b"slow down", **{"Retry-After": "7"}), "")
    assert isinstance(throttled, TransientFailure)
    assert throttled.retry_after_s == 7.0
    assert throttled.reason == "esp: HTTP 429: slow down"
    assert isinstance(failure("esp", reply(503), ""), TransientFailure)
    assert isinstance(failure("esp", reply(408), ""), TransientFailure)
    assert isinstance(failure("esp", reply(401), "bad key"), PermanentFailure)
    assert failure("esp", reply(400), "").reason == "esp: HTTP 400: no reason given"
    assert isinstance(failure("esp", reply(422), "", transient=True), TransientFailure)


def test_outbox_file_names() -> None:
    assert file_name("u1:flow:1:cart-9") == "u1%3Aflow%3A1%3Acart-9.eml"
    assert file_name("a/b") == "a%2Fb.eml"
    assert file_name("..") == "%2E..eml"
    assert file_name(".env") == "%2Eenv.eml"
    assert "/" not in file_name("../../x")
    long = file_name("k" * 500)
    assert long.startswith("sha256-")
    assert long.endswith(".eml")
    assert file_name("k" * 500) == long  # the same key, the same file


def test_resend_keys_longer_than_resend_allows_are_digested() -> None:
    assert idempotency_key("short") == "short"
    assert len(idempotency_key("x" * 300)) <= 256
    assert idempotency_key("x" * 300) == idempotency_key("x" * 300)


def test_addresses() -> None:
    assert split_address("Shop <shop@example.com>") == ("Shop", "shop@example.com")
    assert split_address("=?utf-8?q?Caf=C3=A9_M=C3=BCller?= <cafe@example.com>") == (
        "Café Müller",
        "cafe@example.com",
    )
    assert split_address("ada@example.com") == ("", "ada@example.com")
    assert bare_address('"Doe, Jane" <jane@example.com>') == "jane@example.com"
    assert plain_address('"Doe, Jane" <jane@example.com>') == '"Doe, Jane" <jane@example.com>'
    assert plain_address("ada@example.com") == "ada@example.com"
