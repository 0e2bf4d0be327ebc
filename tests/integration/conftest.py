"""Fixtures the integration tests share: an upstream HTTP JSON API on
127.0.0.1:0 whose behaviour a test sets, and which records every path asked."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import pytest
from aiohttp import web

T = TypeVar("T")


async def eventually(
    check: Callable[[], Awaitable[T]], *, until: Callable[[T], bool], timeout: float = 10.0
) -> T:
    """Ask ``check`` again until its answer satisfies ``until``, and return that
    answer: a wait on a condition, not a guess at how long something takes.
    (``timeout`` only ends a test that would otherwise hang.)"""
    deadline = time.monotonic() + timeout
    while True:
        answer = await check()
        if until(answer):
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"still {answer!r} after {timeout:g} s")
        await asyncio.sleep(0.02)


@dataclass
class Upstream:
    """An upstream JSON API whose behaviour a test sets: delay, status, body."""

    delay_s: float = 0.0
    status: int = 200
    body: bytes | None = None
    paths: list[str] = field(default_factory=list)
    port: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.paths.append(request.raw_path)
        await asyncio.sleep(self.delay_s)
        body = self.body if self.body is not None else json.dumps({"points": 1200, "tier": "gold"}).encode()
        return web.Response(status=self.status, body=body, content_type="application/json")


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    state = Upstream()
    app = web.Application()
    app.router.add_get("/{tail:.*}", state.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.port = runner.addresses[0][1]
    yield state
    await runner.cleanup()
