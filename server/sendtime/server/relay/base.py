"""What every relay to an ESP shares: the message handed over, the two kinds of
failure, and the retry and rate-limit policy around one attempt.

An adapter implements one attempt (``Relay.attempt``) and says what a
failure was: permanent, transient, or uncertain (the message went out and no
answer came back, so the ESP may have taken it). ``RetryingRelay`` retries
transient failures with exponential backoff and jitter, honours Retry-After,
never retries permanent failures, retries uncertain ones only for an ESP that
de-duplicates by our idempotency key, and keeps each adapter under its
configured rate.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Final, Protocol

from aiolimiter import AsyncLimiter
from opentelemetry.trace import SpanKind, StatusCode, Tracer

_MAX_BACKOFF_S: Final = 30.0


@dataclass(frozen=True, slots=True)
class OutgoingEmail:
    """A finished email. ``mime`` is the whole RFC 5322 message (SMTP, the
    outbox and raw APIs send it as is); the fields beside it are for ESP APIs
    that take JSON."""

    #: One per send (user, flow, step, entry key): ESPs that accept an
    #: idempotency key get it, so a retry can never become a second email.
    idempotency_key: str
    message_id: str
    sender: str
    recipient: str
    reply_to: str
    subject: str
    html: str
    text: str
    #: Extra headers the ESP must keep: List-Unsubscribe, List-Unsubscribe-Post, List-ID.
    headers: dict[str, str]
    mime: bytes
    #: The sender's and recipient's bare addresses (for SMTP's envelope).
    envelope_from: str = ""
    envelope_to: str = ""


@dataclass(frozen=True, slots=True)
class Accepted:
    """The ESP took the message."""

    esp_message_id: str
    attempts: int = 1


class RelayFailure(Exception):
    def __init__(self, reason: str, *, attempts: int = 1) -> None:
        super().__init__(reason)
        self.reason = reason
        self.attempts = attempts


class PermanentFailure(RelayFailure):
    """The ESP refused the message for good (bad address, rejected content,
    bad credentials): retrying would not help."""


class TransientFailure(RelayFailure):
    """Worth trying again (429, 5xx, SMTP 4xx, connection errors)."""

    def __init__(self, reason: str, *, retry_after_s: float | None = None, attempts: int = 1) -> None:
        super().__init__(reason, attempts=attempts)
        self.retry_after_s = retry_after_s


class UncertainFailure(RelayFailure):
    """The whole message went out and the ESP never answered (a timeout, or a
    fresh connection lost): it may have taken the message. Like a send left
    ``relaying`` by a crash, another try could make a second email, so it is
    retried only where the ESP de-duplicates by our idempotency key."""


class Relay(Protocol):
    #: The adapter's name, recorded in the delivery ledger ("smtp", "sendgrid", ...).
    name: str
    #: True when the ESP de-duplicates by our idempotency key itself.
    idempotent: bool

    async def attempt(self, email: OutgoingEmail) -> str:
        """One try: the ESP's message id, or PermanentFailure/TransientFailure."""
        ...

    async def close(self) -> None: ...


class AttemptObserver(Protocol):
    def attempted(self, attempt: int, outcome: str, seconds: float) -> None:
        """One try at the ESP: its number (1 for the first), "accepted",
        "transient", "permanent" or "uncertain", and how long it took."""
        ...


@dataclass
class RetryPolicy:
    attempts: int = 4
    base_delay_s: float = 0.2
    max_delay_s: float = 10.0

    def delay(self, attempt: int, retry_after_s: float | None) -> float:
        if retry_after_s is not None:
            return min(retry_after_s, _MAX_BACKOFF_S)
        backoff: float = min(self.base_delay_s * 2.0 ** (attempt - 1), self.max_delay_s)
        return backoff * random.uniform(0.5, 1.0)  # "equal jitter": spread, but never near zero


@dataclass
class RetryingRelay:
    """Retries and rate limit around one adapter."""

    relay: Relay
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    #: Messages per second this adapter may hand over (None: no limit).
    rate_per_s: float | None = None
    #: Told of every try (metrics); None: nobody is.
    observer: AttemptObserver | None = None
    #: A span per try when set.
    tracer: Tracer | None = None
    _limiter: AsyncLimiter | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.rate_per_s:
            # one second's worth of burst; beyond it, callers wait their turn
            self._limiter = AsyncLimiter(max_rate=self.rate_per_s, time_period=1.0)

    @property
    def name(self) -> str:
        return self.relay.name

    @property
    def idempotent(self) -> bool:
        return self.relay.idempotent

    async def send(self, email: OutgoingEmail) -> Accepted:
        attempt = 0
        while True:
            attempt += 1
            if self._limiter is not None:
                await self._limiter.acquire()
            try:
                return Accepted(await self._attempt(email, attempt), attempts=attempt)
            except PermanentFailure as failure:
                failure.attempts = attempt
                raise
            except TransientFailure as failure:
                failure.attempts = attempt
                if attempt >= self.policy.attempts:
                    raise
                await asyncio.sleep(self.policy.delay(attempt, failure.retry_after_s))
            except UncertainFailure as failure:
                failure.attempts = attempt
                if not self.relay.idempotent:
                    raise
                # the ESP drops a second copy with our key: trying again is safe
                if attempt >= self.policy.attempts:
                    raise TransientFailure(failure.reason, attempts=attempt) from failure
                await asyncio.sleep(self.policy.delay(attempt, None))

    async def _attempt(self, email: OutgoingEmail, attempt: int) -> str:
        if self.observer is None and self.tracer is None:
            return await self.relay.attempt(email)
        started = time.perf_counter()
        outcome = "transient"  # also for anything unexpected: the dispatcher retries it later
        try:
            if self.tracer is None:
                esp_message_id = await self.relay.attempt(email)
            else:
                with self.tracer.start_as_current_span(
                    "sendtime.relay.attempt",
                    kind=SpanKind.CLIENT,
                    attributes={"sendtime.relay": self.relay.name, "sendtime.relay.try": attempt},
                ) as span:
                    try:
                        esp_message_id = await self.relay.attempt(email)
                    except RelayFailure as failure:
                        span.set_status(StatusCode.ERROR, failure.reason[:200])
                        raise
            outcome = "accepted"
            return esp_message_id
        except PermanentFailure:
            outcome = "permanent"
            raise
        except UncertainFailure:
            outcome = "uncertain"
            raise
        finally:
            if self.observer is not None:
                self.observer.attempted(attempt, outcome, time.perf_counter() - started)

    async def close(self) -> None:
        await self.relay.close()


def retry_after(header: str | None) -> float | None:
    """Retry-After in seconds (the delta form; an HTTP date is treated as unknown)."""
    if not header:
        return None
    try:
        return max(float(header), 0.0)
    except ValueError:
        return None
