"""From a relay's settings to the adapter (and the retry and rate policy
around it)."""

from __future__ import annotations

from sendtime.server.relay.base import Relay, RetryingRelay, RetryPolicy
from sendtime.server.relay.config import (
    MailgunConfig,
    OutboxConfig,
    PostmarkConfig,
    RelayConfig,
    ResendConfig,
    SendGridConfig,
    SesConfig,
    SmtpConfig,
)
from sendtime.server.relay.mailgun import MailgunRelay
from sendtime.server.relay.outbox import OutboxRelay
from sendtime.server.relay.postmark import PostmarkRelay
from sendtime.server.relay.resend import ResendRelay
from sendtime.server.relay.sendgrid import SendGridRelay
from sendtime.server.relay.ses import SesRelay
from sendtime.server.relay.smtp import SmtpRelay


def build_relay(config: RelayConfig) -> Relay:
    """The adapter ``config.kind`` names: one attempt per call, no retries."""
    match config:
        case SmtpConfig():
            return SmtpRelay(config)
        case SendGridConfig():
            return SendGridRelay(config)
        case PostmarkConfig():
            return PostmarkRelay(config)
        case MailgunConfig():
            return MailgunRelay(config)
        case ResendConfig():
            return ResendRelay(config)
        case SesConfig():
            return SesRelay(config)
        case OutboxConfig():
            return OutboxRelay(config)


def build_retrying_relay(config: RelayConfig, *, policy: RetryPolicy | None = None) -> RetryingRelay:
    """The adapter wrapped in retries (``config.attempts``) and its rate limit
    (``config.rate_per_s``)."""
    policy = policy or RetryPolicy(attempts=config.attempts)
    return RetryingRelay(build_relay(config), policy=policy, rate_per_s=config.rate_per_s)
