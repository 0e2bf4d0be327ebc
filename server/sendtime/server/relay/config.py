"""Typed settings for each relay, one Struct per ESP, told apart by ``kind``.

``RelayConfig`` is a tagged union, so a settings file picks its relay with one
line (``kind = "smtp"``) and a misspelt or misplaced field is an error naming
it. Secrets are plain strings here; keep the file that holds them private.
Every HTTP ESP has a ``base_url`` so tests (or an EU region) can point it
elsewhere. ``build_relay`` in ``factory`` turns one of these into an adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Final, Literal

import msgspec

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]
Secret = Annotated[str, msgspec.Meta(min_length=1)]
BaseUrl = Annotated[str, msgspec.Meta(pattern=r"^https?://[^/?#]+(/[^?#]*)?$")]

#: Fields whose values never appear in a repr (and so never in a log line).
_SECRET_FIELDS: Final = frozenset(
    {"password", "api_key", "server_token", "secret_access_key", "session_token"}
)


class _RelayConfigBase(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, tag_field="kind"):
    #: Emails per second this relay may hand over; None: no limit.
    rate_per_s: Annotated[float, msgspec.Meta(gt=0)] | None = None
    #: Tries per email, the first included; only transient failures are retried.
    attempts: Annotated[int, msgspec.Meta(ge=1, le=20)] = 4

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{name}={'***' if name in _SECRET_FIELDS and value else repr(value)}"
            for name, value in msgspec.structs.asdict(self).items()
        )
        return f"{type(self).__name__}({fields})"


class SmtpConfig(_RelayConfigBase, tag="smtp"):
    host: str = "127.0.0.1"
    #: None: 465 with implicit TLS, 587 otherwise.
    port: Port | None = None
    #: "starttls": upgrade or fail; "opportunistic": upgrade when offered;
    #: "implicit": TLS from the first byte (port 465); "off": plain text.
    tls: Literal["starttls", "opportunistic", "implicit", "off"] = "starttls"
    #: AUTH after connecting when set.
    username: str = ""
    password: str = ""
    #: Each SMTP command's timeout, connecting included.
    timeout_s: Seconds = 10.0
    #: Connections kept open and reused; sends beyond them wait their turn. A
    #: connection carries about one email per four round trips, so a distant
    #: server wants more of them.
    pool_size: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    #: A connection idle longer than this is closed and made anew rather than
    #: reused (servers drop idle clients; RFC 5321 lets them after 5 minutes).
    max_idle_s: Seconds = 30.0
    #: PEM file of the CAs to trust instead of the system's (a private CA, tests).
    ca_file: str = ""
    verify_certs: bool = True
    #: The EHLO name; "" means this host's FQDN.
    local_hostname: str = ""


class SendGridConfig(_RelayConfigBase, tag="sendgrid"):
    api_key: Secret
    #: https://api.eu.sendgrid.com for EU regional subusers.
    base_url: BaseUrl = "https://api.sendgrid.com"
    timeout_s: Seconds = 10.0


class PostmarkConfig(_RelayConfigBase, tag="postmark"):
    server_token: Secret
    base_url: BaseUrl = "https://api.postmarkapp.com"
    #: "outbound" (transactional) or a broadcast stream's id for marketing mail.
    message_stream: Annotated[str, msgspec.Meta(min_length=1)] = "outbound"
    timeout_s: Seconds = 10.0


class MailgunConfig(_RelayConfigBase, tag="mailgun"):
    api_key: Secret
    #: The sending domain as set up in Mailgun (it is part of the URL path).
    domain: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9.-]+$")]
    #: https://api.eu.mailgun.net for domains in the EU region.
    base_url: BaseUrl = "https://api.mailgun.net"
    timeout_s: Seconds = 10.0


class ResendConfig(_RelayConfigBase, tag="resend"):
    api_key: Secret
    base_url: BaseUrl = "https://api.resend.com"
    timeout_s: Seconds = 10.0


class SesConfig(_RelayConfigBase, tag="ses"):
    region: Annotated[str, msgspec.Meta(pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]+$")]
    access_key_id: Secret
    secret_access_key: Secret
    #: For temporary credentials (STS); sent as X-Amz-Security-Token.
    session_token: str = ""
    #: "" means https://email.{region}.amazonaws.com.
    base_url: Annotated[str, msgspec.Meta(pattern=r"^(https?://[^/?#]+(/[^?#]*)?)?$")] = ""
    configuration_set: str = ""
    timeout_s: Seconds = 10.0


class OutboxConfig(_RelayConfigBase, tag="outbox"):
    #: Each email lands here as <idempotency key>.eml; a relative folder is
    #: inside storage.data_dir.
    directory: Path = Path("outbox")


RelayConfig = (
    SmtpConfig | SendGridConfig | PostmarkConfig | MailgunConfig | ResendConfig | SesConfig | OutboxConfig
)
