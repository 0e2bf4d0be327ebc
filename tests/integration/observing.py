"""Helpers for the metrics, logs and tracing tests: scrape and read /metrics,
and an upstream HTTP server that records what it was sent."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from multidict import CIMultiDictProxy
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

Families = dict[str, Metric]


async def scrape(http_port: int, *, headers: dict[str, str] | None = None) -> Families:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{http_port}/metrics", headers=headers) as response,
    ):
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(families: Families, sample: str, **labels: str) -> float:
    """The sample's value (0 when absent); labels not given may be anything and are summed over."""
    family_name = sample
    for suffix in ("_total", "_count", "_sum", "_bucket"):
        if sample.endswith(suffix) and sample.removesuffix(suffix) in families:
            family_name = sample.removesuffix(suffix)
            break
    family = families.get(family_name)
    if family is None:
        raise AssertionError(f"no metric family {family_name}; have {sorted(families)}")
    return sum(
        s.value
        for s in family.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


@dataclass
class RecordingUpstream:
    """An upstream JSON API on 127.0.0.1 that keeps every request's headers."""

    status: int = 200
    delay_s: float = 0.0
    headers: list[CIMultiDictProxy[str]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    port: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.headers.append(request.headers)
        self.paths.append(request.raw_path)
        await asyncio.sleep(self.delay_s)
        return web.Response(
            status=self.status, body=json.dumps({"points": 1200}).encode(), content_type="application/json"
        )

    def config(self, *, name: str = "loyalty", extra: str = "") -> str:
        return f"""
[content]
allowed_upstream_hosts = ["127.0.0.1"]
negative_ttl_s = 0.0
{extra}
[[content.upstreams]]
name = "{name}"
url = "http://127.0.0.1:{self.port}/{name}/{{user.id}}"
timeout_s = 2.0
retries = 0
"""


@asynccontextmanager
async def recording_upstream(*, status: int = 200, delay_s: float = 0.0) -> AsyncIterator[RecordingUpstream]:
    upstream = RecordingUpstream(status=status, delay_s=delay_s)
    app = web.Application()
    app.router.add_get("/{tail:.*}", upstream.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    upstream.port = runner.addresses[0][1]
    try:
        yield upstream
    finally:
        await runner.cleanup()
