"""The ESP relays against real servers on loopback: an aiosmtpd SMTP server (plain,
STARTTLS with a trustme certificate, implicit TLS, with and without AUTH) and
aiohttp servers that speak each ESP's HTTP API, answer the way the ESP does, and
check the exact request each adapter sends."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import re
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trustme
from aiohttp import BodyPartReader, web
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from sendtime.server.relay import (
    MailgunConfig,
    OutboxConfig,
    OutboxRelay,
    OutgoingEmail,
    PermanentFailure,
    PostmarkConfig,
    Relay,
    RelayConfig,
    ResendConfig,
    RetryingRelay,
    RetryPolicy,
    SendGridConfig,
    SesConfig,
    SmtpConfig,
    SmtpRelay,
    TransientFailure,
    UncertainFailure,
    build_relay,
)
from tests.integration.smtp_server import ClosingController

UNSUBSCRIBE = {
    "List-Unsubscribe": "<https://shop.example/u/tok123>, <mailto:unsub@shop.example?subject=tok123>",
    "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    "List-ID": "Shop offers <offers.shop.example>",
}
#: Retries without waiting: the tests are about what is retried, not how long it sleeps.
FAST = RetryPolicy(attempts=4, base_delay_s=0.001, max_delay_s=0.01)


def make_email(key: str = "u1:abandoned-cart:1:cart-9", *, to: str = "ada@example.com") -> OutgoingEmail:
    message = EmailMessage()
    message_id = make_msgid(domain="shop.example")
    message["Message-ID"] = message_id
    message["From"] = "Shop <shop@shop.example>"
    message["To"] = f"Ada <{to}>"
    message["Reply-To"] = "help@shop.example"
    message["Subject"] = "You left something behind"
    for name, value in UNSUBSCRIBE.items():
        message[name] = value
    message.set_content("Your cart: 1 x Lamp, 49.00 EUR")
    message.add_alternative("<p>Your cart: 1 x <b>Lamp</b>, 49.00 EUR</p>", subtype="html")
    return OutgoingEmail(
        idempotency_key=key,
        message_id=message_id,
        sender="Shop <shop@shop.example>",
        recipient=f"Ada <{to}>",
        reply_to="help@shop.example",
        subject="You left something behind",
        html="<p>Your cart: 1 x <b>Lamp</b>, 49.00 EUR</p>",
        text="Your cart: 1 x Lamp, 49.00 EUR",
        headers=dict(UNSUBSCRIBE),
        mime=message.as_bytes(),
        envelope_from="bounces@shop.example",
        envelope_to=to,
    )


def retrying(relay: Relay) -> RetryingRelay:
    return RetryingRelay(relay, policy=FAST)


# --- SMTP -------------------------------------------------------------------------


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    peer: Any
    tls: bool
    login: bytes | None


@dataclass
class Recorder:
    """An aiosmtpd handler that keeps what it accepts; its DATA replies can be
    scripted ("451 ..." then "250 ..."), and RCPT can be refused."""

    data_replies: list[str] = field(default_factory=list)
    mail_replies: list[str] = field(default_factory=list)
    rcpt_reply: str | None = None
    received: list[Received] = field(default_factory=list)
    refused: int = 0

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        reply = self.mail_replies.pop(0) if self.mail_replies else "250 OK"
        if reply.startswith("250"):
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
        return reply

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if self.rcpt_reply is not None and address.startswith("refused"):
            self.refused += 1
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        reply = self.data_replies.pop(0) if self.data_replies else "250 2.0.0 Ok: queued as 4QX7Z1"
        if reply.startswith("250"):
            login = session.auth_data.login if isinstance(session.auth_data, LoginPassword) else None
            content = envelope.original_content or b""
            assert isinstance(envelope.mail_from, str)
            self.received.append(
                Received(
                    envelope.mail_from, list(envelope.rcpt_tos), content, session.peer, is_tls(server), login
                )
            )
        return reply


def is_tls(server: SMTP) -> bool:
    """Implicit TLS or after STARTTLS: either way the transport has an SSL object."""
    return server.transport is not None and server.transport.get_extra_info("ssl_object") is not None


class LoopbackController(ClosingController):
    """The closing controller, bound to 127.0.0.1 port 0 (or a given port).
    Given as long as it needs to start: its default (5 s, the TLS handshake of
    its start-up probe included) is a race a busy machine can lose."""

    def __init__(self, handler: Any, **options: Any) -> None:
        super().__init__(handler, ready_timeout=60.0, **options)

    def _trigger_server(self) -> None:
        assert isinstance(self.server, asyncio.Server)
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()  # type: ignore[no-untyped-call]


@contextmanager
def smtp_server(handler: Recorder, port: int = 0, **smtp_options: Any) -> Iterator[int]:
    controller = LoopbackController(handler, hostname="127.0.0.1", port=port, **smtp_options)
    controller.start()
    try:
        yield controller.port
    finally:
        controller.stop()


def authenticator(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: object
) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and auth_data == (b"relay-user", b"relay-secret")
    # handled=False: aiosmtpd answers a refusal with "535 5.7.8 Authentication credentials invalid"
    return AuthResult(success=ok, handled=False, auth_data=auth_data)


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(authority: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def server_tls(authority: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


def smtp_relay(port: int, **options: Any) -> SmtpRelay:
    relay = build_relay(
        # a long timeout unless a test is about timeouts: the server is local, only slow when the machine is
        SmtpConfig(**{"host": "127.0.0.1", "port": port, "timeout_s": 30.0, "tls": "off", **options})
    )
    assert isinstance(relay, SmtpRelay)
    return relay


async def test_smtp_delivers_the_message_as_is_with_its_envelope() -> None:
    handler = Recorder()
    email = make_email()
    with smtp_server(handler) as port:
        relay = smtp_relay(port)
        try:
            esp_id = await relay.attempt(email)
        finally:
            await relay.close()

    assert esp_id == "4QX7Z1"  # the queue id from "250 2.0.0 Ok: queued as 4QX7Z1"
    [received] = handler.received
    assert received.mail_from == "bounces@shop.example"
    assert received.rcpt_tos == ["ada@example.com"]
    assert not received.tls
    assert received.login is None
    delivered = message_from_bytes(received.content, policy=policy.default)
    for name, value in UNSUBSCRIBE.items():
        assert delivered[name].strip() == value  # (the test's own MIME folds the long one)
    assert delivered["Message-ID"] == email.message_id
    assert delivered["Reply-To"] == "help@shop.example"
    assert delivered.get_content_type() == "multipart/alternative"
    assert received.content.replace(b"\r\n", b"\n") == email.mime.replace(b"\r\n", b"\n")


async def test_smtp_without_a_queue_id_answers_the_message_id() -> None:
    handler = Recorder(data_replies=["250 OK"])
    email = make_email()
    with smtp_server(handler) as port:
        relay = smtp_relay(port)
        try:
            assert await relay.attempt(email) == email.message_id
        finally:
            await relay.close()


async def test_smtp_starttls_and_auth(server_tls: ssl.SSLContext, ca_file: str) -> None:
    handler = Recorder()
    options: dict[str, Any] = {"tls_context": server_tls, "require_starttls": True, "auth_required": True}
    with smtp_server(handler, authenticator=authenticator, **options) as port:
        relay = smtp_relay(
            port, tls="starttls", ca_file=ca_file, username="relay-user", password="relay-secret"
        )
        try:
            await relay.attempt(make_email())
        finally:
            await relay.close()

    [received] = handler.received
    assert received.tls
    assert received.login == b"relay-user"


async def test_smtp_opportunistic_starttls_upgrades_when_offered(
    server_tls: ssl.SSLContext, ca_file: str
) -> None:
    handler = Recorder()
    with smtp_server(handler, tls_context=server_tls) as port:
        relay = smtp_relay(port, tls="opportunistic", ca_file=ca_file)
        try:
            await relay.attempt(make_email())
        finally:
            await relay.close()
    assert handler.received[0].tls


async def test_smtp_implicit_tls(server_tls: ssl.SSLContext, ca_file: str) -> None:
    handler = Recorder()
    with smtp_server(handler, ssl_context=server_tls) as port:
        relay = smtp_relay(port, tls="implicit", ca_file=ca_file)
        try:
            await relay.attempt(make_email())
        finally:
            await relay.close()
    assert handler.received[0].tls


async def test_smtp_wrong_password_is_permanent(server_tls: ssl.SSLContext, ca_file: str) -> None:
    handler = Recorder()
    options: dict[str, Any] = {"tls_context": server_tls, "require_starttls": True, "auth_required": True}
    with smtp_server(handler, authenticator=authenticator, **options) as port:
        relay = retrying(
            smtp_relay(port, tls="starttls", ca_file=ca_file, username="relay-user", password="wrong")
        )
        try:
            with pytest.raises(PermanentFailure) as refused:
                await relay.send(make_email())
        finally:
            await relay.close()
    assert refused.value.attempts == 1
    assert "535" in refused.value.reason
    assert handler.received == []


async def test_smtp_required_starttls_not_offered_is_permanent() -> None:
    handler = Recorder()
    with smtp_server(handler) as port:
        relay = smtp_relay(port, tls="starttls")
        try:
            with pytest.raises(PermanentFailure, match="STARTTLS"):
                await relay.attempt(make_email())
        finally:
            await relay.close()
    assert handler.received == []


async def test_smtp_certificate_from_an_unknown_ca_is_refused(server_tls: ssl.SSLContext) -> None:
    handler = Recorder()
    with smtp_server(handler, tls_context=server_tls, require_starttls=True) as port:
        relay = smtp_relay(port, tls="starttls")  # the system CAs do not know trustme's
        try:
            with pytest.raises(PermanentFailure, match="certificate"):
                await relay.attempt(make_email())
        finally:
            await relay.close()
    assert handler.received == []


async def test_smtp_451_then_250_is_one_delivery_on_the_second_attempt() -> None:
    handler = Recorder(data_replies=["451 4.3.0 Mail server temporarily rejected message"])
    email = make_email()
    with smtp_server(handler) as port:
        relay = retrying(smtp_relay(port))
        try:
            accepted = await relay.send(email)
        finally:
            await relay.close()
    assert accepted.attempts == 2
    assert accepted.esp_message_id == "4QX7Z1"
    assert len(handler.received) == 1


async def test_smtp_451_is_transient_with_the_server_text() -> None:
    handler = Recorder(data_replies=["451 4.3.0 Mail server temporarily rejected message"])
    with smtp_server(handler) as port:
        relay = smtp_relay(port)
        try:
            with pytest.raises(TransientFailure, match=r"451 4\.3\.0 Mail server temporarily rejected"):
                await relay.attempt(make_email())
        finally:
            await relay.close()


async def test_smtp_550_is_permanent_and_not_retried() -> None:
    handler = Recorder(rcpt_reply="550 5.1.1 <refused@example.com>: Recipient address rejected: User unknown")
    with smtp_server(handler) as port:
        smtp = smtp_relay(port)
        relay = retrying(smtp)
        try:
            with pytest.raises(PermanentFailure) as refused:
                await relay.send(make_email(to="refused@example.com"))
            # the refusal ended the transaction (RSET), not the connection
            await relay.send(make_email("another-key"))
        finally:
            await relay.close()
    assert refused.value.attempts == 1
    assert handler.refused == 1
    assert "550 5.1.1" in refused.value.reason
    assert "User unknown" in refused.value.reason
    assert len(handler.received) == 1
    assert smtp.connections_opened == 1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_smtp_server_down_then_up() -> None:
    port = free_port()
    smtp = smtp_relay(port)
    relay = retrying(smtp)
    handler = Recorder()
    try:
        with pytest.raises(TransientFailure, match=r"Connection refused|connect"):
            await smtp.attempt(make_email())
        with smtp_server(handler, port=port):
            accepted = await relay.send(make_email())
    finally:
        await relay.close()
    assert accepted.attempts == 1
    assert len(handler.received) == 1


async def test_smtp_reuses_one_connection() -> None:
    handler = Recorder()
    with smtp_server(handler) as port:
        smtp = smtp_relay(port)
        try:
            await smtp.attempt(make_email("key-1"))
            await smtp.attempt(make_email("key-2"))
        finally:
            await smtp.close()
    assert len(handler.received) == 2
    assert len({received.peer for received in handler.received}) == 1
    assert smtp.connections_opened == 1


async def test_smtp_reconnects_when_the_server_dropped_the_connection() -> None:
    handler = Recorder()
    port = free_port()
    smtp = smtp_relay(port)
    try:
        with smtp_server(handler, port=port):
            await smtp.attempt(make_email("key-1"))
        # the server that held the kept connection is gone; a new one has its port
        with smtp_server(handler, port=port):
            await smtp.attempt(make_email("key-2"))
    finally:
        await smtp.close()
    assert len(handler.received) == 2
    assert smtp.connections_opened == 2


async def test_smtp_idle_timeout_at_mail_is_retried_on_a_new_connection_within_the_attempt() -> None:
    # the server dropped the kept connection while it was idle, saying so at MAIL:
    # nothing of the message went out, so a fresh connection may try at once
    handler = Recorder(mail_replies=["250 OK", "421 4.4.2 mail.shop.example Error: timeout exceeded"])
    with smtp_server(handler) as port:
        smtp = smtp_relay(port)
        try:
            await smtp.attempt(make_email("key-1"))
            await smtp.attempt(make_email("key-2"))
        finally:
            await smtp.close()
    assert len(handler.received) == 2
    assert smtp.connections_opened == 2


async def test_smtp_421_on_a_new_connection_is_transient() -> None:
    handler = Recorder(mail_replies=["421 4.3.2 Service shutting down"])
    with smtp_server(handler) as port:
        smtp = smtp_relay(port)
        try:
            with pytest.raises(TransientFailure, match=r"421 4\.3\.2 Service shutting down"):
                await smtp.attempt(make_email())
        finally:
            await smtp.close()
    assert handler.received == []


async def test_smtp_concurrent_sends_share_a_small_pool() -> None:
    handler = Recorder()
    with smtp_server(handler) as port:
        smtp = smtp_relay(port, pool_size=2)
        try:
            await asyncio.gather(*(smtp.attempt(make_email(f"key-{n}")) for n in range(10)))
        finally:
            await smtp.close()
    assert len(handler.received) == 10
    assert smtp.connections_opened <= 2


async def test_smtp_no_reply_to_the_end_of_data_is_uncertain_and_not_retried() -> None:
    """The whole message went out; the server never said whether it queued it."""

    class Silent(Recorder):
        async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
            self.received.append(Received(str(envelope.mail_from), [], b"", session.peer, False, None))
            await asyncio.sleep(2)  # past the relay's timeout
            return "250 OK"

    handler = Silent()
    with smtp_server(handler) as port:
        relay = RetryingRelay(smtp_relay(port, timeout_s=0.3), policy=FAST)
        try:
            with pytest.raises(UncertainFailure, match="no reply to the end of DATA"):
                await relay.send(make_email())
        finally:
            await relay.close()
    assert len(handler.received) == 1


async def test_smtp_silent_server_times_out_as_transient() -> None:
    async def never_greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # holds the connection open, says nothing
        writer.close()

    server = await asyncio.start_server(never_greet, "127.0.0.1", 0)
    smtp = smtp_relay(server.sockets[0].getsockname()[1], timeout_s=0.3)
    try:
        with pytest.raises(TransientFailure, match="Timed out"):
            await smtp.attempt(make_email())
    finally:
        await smtp.close()
        server.close()
        await server.wait_closed()


# --- HTTP ESPs --------------------------------------------------------------------


@dataclass
class Captured:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    form: dict[str, Any] | None
    peer: Any


Answer = tuple[int, dict[str, str], bytes]


@dataclass
class FakeEsp:
    """Answers each request with the next scripted answer, then with ``success``."""

    success: Answer
    script: list[Answer] = field(default_factory=list)
    requests: list[Captured] = field(default_factory=list)
    accepted: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        form: dict[str, Any] | None = None
        body = b""
        if request.content_type == "multipart/form-data":
            form = {}
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                assert isinstance(part, BodyPartReader)
                form[part.name or ""] = (part.filename, part.headers.get("Content-Type"), await part.read())
        else:
            body = await request.read()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.requests.append(
            Captured(request.method, request.raw_path, dict(request.headers), body, form, peer)
        )
        status, headers, payload = self.script.pop(0) if self.script else self.success
        if 200 <= status < 300:
            self.accepted += 1
        return web.Response(status=status, headers=headers, body=payload)


@asynccontextmanager
async def http_server(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def json_answer(status: int, document: object, **headers: str) -> Answer:
    return status, {"Content-Type": "application/json", **headers}, msgspec.json.encode(document)


def as_json(captured: Captured) -> Any:
    return msgspec.json.decode(captured.body)


@dataclass(frozen=True)
class Esp:
    """One ESP as the tests see it."""

    name: str
    config: Callable[[str], RelayConfig]
    path: str
    success: Answer
    message_id: str
    refusal: Answer
    reason: str
    check: Callable[[Captured, OutgoingEmail], None]


def check_sendgrid(request: Captured, email: OutgoingEmail) -> None:
    assert request.headers["Authorization"] == "Bearer SG.test-key"
    assert request.headers["Content-Type"] == "application/json"
    body = as_json(request)
    assert body["personalizations"] == [{"to": [{"email": "ada@example.com", "name": "Ada"}]}]
    assert body["from"] == {"email": "shop@shop.example", "name": "Shop"}
    assert body["reply_to"] == {"email": "help@shop.example"}
    assert body["subject"] == email.subject
    assert body["content"] == [
        {"type": "text/plain", "value": email.text},
        {"type": "text/html", "value": email.html},
    ]
    assert body["headers"] == UNSUBSCRIBE
    assert body["custom_args"] == {"idempotency_key": email.idempotency_key}


def check_postmark(request: Captured, email: OutgoingEmail) -> None:
    assert request.headers["X-Postmark-Server-Token"] == "pm-server-token"
    assert request.headers["Accept"] == "application/json"
    body = as_json(request)
    assert body == {
        "From": "Shop <shop@shop.example>",
        "To": "Ada <ada@example.com>",
        "ReplyTo": "help@shop.example",
        "Subject": email.subject,
        "HtmlBody": email.html,
        "TextBody": email.text,
        "MessageStream": "broadcast",
        "Headers": [{"Name": name, "Value": value} for name, value in UNSUBSCRIBE.items()],
        "Metadata": {"idempotency_key": email.idempotency_key},
    }


def check_mailgun(request: Captured, email: OutgoingEmail) -> None:
    assert request.headers["Authorization"] == "Basic " + base64.b64encode(b"api:mg-key").decode()
    assert request.headers["Content-Type"].startswith("multipart/form-data")
    assert request.form is not None
    assert request.form["to"][2] == b"ada@example.com"
    filename, content_type, content = request.form["message"]
    assert filename == "message.mime"
    assert content_type == "message/rfc822"
    assert content == email.mime
    assert request.form["v:idempotency_key"][2] == email.idempotency_key.encode()


def check_resend(request: Captured, email: OutgoingEmail) -> None:
    assert request.headers["Authorization"] == "Bearer re_test"
    assert request.headers["Idempotency-Key"] == email.idempotency_key
    body = as_json(request)
    assert body == {
        "from": "Shop <shop@shop.example>",
        "to": ["Ada <ada@example.com>"],
        "subject": email.subject,
        "html": email.html,
        "text": email.text,
        "reply_to": ["help@shop.example"],
        "headers": UNSUBSCRIBE,
    }


SES_AUTHORIZATION = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/(?P<day>\d{8})/eu-west-1/ses/aws4_request, "
    r"SignedHeaders=(?P<signed>[a-z0-9;-]+), Signature=(?P<signature>[0-9a-f]{64})$"
)


def expected_signature(request: Captured, secret: str) -> str:
    """SigV4 recomputed from what arrived on the wire, written out here apart from
    the relay's own signer so that a header signed but sent differently shows."""
    match = SES_AUTHORIZATION.match(request.headers["Authorization"])
    assert match is not None
    headers = {name.lower(): value for name, value in request.headers.items()}
    names = match["signed"].split(";")
    canonical = "\n".join(
        [
            request.method,
            request.path,
            "",
            "".join(f"{name}:{' '.join(headers[name].split())}\n" for name in names),
            match["signed"],
            hashlib.sha256(request.body).hexdigest(),
        ]
    )
    scope = f"{match['day']}/eu-west-1/ses/aws4_request"
    to_sign = f"AWS4-HMAC-SHA256\n{headers['x-amz-date']}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    key = ("AWS4" + secret).encode()
    for part in (match["day"], "eu-west-1", "ses", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def check_ses(request: Captured, email: OutgoingEmail) -> None:
    match = SES_AUTHORIZATION.match(request.headers["Authorization"])
    assert match is not None, request.headers["Authorization"]
    assert match["signed"] == "content-type;host;x-amz-date"
    assert re.fullmatch(r"\d{8}T\d{6}Z", request.headers["X-Amz-Date"])
    assert request.headers["X-Amz-Date"].startswith(match["day"])
    assert match["signature"] == expected_signature(request, "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
    body = as_json(request)
    assert body == {
        "FromEmailAddress": "bounces@shop.example",
        "Destination": {"ToAddresses": ["ada@example.com"]},
        "Content": {"Raw": {"Data": base64.b64encode(email.mime).decode()}},
        "ConfigurationSetName": "marketing",
    }


ESPS = [
    Esp(
        name="sendgrid",
        config=lambda url: SendGridConfig(api_key="SG.test-key", base_url=url),
        path="/v3/mail/send",
        success=(202, {"X-Message-Id": "sg-14c5d75ce93"}, b""),
        message_id="sg-14c5d75ce93",
        refusal=json_answer(
            400,
            {
                "errors": [
                    {
                        "message": "The from address does not match a verified Sender Identity.",
                        "field": "from",
                        "help": None,
                    }
                ]
            },
        ),
        reason="from: The from address does not match a verified Sender Identity.",
        check=check_sendgrid,
    ),
    Esp(
        name="postmark",
        config=lambda url: PostmarkConfig(
            server_token="pm-server-token", base_url=url, message_stream="broadcast"
        ),
        path="/email",
        success=json_answer(
            200,
            {
                "To": "ada@example.com",
                "SubmittedAt": "2026-01-01T10:00:00Z",
                "MessageID": "b7bc2f4a-e38e-4336-af7d-e6c392c2f817",
                "ErrorCode": 0,
                "Message": "OK",
            },
        ),
        message_id="b7bc2f4a-e38e-4336-af7d-e6c392c2f817",
        refusal=json_answer(
            422,
            {
                "ErrorCode": 406,
                "Message": "You tried to send to recipient(s) that have been marked as inactive.",
            },
        ),
        reason="ErrorCode 406: You tried to send to recipient(s) that have been marked as inactive.",
        check=check_postmark,
    ),
    Esp(
        name="mailgun",
        config=lambda url: MailgunConfig(api_key="mg-key", domain="mg.shop.example", base_url=url),
        path="/v3/mg.shop.example/messages.mime",
        success=json_answer(
            200, {"id": "<20260101100000.1.ABCDEF@mg.shop.example>", "message": "Queued. Thank you."}
        ),
        message_id="20260101100000.1.ABCDEF@mg.shop.example",
        refusal=json_answer(
            400, {"message": "to parameter is not a valid address. please check documentation"}
        ),
        reason="to parameter is not a valid address",
        check=check_mailgun,
    ),
    Esp(
        name="resend",
        config=lambda url: ResendConfig(api_key="re_test", base_url=url),
        path="/emails",
        success=json_answer(200, {"id": "49a3999c-0ce1-4ea6-ab68-afcd6dc2e794"}),
        message_id="49a3999c-0ce1-4ea6-ab68-afcd6dc2e794",
        refusal=json_answer(
            422,
            {"statusCode": 422, "name": "validation_error", "message": "Invalid `to` field."},
        ),
        reason="validation_error: Invalid `to` field.",
        check=check_resend,
    ),
    Esp(
        name="ses",
        config=lambda url: SesConfig(
            region="eu-west-1",
            access_key_id="AKIDEXAMPLE",
            secret_access_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            base_url=url,
            configuration_set="marketing",
        ),
        path="/v2/email/outbound-emails",
        success=json_answer(200, {"MessageId": "0102018c1f6a-9a8b7c6d-000000"}),
        message_id="0102018c1f6a-9a8b7c6d-000000",
        refusal=json_answer(
            400,
            {
                "message": "Email address is not verified. The following identities failed the check: shop@shop.example"
            },
            **{"X-Amzn-ErrorType": "MessageRejected:http://internal.amazon.com/coral/com.amazon.ses/"},
        ),
        reason="MessageRejected: Email address is not verified.",
        check=check_ses,
    ),
]


@pytest.fixture(params=ESPS, ids=[esp.name for esp in ESPS])
def esp(request: pytest.FixtureRequest) -> Esp:
    spec: Esp = request.param
    return spec


async def test_http_esp_request_shape(esp: Esp) -> None:
    fake = FakeEsp(esp.success)
    email = make_email()
    async with http_server(fake.handle) as url:
        relay = build_relay(esp.config(url))
        try:
            assert relay.name == esp.name
            assert await relay.attempt(email) == esp.message_id
        finally:
            await relay.close()
    [request] = fake.requests
    assert request.method == "POST"
    assert request.path == esp.path
    esp.check(request, email)


async def test_http_esp_429_and_503_then_accepted_once(esp: Esp) -> None:
    fake = FakeEsp(
        esp.success,
        script=[
            json_answer(429, {"message": "Too many requests"}, **{"Retry-After": "0"}),
            (503, {"Content-Type": "text/plain"}, b"Service Unavailable"),
        ],
    )
    email = make_email()
    async with http_server(fake.handle) as url:
        relay = RetryingRelay(build_relay(esp.config(url)), policy=FAST)
        try:
            accepted = await relay.send(email)
        finally:
            await relay.close()
    assert accepted.esp_message_id == esp.message_id
    assert accepted.attempts == 3
    assert fake.accepted == 1
    assert len(fake.requests) == 3
    for request in fake.requests:
        esp.check(request, email)  # every retry is the same request


async def test_http_esp_refusal_is_permanent_with_the_esp_reason(esp: Esp) -> None:
    fake = FakeEsp(esp.success, script=[esp.refusal])
    async with http_server(fake.handle) as url:
        relay = RetryingRelay(build_relay(esp.config(url)), policy=FAST)
        try:
            with pytest.raises(PermanentFailure) as refused:
                await relay.send(make_email())
        finally:
            await relay.close()
    assert refused.value.attempts == 1
    assert esp.reason in refused.value.reason
    assert len(fake.requests) == 1


async def test_http_esp_reuses_its_connection(esp: Esp) -> None:
    fake = FakeEsp(esp.success)
    async with http_server(fake.handle) as url:
        relay = build_relay(esp.config(url))
        try:
            await relay.attempt(make_email("key-1"))
            await relay.attempt(make_email("key-2"))
        finally:
            await relay.close()
    assert len(fake.requests) == 2
    assert fake.requests[0].peer == fake.requests[1].peer


async def test_http_esp_down_is_transient(esp: Esp) -> None:
    relay = build_relay(esp.config(f"http://127.0.0.1:{free_port()}"))
    try:
        with pytest.raises(TransientFailure):
            await relay.attempt(make_email())
    finally:
        await relay.close()


async def test_http_esp_slow_answer_is_uncertain_and_resent_only_with_our_key(esp: Esp) -> None:
    """The request went out and no answer came: the ESP may have the message.
    Only an ESP that drops a second copy by our idempotency key is tried again."""
    release = asyncio.Event()
    requests = 0

    async def slow(request: web.Request) -> web.Response:
        nonlocal requests
        requests += 1
        await release.wait()
        return web.Response(status=500)

    async with http_server(slow) as url:
        relay = RetryingRelay(
            build_relay(msgspec.structs.replace(esp.config(url), timeout_s=0.2)), policy=FAST
        )
        try:
            if relay.idempotent:
                with pytest.raises(TransientFailure, match="Timeout"):
                    await relay.send(make_email())
                assert requests == FAST.attempts
            else:
                with pytest.raises(UncertainFailure, match=r"Timeout.*after the request went out"):
                    await relay.send(make_email())
                assert requests == 1
        finally:
            release.set()
            await relay.close()


async def test_http_esp_fresh_connection_lost_before_the_answer_is_uncertain(esp: Esp) -> None:
    requests = 0

    async def hang_up(request: web.Request) -> web.Response:
        nonlocal requests
        requests += 1
        await request.read()
        assert request.transport is not None
        request.transport.abort()  # took the whole request, never answered
        return web.Response(status=500)

    async with http_server(hang_up) as url:
        relay = RetryingRelay(build_relay(esp.config(url)), policy=FAST)
        try:
            failure = TransientFailure if relay.idempotent else UncertainFailure
            with pytest.raises(failure, match="ServerDisconnectedError"):
                await relay.send(make_email())
        finally:
            await relay.close()
    assert requests == (FAST.attempts if relay.idempotent else 1)


async def test_resend_sends_the_same_idempotency_key_on_every_try() -> None:
    fake = FakeEsp(
        json_answer(200, {"id": "re-1"}),
        script=[
            json_answer(
                409,
                {
                    "statusCode": 409,
                    "name": "concurrent_idempotent_requests",
                    "message": "Same idempotency key used while original request is still in progress.",
                },
            ),
            (500, {}, b""),
        ],
    )
    email = make_email("user-7/abandoned-cart/1/cart-42")
    async with http_server(fake.handle) as url:
        relay = RetryingRelay(build_relay(ResendConfig(api_key="re_test", base_url=url)), policy=FAST)
        try:
            assert relay.idempotent
            accepted = await relay.send(email)
        finally:
            await relay.close()
    assert accepted.esp_message_id == "re-1"
    assert [request.headers["Idempotency-Key"] for request in fake.requests] == [email.idempotency_key] * 3


async def test_resend_same_key_other_payload_is_permanent() -> None:
    refusal = json_answer(
        409,
        {
            "statusCode": 409,
            "name": "invalid_idempotent_request",
            "message": "Same idempotency key used with a different request payload.",
        },
    )
    fake = FakeEsp(json_answer(200, {"id": "re-1"}), script=[refusal])
    async with http_server(fake.handle) as url:
        relay = build_relay(ResendConfig(api_key="re_test", base_url=url))
        try:
            with pytest.raises(PermanentFailure, match="invalid_idempotent_request"):
                await relay.attempt(make_email())
        finally:
            await relay.close()


async def test_postmark_maintenance_error_code_is_transient() -> None:
    fake = FakeEsp(
        json_answer(200, {"MessageID": "pm-1", "ErrorCode": 0, "Message": "OK"}),
        script=[json_answer(422, {"ErrorCode": 100, "Message": "Maintenance"})],
    )
    async with http_server(fake.handle) as url:
        relay = build_relay(PostmarkConfig(server_token="t", base_url=url))
        try:
            with pytest.raises(TransientFailure, match="ErrorCode 100"):
                await relay.attempt(make_email())
            assert await relay.attempt(make_email()) == "pm-1"
        finally:
            await relay.close()


async def test_ses_throttling_is_transient_and_bad_credentials_permanent() -> None:
    throttled = json_answer(
        400, {"message": "Maximum sending rate exceeded."}, **{"X-Amzn-ErrorType": "ThrottlingException"}
    )
    forbidden = json_answer(
        403,
        {"message": "The security token included in the request is invalid."},
        **{"X-Amzn-ErrorType": "UnrecognizedClientException"},
    )
    fake = FakeEsp(json_answer(200, {"MessageId": "m"}), script=[throttled, forbidden])
    config = SesConfig(
        region="eu-west-1", access_key_id="AKIDEXAMPLE", secret_access_key="secret", base_url=""
    )
    async with http_server(fake.handle) as url:
        relay = build_relay(msgspec.structs.replace(config, base_url=url))
        try:
            with pytest.raises(TransientFailure, match="ThrottlingException: Maximum sending rate"):
                await relay.attempt(make_email())
            with pytest.raises(PermanentFailure, match="UnrecognizedClientException"):
                await relay.attempt(make_email())
        finally:
            await relay.close()


async def test_ses_session_token_is_sent_and_signed() -> None:
    fake = FakeEsp(json_answer(200, {"MessageId": "m-1"}))
    async with http_server(fake.handle) as url:
        config = SesConfig(
            region="eu-west-1",
            access_key_id="AKIDEXAMPLE",
            secret_access_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            session_token="FwoGZXIvYXdzEXAMPLE",
            base_url=url,
        )
        relay = build_relay(config)
        try:
            assert await relay.attempt(make_email()) == "m-1"
        finally:
            await relay.close()
    [request] = fake.requests
    assert request.headers["X-Amz-Security-Token"] == "FwoGZXIvYXdzEXAMPLE"
    match = SES_AUTHORIZATION.match(request.headers["Authorization"])
    assert match is not None
    assert match["signed"] == "content-type;host;x-amz-date;x-amz-security-token"
    assert match["signature"] == expected_signature(request, config.secret_access_key)


# --- outbox -----------------------------------------------------------------------


async def test_outbox_writes_one_file_per_key(tmp_path: Path) -> None:
    directory = tmp_path / "outbox"
    relay = build_relay(OutboxConfig(directory=directory))
    assert isinstance(relay, OutboxRelay)
    first = make_email("u1:abandoned-cart:1:cart-9")
    second = make_email("u2:abandoned-cart:1:cart-3")

    assert await relay.attempt(first) == first.message_id
    assert await relay.attempt(second) == second.message_id
    assert await relay.attempt(dataclasses.replace(first, mime=b"changed")) == first.message_id
    await relay.close()

    files = sorted(path.name for path in directory.iterdir())
    assert files == ["u1%3Aabandoned-cart%3A1%3Acart-9.eml", "u2%3Aabandoned-cart%3A1%3Acart-3.eml"]
    assert relay.path_for(first).read_bytes() == first.mime  # the second write of the key changed nothing
    written = message_from_bytes(relay.path_for(first).read_bytes(), policy=policy.default)
    assert written["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


async def test_outbox_concurrent_writes_of_one_key_make_one_file(tmp_path: Path) -> None:
    relay = build_relay(OutboxConfig(directory=tmp_path))
    email = make_email("same-key")
    results = await asyncio.gather(*(relay.attempt(email) for _ in range(8)))
    assert set(results) == {email.message_id}
    assert [path.name for path in tmp_path.iterdir()] == ["same-key.eml"]


async def test_outbox_keys_cannot_leave_the_folder(tmp_path: Path) -> None:
    directory = tmp_path / "outbox"
    relay = build_relay(OutboxConfig(directory=directory))
    await relay.attempt(make_email("../../etc/passwd"))
    await relay.attempt(make_email(".hidden"))
    assert sorted(path.name for path in tmp_path.rglob("*") if path.is_file()) == [
        "%2E.%2F..%2Fetc%2Fpasswd.eml",  # no "/" left, no leading dot
        "%2Ehidden.eml",
    ]


async def test_outbox_unwritable_folder_is_permanent(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the folder should be")
    relay = build_relay(OutboxConfig(directory=blocker / "outbox"))
    with pytest.raises(PermanentFailure, match="outbox"):
        await relay.attempt(make_email())
