"""SMTP relay: the finished MIME message sent as is, with the envelope sender
and recipient, over a few kept-open connections.

Connections are reused: a small pool (``pool_size``) of connected clients,
each used by one send at a time. A connection found closed, or idle longer
than ``max_idle_s``, is replaced; one that turns out to have been dropped
while idle (the first command, MAIL, fails to go through) is replaced once
within the same attempt, which is safe because nothing of the message was
sent. Any other failure ends the attempt: SMTP 4xx and connection trouble are
transient, 5xx permanent, with the server's reply text as the reason.

The ESP message id is the queue id from the server's reply to DATA where it
names one (Postfix "queued as ...", Exim "id=...", Sendmail, Amazon SES), and
the Message-ID otherwise. SMTP has no idempotency key: a connection lost, or a
timeout, after the end-of-data line went out but before the server's answer
leaves its fate unknown, so that attempt is uncertain and is not retried (a
retry could deliver it twice); the ledger marks the send uncertain.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import time
from contextlib import suppress
from dataclasses import dataclass
from typing import Final

import aiosmtplib

from sendtime.server.relay._addresses import bare_address
from sendtime.server.relay.base import (
    OutgoingEmail,
    PermanentFailure,
    RelayFailure,
    TransientFailure,
    UncertainFailure,
)
from sendtime.server.relay.config import SmtpConfig

_START_TLS: Final[dict[str, bool | None]] = {
    "starttls": True,
    "opportunistic": None,
    "implicit": False,
    "off": False,
}
_LINE_ENDINGS: Final = re.compile(rb"\r\n|\r|\n")
_QUEUE_ID_PATTERNS: Final = (
    re.compile(r"\bqueued as ([^\s;,]+)", re.IGNORECASE),  # Postfix
    re.compile(r"\bid=([^\s;,]+)", re.IGNORECASE),  # Exim
    re.compile(r"^(?:\d\.\d+\.\d+\s+)?(\S+) Message accepted for delivery", re.IGNORECASE),  # Sendmail
    re.compile(r"^(?:\d\.\d+\.\d+\s+)?Ok:?\s+([0-9a-f][0-9a-f-]{15,})\s*$", re.IGNORECASE),  # Amazon SES
)


def queue_id(reply: str) -> str | None:
    """The queue id a server's reply to DATA names, if it names one."""
    for pattern in _QUEUE_ID_PATTERNS:
        match = pattern.search(reply)
        if match:
            return match.group(1)
    return None


def failure_for(error: BaseException) -> RelayFailure:
    """The failure an aiosmtplib error (or a socket error) stands for."""
    if isinstance(error, aiosmtplib.SMTPRecipientsRefused) and error.recipients:
        error = error.recipients[0]
    if isinstance(error, aiosmtplib.SMTPResponseException):
        reason = f"smtp: {error.code} {error.message}".strip()
        if 500 <= error.code < 600:
            return PermanentFailure(reason)
        return TransientFailure(reason)
    if isinstance(error, ssl.SSLCertVerificationError):
        # not bad luck but a setup problem (wrong CA, wrong host name)
        return PermanentFailure(
            f"smtp: TLS certificate refused: {getattr(error, 'verify_message', None) or error}"
        )
    if isinstance(
        error, aiosmtplib.SMTPConnectError | aiosmtplib.SMTPServerDisconnected | OSError | TimeoutError
    ):
        return TransientFailure(f"smtp: {type(error).__name__}: {error}")
    # STARTTLS or AUTH required but not offered, an address that cannot be sent:
    # trying again will not change the server or the message
    return PermanentFailure(f"smtp: {type(error).__name__}: {error}")


@dataclass(eq=False)
class _Connection:
    client: aiosmtplib.SMTP
    last_used: float


class _DroppedWhileIdle(Exception):
    """A reused connection failed at MAIL: closed by the server while idle."""

    def __init__(self, failure: RelayFailure) -> None:
        super().__init__(failure.reason)
        self.failure = failure


class _Unanswered(Exception):
    """The message and its end-of-data line went out; the server's reply never came."""


class SmtpRelay:
    name = "smtp"
    idempotent = False

    def __init__(self, config: SmtpConfig) -> None:
        self._config = config
        self._port = config.port or (465 if config.tls == "implicit" else 587)
        self._slots = asyncio.Semaphore(config.pool_size)
        self._idle: list[_Connection] = []
        self._tls_context: ssl.SSLContext | None = None
        self._local_hostname = config.local_hostname
        self._closed = False
        #: Connections opened so far (for tests and metrics).
        self.connections_opened = 0

    async def attempt(self, email: OutgoingEmail) -> str:
        if self._closed:
            raise PermanentFailure("smtp: relay is closed")
        sender = email.envelope_from or bare_address(email.sender)
        recipient = email.envelope_to or bare_address(email.recipient)
        async with self._slots:
            connection = self._take_idle()
            if connection is not None:
                try:
                    reply = await self._send(connection, sender, recipient, email.mime, reused=True)
                except _DroppedWhileIdle:
                    pass  # nothing of the message was sent: a fresh connection may try
                else:
                    return queue_id(reply) or email.message_id
            connection = await self._connect()
            reply = await self._send(connection, sender, recipient, email.mime, reused=False)
        return queue_id(reply) or email.message_id

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        await asyncio.gather(*(self._quit(connection) for connection in idle))

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if connection.client.is_connected and now - connection.last_used <= self._config.max_idle_s:
                return connection
            connection.client.close()
        return None

    def _keep(self, connection: _Connection) -> None:
        if self._closed or not connection.client.is_connected:
            connection.client.close()
            return
        connection.last_used = time.monotonic()
        self._idle.append(connection)

    async def _quit(self, connection: _Connection) -> None:
        with suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
            await connection.client.quit(timeout=min(self._config.timeout_s, 2.0))
        connection.client.close()

    async def _context(self) -> ssl.SSLContext:
        if self._tls_context is None:
            # loading a CA bundle reads files: not on the loop
            self._tls_context = await asyncio.to_thread(_tls_context, self._config)
        return self._tls_context

    async def _connect(self) -> _Connection:
        config = self._config
        if not self._local_hostname:
            # once per relay, not per connection: a reverse lookup can be slow
            self._local_hostname = await asyncio.to_thread(socket.getfqdn)
        client = aiosmtplib.SMTP(
            hostname=config.host,
            port=self._port,
            username=config.username or None,
            password=config.password if config.username else None,
            local_hostname=self._local_hostname,
            timeout=config.timeout_s,
            use_tls=config.tls == "implicit",
            start_tls=_START_TLS[config.tls],
            tls_context=await self._context() if config.tls != "off" else None,
        )
        try:
            await client.connect()
        except (aiosmtplib.SMTPException, OSError, TimeoutError, ValueError) as error:
            client.close()
            raise failure_for(error) from error
        self.connections_opened += 1
        return _Connection(client, time.monotonic())

    async def _send(
        self, connection: _Connection, sender: str, recipient: str, mime: bytes, *, reused: bool
    ) -> str:
        """One mail transaction on ``connection``; the server's reply to DATA.
        Keeps the connection for the next send when it is still good. A reused
        connection that fails at MAIL raises _DroppedWhileIdle."""
        client = connection.client
        stage = "MAIL"
        try:
            options = []
            if client.supports_extension("size"):
                options.append(f"SIZE={len(mime)}")
            if not mime.isascii() and client.supports_extension("8bitmime"):
                options.append("BODY=8BITMIME")
            await client.mail(sender, options=options)
            stage = "RCPT"
            await client.rcpt(recipient)
            stage = "DATA"
            response = await _data(client, mime)
        except _Unanswered as unanswered:
            # the server may have queued it: sending again could make a second email
            error = unanswered.__cause__
            raise UncertainFailure(
                f"smtp: no reply to the end of DATA: {type(error).__name__}: {error}"
            ) from error
        except aiosmtplib.SMTPResponseException as error:
            if stage == "MAIL" and error.code == 421 and reused:
                client.close()  # "closing transmission channel": an idle timeout
                raise _DroppedWhileIdle(failure_for(error)) from error
            await self._reset(connection)
            raise failure_for(error) from error
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as error:
            client.close()
            if stage == "MAIL" and reused:
                raise _DroppedWhileIdle(failure_for(error)) from error
            raise failure_for(error) from error
        except (aiosmtplib.SMTPException, OSError, TimeoutError, ValueError) as error:
            client.close()
            raise failure_for(error) from error
        except BaseException:
            client.close()  # cancelled mid-transaction: the session's state is unknown
            raise
        self._keep(connection)
        return response.message

    async def _reset(self, connection: _Connection) -> None:
        """After a refusal the session is fine but the envelope must go (RSET)."""
        try:
            await connection.client.rset()
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            connection.client.close()
            return
        self._keep(connection)


async def _data(client: aiosmtplib.SMTP, mime: bytes) -> aiosmtplib.SMTPResponse:
    """DATA, then the message and the end-of-data line: aiosmtplib's own
    ``SMTPProtocol.execute_data_command`` step by step (its command lock, and a
    reply marked as expected before each write, so that none is dropped),
    without its two regular-expression passes over the whole message (line
    endings, then leading dots), which cost more than building the message.
    Ours has CRLF line endings already: a count checks that, and a plain
    replace doubles the leading dots. It leans on aiosmtplib internals, so the
    dependency is held to 5.1.x and a test compares the bytes with its own."""
    protocol = client.protocol
    lock = None if protocol is None else protocol._command_lock
    if protocol is None or lock is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    payload = data_payload(mime)
    try:
        async with lock:
            protocol._response_pending = True
            protocol.write(b"DATA\r\n")
            start = await protocol.read_response(timeout=client.timeout)
            if start.code != 354:
                raise aiosmtplib.SMTPDataError(start.code, start.message)
            protocol._response_pending = True
            protocol.write(payload)
            try:
                response = await protocol.read_response(timeout=client.timeout)
            except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError) as error:
                raise _Unanswered from error
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, _Unanswered):
        client.close()  # the session is out of step with the server now
        raise
    if response.code != 250:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    return response


def data_payload(mime: bytes) -> bytes:
    """The message as it goes after DATA (RFC 5321 4.5.2): CRLF line endings,
    a "." that starts a line doubled, and the final ".\r\n"."""
    crlf = mime.count(b"\r\n")
    if mime.count(b"\r") != crlf or mime.count(b"\n") != crlf:
        mime = _LINE_ENDINGS.sub(b"\r\n", mime)
    if not mime.endswith(b"\r\n"):
        mime += b"\r\n"
    stuffed = mime.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


def _tls_context(config: SmtpConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=config.ca_file or None)
    if not config.verify_certs:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
