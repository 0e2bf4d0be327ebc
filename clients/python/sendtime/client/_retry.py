"""Retrying transient failures: only UNAVAILABLE, with exponential backoff and
jitter, and never past the call's deadline.

Retrying is safe for every call the client makes: ingest calls carry message
ids the server de-duplicates by, and profile reads change nothing.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
import grpc.aio

from sendtime.client._errors import SendtimeError, Unavailable, error_from_rpc

T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How to back off between attempts. The n-th retry waits
    ``min(max_backoff, initial_backoff * multiplier**n)``, spread by
    ``±jitter`` so that many clients do not retry in step."""

    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.2
    #: Attempts per unary call, the first included; 1 turns retries off.
    #: The call's deadline bounds them in any case.
    max_attempts: int = 10

    def __post_init__(self) -> None:
        if self.initial_backoff <= 0 or self.max_backoff < self.initial_backoff:
            raise ValueError("need 0 < initial_backoff <= max_backoff")
        if self.multiplier < 1:
            raise ValueError("multiplier must be at least 1")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (counting from 0)."""
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier ** min(retry, 64))
        return ceiling * random.uniform(1 - self.jitter, 1 + self.jitter)


def _give_up(error: SendtimeError, policy: RetryPolicy, retry: int, delay: float, deadline: float) -> bool:
    return (
        not isinstance(error, Unavailable)
        or retry + 1 >= policy.max_attempts
        or time.monotonic() + delay >= deadline
    )


async def retry_async(attempt: Callable[[float], Awaitable[T]], budget: float, policy: RetryPolicy) -> T:
    """Run ``attempt(seconds_left)`` until it succeeds, fails for good, or the
    deadline ``budget`` seconds from now would pass during the next wait."""
    deadline = time.monotonic() + budget
    retry = 0
    while True:
        try:
            return await attempt(max(deadline - time.monotonic(), 0.0))
        except grpc.aio.AioRpcError as exc:
            error = error_from_rpc(exc)
            delay = policy.backoff(retry)
            if _give_up(error, policy, retry, delay, deadline):
                raise error from exc
        await asyncio.sleep(delay)
        retry += 1


def retry_sync(attempt: Callable[[float], T], budget: float, policy: RetryPolicy) -> T:
    """``retry_async`` for blocking calls."""
    deadline = time.monotonic() + budget
    retry = 0
    while True:
        try:
            return attempt(max(deadline - time.monotonic(), 0.0))
        except grpc.RpcError as exc:
            error = error_from_rpc(exc)
            delay = policy.backoff(retry)
            if _give_up(error, policy, retry, delay, deadline):
                raise error from exc
        time.sleep(delay)
        retry += 1
