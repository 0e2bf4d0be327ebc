"""Relays to ESPs: SMTP, SendGrid, Postmark, Mailgun, Resend, Amazon SES, and
an outbox folder of .eml files.

Each adapter makes one attempt per call (``Relay.attempt``) and sorts failures
into transient, permanent and uncertain (the ESP may have taken the message);
``RetryingRelay`` adds retries with backoff and a rate limit. ``build_relay`` picks the adapter a ``RelayConfig`` names.
"""

from sendtime.server.relay.base import (
    Accepted,
    OutgoingEmail,
    PermanentFailure,
    Relay,
    RelayFailure,
    RetryingRelay,
    RetryPolicy,
    TransientFailure,
    UncertainFailure,
)
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
from sendtime.server.relay.factory import build_relay, build_retrying_relay
from sendtime.server.relay.mailgun import MailgunRelay
from sendtime.server.relay.outbox import OutboxRelay
from sendtime.server.relay.postmark import PostmarkRelay
from sendtime.server.relay.resend import ResendRelay
from sendtime.server.relay.sendgrid import SendGridRelay
from sendtime.server.relay.ses import SesRelay
from sendtime.server.relay.smtp import SmtpRelay

__all__ = [
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
