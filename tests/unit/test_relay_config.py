"""Relay settings: one tagged union picks the adapter by ``kind``; mistakes are
errors that name the field; secrets stay out of reprs; the public surface is
pinned."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

import sendtime.server.relay as relay_package
from sendtime.server.relay import (
    MailgunRelay,
    OutboxRelay,
    PostmarkRelay,
    RelayConfig,
    ResendRelay,
    RetryingRelay,
    SendGridRelay,
    SesRelay,
    SmtpConfig,
    SmtpRelay,
    build_relay,
    build_retrying_relay,
)

KINDS: list[tuple[dict[str, Any], type, str, bool]] = [
    ({"kind": "smtp"}, SmtpRelay, "smtp", False),
    ({"kind": "sendgrid", "api_key": "SG.x"}, SendGridRelay, "sendgrid", False),
    ({"kind": "postmark", "server_token": "t"}, PostmarkRelay, "postmark", False),
    ({"kind": "mailgun", "api_key": "k", "domain": "mg.example.com"}, MailgunRelay, "mailgun", False),
    ({"kind": "resend", "api_key": "re_x"}, ResendRelay, "resend", True),
    (
        {"kind": "ses", "region": "eu-west-1", "access_key_id": "AKID", "secret_access_key": "s"},
        SesRelay,
        "ses",
        False,
    ),
    ({"kind": "outbox", "directory": "/tmp/outbox"}, OutboxRelay, "outbox", True),
]


def decode(raw: dict[str, Any]) -> RelayConfig:
    def to_path(kind: type, value: Any) -> Any:
        if kind is Path and isinstance(value, str):
            return Path(value)
        raise NotImplementedError

    config: RelayConfig = msgspec.convert(raw, RelayConfig, dec_hook=to_path)
    return config


@pytest.mark.parametrize(("raw", "adapter", "name", "idempotent"), KINDS, ids=[k[2] for k in KINDS])
async def test_kind_picks_the_adapter(
    raw: dict[str, Any], adapter: type, name: str, idempotent: bool
) -> None:
    relay = build_relay(decode(raw))
    try:
        assert isinstance(relay, adapter)
        assert relay.name == name
        assert relay.idempotent is idempotent
    finally:
        await relay.close()


def test_unknown_fields_and_kinds_are_errors_naming_them() -> None:
    with pytest.raises(msgspec.ValidationError, match="unknown field `hostname`"):
        decode({"kind": "smtp", "hostname": "mail.example.com"})
    with pytest.raises(msgspec.ValidationError, match="Invalid value 'sparkpost'"):
        decode({"kind": "sparkpost", "api_key": "x"})
    with pytest.raises(msgspec.ValidationError, match=r"missing required field `api_key`"):
        decode({"kind": "resend"})
    with pytest.raises(msgspec.ValidationError, match=r"\$\.tls"):
        decode({"kind": "smtp", "tls": "sometimes"})
    with pytest.raises(msgspec.ValidationError, match=r"\$\.domain"):
        decode({"kind": "mailgun", "api_key": "k", "domain": "example.com/v3"})
    with pytest.raises(msgspec.ValidationError, match=r"\$\.base_url"):
        decode({"kind": "sendgrid", "api_key": "k", "base_url": "api.sendgrid.com"})


def test_secrets_stay_out_of_the_repr() -> None:
    config = decode({"kind": "smtp", "username": "relay", "password": "hunter2"})
    assert "hunter2" not in repr(config)
    assert "username='relay'" in repr(config)
    ses = decode(
        {"kind": "ses", "region": "eu-west-1", "access_key_id": "AKID", "secret_access_key": "s3cr3t"}
    )
    assert "s3cr3t" not in repr(ses)


def test_smtp_default_port_follows_the_tls_mode() -> None:
    assert SmtpRelay(SmtpConfig(tls="implicit"))._port == 465
    assert SmtpRelay(SmtpConfig(tls="starttls"))._port == 587
    assert SmtpRelay(SmtpConfig(tls="off", port=2525))._port == 2525


async def test_retrying_relay_takes_attempts_and_rate_from_the_config() -> None:
    relay = build_retrying_relay(decode({"kind": "resend", "api_key": "k", "attempts": 2, "rate_per_s": 50}))
    try:
        assert isinstance(relay, RetryingRelay)
        assert relay.policy.attempts == 2
        assert relay.rate_per_s == 50
        assert relay.name == "resend"
        assert relay.idempotent
    finally:
        await relay.close()


def test_public_surface() -> None:
    assert sorted(relay_package.__all__) == [
        "Accepted",
        "MailgunConfig",
        "MailgunRelay",
        "OutboxConfig",
        "OutboxRelay",
        "OutgoingEmail",
        "PermanentFailure",
        "PostmarkConfig",
        "PostmarkRelay",
        "Relay",
        "RelayConfig",
        "RelayFailure",
        "ResendConfig",
        "ResendRelay",
        "RetryPolicy",
        "RetryingRelay",
        "SendGridConfig",
        "SendGridRelay",
        "SesConfig",
        "SesRelay",
        "SmtpConfig",
        "SmtpRelay",
        "TransientFailure",
        "UncertainFailure",
        "build_relay",
        "build_retrying_relay",
    ]
