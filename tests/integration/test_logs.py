"""Structured logs from a real sendtime: one JSON line per gRPC call, HTTP
request and delivery attempt, with the request id, the user id hashed, the
outcome and timings, and never a key, a body or an email address."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import grpc.aio
import pytest

from sendtime.server.app import Sendtime
from sendtime.server.observe.logs import ACCESS_LOGGER, DELIVERY_LOGGER, JsonFormatter, configure_logging
from sendtime.server.settings import LoggingSettings
from sendtime.v1 import content_service_pb2, content_service_pb2_grpc
from sendtime.v1 import delivery_service_pb2 as D
from tests.conftest import DEV_AUTH, SettingsFactory
from tests.integration.observing import recording_upstream
from tests.integration.server_process import start_server
from tests.integration.test_delivery import (
    add_to_cart,
    channel_to,
    flows_config,
    identify,
    ingest,
    wait_for_status,
)

C = content_service_pb2
USER = "user-42@shop"
HASHED = hashlib.sha256(USER.encode()).hexdigest()[:16]


def lines(caplog: pytest.LogCaptureFixture, logger: str) -> list[tuple[str, dict[str, Any]]]:
    """Each record of ``logger`` as the JSON formatter writes it: (line, parsed)."""
    formatter = JsonFormatter()
    found = []
    for record in caplog.records:
        if record.name == logger:
            line = formatter.format(record)
            found.append((line, json.loads(line)))
    return found


async def logged(
    caplog: pytest.LogCaptureFixture, logger: str, count: int
) -> list[tuple[str, dict[str, Any]]]:
    """The lines of ``logger`` once there are ``count``: a gRPC call's access line
    is written after its status has left for the client, so it can trail the call."""
    async with asyncio.timeout(5):
        while len(found := lines(caplog, logger)) < count:
            await asyncio.sleep(0.01)
    return found


async def get_content(port: int, metadata: tuple[tuple[str, str], ...]) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await content_service_pb2_grpc.ContentServiceStub(channel).GetContent(
            C.GetContentRequest(user_id=USER, blocks=["cart"]), metadata=metadata, timeout=2.0
        )


async def test_one_json_line_per_grpc_call(server: Sendtime, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    await get_content(server.grpc_port, (*DEV_AUTH, ("x-request-id", "req-from-caller-1")))
    with pytest.raises(grpc.aio.AioRpcError):
        await get_content(server.grpc_port, (("authorization", "Bearer not-a-key-0123"),))

    (ok_line, ok), (refused_line, refused) = await logged(caplog, ACCESS_LOGGER, 2)
    assert ok["request_id"] == "req-from-caller-1"
    assert ok["transport"] == "grpc"
    assert ok["method"] == "sendtime.v1.ContentService/GetContent"
    assert ok["outcome"] == "OK"
    assert ok["duration_ms"] > 0
    assert ok["user"] == HASHED
    assert ok["level"] == "INFO"
    assert ok["logger"] == ACCESS_LOGGER
    assert ok["msg"].startswith("grpc sendtime.v1.ContentService/GetContent OK ")
    assert ok["peer"].startswith("ipv4:127.0.0.1:")
    assert ok["ts"].endswith("Z")
    assert refused["outcome"] == "UNAUTHENTICATED"
    assert len(refused["request_id"]) == 16  # made here: the caller sent none
    for line in (ok_line, refused_line):
        assert USER not in line
        assert "dev-key" not in line
        assert "not-a-key-0123" not in line
        assert "Bearer" not in line


async def test_one_json_line_per_http_request_and_the_id_comes_back(
    server: Sendtime, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    base = f"http://127.0.0.1:{server.http_port}"
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": "Bearer dev-key", "X-Request-Id": "req-from-esp-7"}
        async with http.get(f"{base}/v1/content/{USER}?blocks=cart", headers=headers) as response:
            assert response.status == 200
            assert response.headers["X-Request-Id"] == "req-from-esp-7"
        async with http.get(f"{base}/v1/profiles/{USER}") as response:
            assert response.status == 401
            made = response.headers["X-Request-Id"]
        async with http.get(f"{base}/healthz") as response:  # probes are not logged
            assert response.status == 200

    (content_line, content), (_, refused) = lines(caplog, ACCESS_LOGGER)
    assert content["request_id"] == "req-from-esp-7"
    assert (content["transport"], content["method"], content["route"]) == (
        "http",
        "GET",
        "/v1/content/{user_id}",
    )
    assert content["outcome"] == "200"
    assert content["user"] == HASHED
    assert content["duration_ms"] > 0
    assert USER not in content_line
    assert "dev-key" not in content_line
    assert refused["request_id"] == made
    assert refused["outcome"] == "401"


async def test_user_ids_as_given_when_configured(
    make_settings: SettingsFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    async with Sendtime(make_settings(logging__hash_user_ids="false")) as app:
        await get_content(app.grpc_port, DEV_AUTH)
    ((_, line),) = lines(caplog, ACCESS_LOGGER)
    assert line["user"] == USER


async def test_access_log_can_be_turned_off(
    make_settings: SettingsFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    async with Sendtime(make_settings(logging__access_log="false")) as app:
        await get_content(app.grpc_port, DEV_AUTH)
    assert lines(caplog, ACCESS_LOGGER) == []


async def test_one_line_per_delivery_attempt_without_the_email(
    make_settings: SettingsFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=DELIVERY_LOGGER)
    async with (
        Sendtime(make_settings(flows_config('kind = "outbox"', delay_s=0.0))) as app,
        channel_to(app) as channel,
    ):
        await ingest(channel, identify("i1", user=USER), add_to_cart("a1", user=USER))
        delivery = await wait_for_status(channel, {D.DELIVERY_STATUS_SENT}, user=USER)
        await ingest(channel, add_to_cart("a2", cart="c2", user="nobody"))
        await wait_for_status(channel, {D.DELIVERY_STATUS_SKIPPED}, user="nobody")

    (sent_line, sent), (_, skipped) = lines(caplog, DELIVERY_LOGGER)
    assert sent["outcome"] == "sent"
    assert sent["send_id"] == delivery.id
    assert sent["send_key"] == delivery.idempotency_key
    assert sent["request_id"] == f"{delivery.idempotency_key}.1"
    assert (sent["flow"], sent["template"], sent["round"]) == ("abandoned_cart", "abandoned_cart", 1)
    assert (sent["relay"], sent["relay_tries"]) == ("outbox", 1)
    assert sent["render_ms"] > 0
    assert sent["relay_ms"] > 0
    assert sent["duration_ms"] >= sent["render_ms"]
    assert sent["latency_s"] >= 0
    assert sent["user"] == HASHED
    for secret in (USER, "ada@example.com", "you left something", "<html", "Kettle"):
        assert secret not in sent_line
    assert (skipped["outcome"], skipped["reason"]) == ("skipped", "no_email")


@pytest.mark.slow
async def test_sendtime_serve_writes_json_lines_to_a_pipe(tmp_path: Path) -> None:
    server = await start_server(tmp_path / "data")
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            await content_service_pb2_grpc.ContentServiceStub(channel).GetContent(
                C.GetContentRequest(user_id=USER), metadata=(*DEV_AUTH, ("x-request-id", "from-cli-test"))
            )
    finally:
        server.terminate()
        assert await server.wait() == 0
    parsed = [json.loads(line) for line in server.stderr.splitlines() if line]
    access = [line for line in parsed if line["logger"] == ACCESS_LOGGER]
    assert [line["request_id"] for line in access] == ["from-cli-test"]
    assert access[0]["user"] == HASHED
    assert any("development API key" in line["msg"] for line in parsed)
    assert any(line["msg"] == "stopped" for line in parsed)
    assert USER not in server.stderr


async def test_lines_logged_during_a_call_carry_its_request_id(make_settings: SettingsFactory) -> None:
    """The cache's warning about a failed upstream, logged in the fetch's own
    task, carries the id of the call that started the fetch (and no user id)."""
    stream = io.StringIO()
    stop = configure_logging("INFO", LoggingSettings(format="json"), stream)
    try:
        async with (
            recording_upstream(status=503) as upstream,
            Sendtime(make_settings(upstream.config())) as app,
            grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel,
        ):
            await content_service_pb2_grpc.ContentServiceStub(channel).GetContent(
                C.GetContentRequest(user_id=USER, blocks=["loyalty"]),
                metadata=(*DEV_AUTH, ("x-request-id", "req-ctx-9")),
                timeout=2.0,
            )
    finally:
        stop()
    parsed = [json.loads(line) for line in stream.getvalue().splitlines()]
    (warning,) = [line for line in parsed if line["msg"].startswith("fetch for cache key")]
    assert warning["level"] == "WARNING"
    assert warning["request_id"] == "req-ctx-9"
    assert "HTTP 503" in warning["msg"]
    assert USER not in stream.getvalue()
    (access,) = [line for line in parsed if line["logger"] == ACCESS_LOGGER]
    assert access["request_id"] == "req-ctx-9"
