"""gRPC interop from a second language: a Node client (@grpc/grpc-js, stubs
made at run time from protos/ alone) against a real sendtime on 127.0.0.1:0.

Mirrors the cases of the gRPC interop suite that sendtime's API promises:
status codes with google.rpc.Status details decoded by the other language,
deadlines exceeded and propagated, cancel after begin and after the first
response on the event stream, unimplemented methods and services, messages at
and over the size limit, and a server drain ending a live stream with
UNAVAILABLE (the code clients of every language retry on).

Needs Node.js and `npm ci` in tests/interop/node (``make install`` does it);
skips, saying so, where Node is missing.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google.rpc
import grpc
import pytest
from aiohttp import web

from sendtime.server.app import Sendtime
from tests.conftest import SettingsFactory

NODE_CLIENT = Path(__file__).parent / "node" / "client.mjs"
GOOGLEAPIS_PROTOS = Path(next(iter(google.rpc.__path__))).parent.parent

# slow: the Node client runs as a process of its own (make test-fast leaves them out)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("node") is None or not (NODE_CLIENT.parent / "node_modules").is_dir(),
        reason="Node.js or tests/interop/node/node_modules missing (make install runs npm ci there)",
    ),
]


async def node(target: str, case: str, arg: str = "", *, key: str | None = "dev-key") -> dict[str, Any]:
    process = await start_node(target, case, arg, key=key)
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


async def start_node(
    target: str, case: str, arg: str = "", *, key: str | None = "dev-key"
) -> asyncio.subprocess.Process:
    environ = {**os.environ, "GOOGLEAPIS_PROTOS": str(GOOGLEAPIS_PROTOS)}
    environ.pop("SENDTIME_KEY", None)
    if key is not None:
        environ["SENDTIME_KEY"] = key
    node_bin = shutil.which("node")
    assert node_bin is not None
    return await asyncio.create_subprocess_exec(
        node_bin,
        str(NODE_CLIENT),
        target,
        case,
        arg,
        env=environ,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


def target(app: Sendtime) -> str:
    return f"127.0.0.1:{app.grpc_port}"


def detail(result: dict[str, Any], type_name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [
        d for d in result["rpc"]["details"] if d["type"] == f"google.rpc.{type_name}"
    ]
    [one] = found
    return one


async def test_a_call_and_its_ack(server: Sendtime) -> None:
    result = await node(target(server), "ingest_ok")
    assert result == {"code": 0, "outcome": "EVENT_OUTCOME_ACCEPTED"}


async def test_invalid_argument_carries_error_info_and_bad_request(server: Sendtime) -> None:
    result = await node(target(server), "bad_request_details")
    assert result["status"] == "INVALID_ARGUMENT"
    assert result["rpc"]["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert detail(result, "ErrorInfo")["domain"] == "sendtime.v1"
    fields = [v["field"] for v in detail(result, "BadRequest")["field_violations"]]
    assert "event.message_id" in fields


async def test_missing_key_is_unauthenticated_with_a_reason(server: Sendtime) -> None:
    result = await node(target(server), "unauthenticated", key=None)
    assert result["status"] == "UNAUTHENTICATED"
    assert detail(result, "ErrorInfo")["reason"]


async def test_a_deadline_already_past_is_deadline_exceeded(server: Sendtime) -> None:
    result = await node(target(server), "deadline_already_exceeded")
    assert result["status"] == "DEADLINE_EXCEEDED"


@dataclass
class SlowUpstream:
    url: str
    requests: int = 0


@pytest.fixture
async def slow_upstream() -> AsyncIterator[SlowUpstream]:
    upstream = SlowUpstream("")

    async def slow(request: web.Request) -> web.Response:
        upstream.requests += 1
        await asyncio.sleep(2)
        return web.json_response({"points": 1})

    app = web.Application()
    app.router.add_get("/loyalty/{user}", slow)
    runner = web.AppRunner(app, shutdown_timeout=0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    upstream.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield upstream
    await runner.cleanup()


async def test_the_callers_deadline_bounds_a_slow_source(
    make_settings: SettingsFactory, slow_upstream: SlowUpstream
) -> None:
    config = f"""
[content]
allowed_upstream_hosts = ["127.0.0.1"]

[[content.upstreams]]
name = "loyalty"
url = "{slow_upstream.url}/loyalty/{{user.id}}"
timeout_s = 5.0
"""
    async with Sendtime(make_settings(config)) as app:
        result = await node(target(app), "deadline_propagated", "400")
    # OK, not DEADLINE_EXCEEDED: the answer reached the Node client within its
    # deadline (grpc-js enforces it), long before the upstream's 2 s
    assert result["code"] == 0, result
    assert result["elapsed_ms"] < 1000
    assert result["blocks"]["loyalty"][0] == "BLOCK_SOURCE_FALLBACK"
    assert slow_upstream.requests == 1


async def test_stream_cancelled_right_after_it_began(server: Sendtime) -> None:
    result = await node(target(server), "cancel_after_begin")
    assert result["status"] == "CANCELLED"
    assert (await node(target(server), "ingest_ok"))["code"] == 0  # still serving


async def test_stream_cancelled_after_the_first_ack(server: Sendtime) -> None:
    result = await node(target(server), "cancel_after_first_response")
    assert result["status"] == "CANCELLED"
    assert result["acks"] == 1
    assert (await node(target(server), "ingest_ok"))["code"] == 0


async def test_unknown_method_and_service_are_unimplemented(server: Sendtime) -> None:
    result = await node(target(server), "unimplemented")
    assert result["method"]["status"] == "UNIMPLEMENTED"
    assert result["service"]["status"] == "UNIMPLEMENTED"


async def test_messages_at_and_over_the_size_limit(server: Sendtime) -> None:
    limit = server.settings.grpc.max_message_bytes
    result = await node(target(server), "large_messages", str(limit))
    # within the transport's limit, over the event's: sendtime's own answer
    assert result["event"]["status"] == "INVALID_ARGUMENT"
    assert detail(result["event"], "BadRequest")["field_violations"]
    # over the transport's limit: refused before it reaches sendtime
    assert result["message"]["status"] == "RESOURCE_EXHAUSTED"
    assert (await node(target(server), "ingest_ok"))["code"] == 0


async def test_a_drain_ends_a_live_stream_with_unavailable(make_settings: SettingsFactory) -> None:
    app = Sendtime(make_settings())
    await app.start()
    try:
        process = await start_node(target(app), "drain")
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 15)
        assert line == b"streaming\n"
        started = time.monotonic()
    finally:
        await app.stop()
    out, err = await asyncio.wait_for(process.communicate(), 15)
    assert process.returncode == 0, err.decode()
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["status"] == "UNAVAILABLE", result
    assert result["acks"] >= 1
    assert time.monotonic() - started < app.settings.shutdown_grace_s
