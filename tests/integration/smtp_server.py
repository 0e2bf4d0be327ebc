"""A real SMTP server for tests: aiosmtpd on 127.0.0.1, in its own thread,
collecting what it receives."""

from __future__ import annotations

import email
import email.policy
import socket
import threading
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class ClosingController(Controller):
    """aiosmtpd's threaded controller, closing its client connections at stop.

    aiosmtpd stops and closes its loop with client connections still open, and on
    Python 3.11 nothing closes their sockets: one garbage-collected later fails
    whichever test is running with a ResourceWarning."""

    def __init__(self, handler: Any, **options: Any) -> None:
        super().__init__(handler, **options)
        self.sessions: list[SMTP] = []

    def factory(self) -> SMTP:
        session: SMTP = super().factory()  # type: ignore[no-untyped-call]
        self.sessions.append(session)
        return session

    def cancel_tasks(self, stop_loop: bool = True) -> None:
        # runs on the server's loop at stop; the loop runs once more after it, which
        # is when each aborted transport closes its socket (the raw one under STARTTLS too)
        for session in self.sessions:
            for transport in (session._original_transport, session.transport):
                if transport is not None and not transport.is_closing():
                    transport.abort()  # type: ignore[attr-defined]
        super().cancel_tasks(stop_loop)


@dataclass
class Inbox:
    messages: list[EmailMessage] = field(default_factory=list)
    envelopes: list[tuple[str, list[str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        with self.lock:
            self.messages.append(parsed)
            self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 2.0.0 Ok: queued as TEST"

    def wait_for(self, count: int, timeout: float = 10.0) -> list[EmailMessage]:
        """Block (in a thread) until ``count`` messages arrived; return them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            time.sleep(0.01)
        with self.lock:
            raise AssertionError(f"expected {count} messages, got {len(self.messages)}")


class SmtpServer:
    def __init__(self, port: int = 0) -> None:
        self.port = port or free_port()
        self.inbox = Inbox()
        self._controller: Controller | None = None

    def start(self) -> None:
        self._controller = ClosingController(self.inbox, hostname="127.0.0.1", port=self.port)
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None
