"""Overload and slow clients (issue 16, item 6), against a real sendtime on
127.0.0.1:0 over raw sockets: slow heads and bodies are cut, open connections
stay bounded with the health check still answered, intake is shed with 429
before its body is read, a wrong key is refused before its body is buffered,
and gRPC calls beyond the bound are refused at once."""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import time
from collections.abc import AsyncIterator

import aiohttp
import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sendtime.server.app import Sendtime
from sendtime.v1 import event_service_pb2
from tests.conftest import DEV_AUTH, SettingsFactory, event_stub
from tests.integration.conftest import eventually

#: Long enough for a loaded machine to answer; a hanging server takes it all.
PATIENCE_S = 10.0


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


async def _connect(app: Sendtime) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", app.http_port)


async def _response(reader: asyncio.StreamReader) -> Response:
    """One HTTP/1.1 answer (its head, and a body of Content-Length bytes)."""
    async with asyncio.timeout(PATIENCE_S):
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode().split("\r\n")
        headers = {}
        for line in lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Response(int(status_line.split()[1]), headers, body)


async def _closed_by_server(reader: asyncio.StreamReader, within_s: float) -> bool:
    """True when the server closes the connection (EOF or reset) within ``within_s``."""
    try:
        async with asyncio.timeout(within_s):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


async def _healthz(app: Sendtime) -> int:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PATIENCE_S)) as session,
        session.get(f"http://127.0.0.1:{app.http_port}/healthz") as response,
    ):
        return response.status


def _close(*writers: asyncio.StreamWriter) -> None:
    for writer in writers:
        writer.close()


@pytest.fixture
async def app(make_settings: SettingsFactory, request: pytest.FixtureRequest) -> AsyncIterator[Sendtime]:
    overrides: dict[str, str] = getattr(request, "param", {})
    async with Sendtime(make_settings(**overrides)) as server:
        yield server


@pytest.mark.parametrize("app", [{"http__header_timeout_s": "0.5"}], indirect=True)
async def test_a_slow_request_head_is_cut_after_the_header_timeout(app: Sendtime) -> None:
    reader, writer = await _connect(app)
    writer.write(b"POST /v1/batch HTTP/1.1\r\nHost: sendtime\r\n")  # and never the rest
    await writer.drain()
    assert await _closed_by_server(reader, PATIENCE_S)
    _close(writer)


@pytest.mark.parametrize("app", [{"http__body_timeout_s": "0.5"}], indirect=True)
async def test_a_slow_body_is_cut_after_the_body_timeout(app: Sendtime) -> None:
    reader, writer = await _connect(app)
    writer.write(
        b"POST /v1/batch HTTP/1.1\r\nHost: sendtime\r\nAuthorization: Bearer dev-key\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n" + b'{"batch": ['
    )
    await writer.drain()
    response = await _response(reader)
    assert response.status == 408
    assert b"did not arrive within 0.5 s" in response.body
    _close(writer)


@pytest.mark.parametrize(
    "app", [{"http__max_connections": "8", "http__header_timeout_s": "60"}], indirect=True
)
async def test_the_connection_bound_holds_and_health_still_answers(app: Sendtime) -> None:
    slow = [await _connect(app) for _ in range(20)]
    for _, writer in slow:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: sendtime\r\n")  # half a head, then nothing
        await writer.drain()
    assert await _healthz(app) == 200
    closed = await asyncio.gather(*(_closed_by_server(reader, 1.0) for reader, _ in slow))
    # 20 slow ones and the health check through a bound of 8: the 13 that
    # waited longest were closed to make room, the newest 7 are still open.
    assert sum(closed) == 13
    assert closed[:13] == [True] * 13
    _close(*(writer for _, writer in slow))


async def test_a_wrong_key_is_refused_before_the_body_is_read(app: Sendtime) -> None:
    reader, writer = await _connect(app)
    writer.write(
        b"POST /v1/batch HTTP/1.1\r\nHost: sendtime\r\nAuthorization: Bearer wrong\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'4\r\n{"ba\r\n'  # the rest of the body never comes
    )
    await writer.drain()
    response = await _response(reader)
    assert response.status == 401
    assert response.headers.get("connection") == "close"
    _close(writer)


async def test_a_large_unauthenticated_chunked_body_is_refused_before_it_is_buffered(app: Sendtime) -> None:
    reader, writer = await _connect(app)
    writer.write(
        b"POST /v1/batch HTTP/1.1\r\nHost: sendtime\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"x" * 65536
    for _ in range(10):  # 640 KiB, past the batch limit of 500 KiB, and never finished
        writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    response = await _response(reader)
    assert response.status == 413
    assert b"larger than 512000 bytes" in response.body
    _close(writer)


@pytest.mark.parametrize("app", [{"http__max_ingest_bytes_in_flight": "800000"}], indirect=True)
async def test_an_intake_flood_is_shed_with_429_before_the_body_is_read(app: Sendtime) -> None:
    head = (
        b"POST /v1/batch HTTP/1.1\r\nHost: sendtime\r\nAuthorization: Bearer dev-key\r\n"
        b"Content-Type: application/json\r\nContent-Length: 400000\r\n\r\n"
    )
    # two intake requests of 400,000 bytes whose bodies are still coming fill the bound ...
    busy = [await _connect(app) for _ in range(2)]
    for _, writer in busy:
        writer.write(head + b'{"batch": [')
        await writer.drain()
    await asyncio.sleep(0.2)
    # ... so the third is answered from its head alone: none of its body is sent
    reader, writer = await _connect(app)
    writer.write(head)
    await writer.drain()
    response = await _response(reader)
    assert response.status == 429
    assert response.headers["retry-after"] == "1"
    assert b"800000 bytes of intake are being handled" in response.body
    assert await _healthz(app) == 200
    _close(writer, *(w for _, w in busy))


@pytest.mark.parametrize("app", [{"grpc__max_concurrent_calls": "3"}], indirect=True)
async def test_grpc_calls_beyond_the_bound_are_refused_at_once(app: Sendtime) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        events = event_stub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        idle_streams = [events.StreamEvents(None, metadata=DEV_AUTH) for _ in range(3)]
        for stream in idle_streams:  # open, authenticated, and sending nothing
            await stream.write(event_service_pb2.StreamEventsRequest())
            await stream.read()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await health.Check(health_pb2.HealthCheckRequest(), timeout=PATIENCE_S)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        idle_streams[0].cancel()

        async def check() -> grpc.StatusCode:
            try:
                await health.Check(health_pb2.HealthCheckRequest(), timeout=PATIENCE_S)
            except grpc.aio.AioRpcError as error:
                return error.code()  # RESOURCE_EXHAUSTED until the slot is free
            return grpc.StatusCode.OK

        # the cancelled stream's slot comes free: the next call is served
        assert await eventually(check, until=lambda code: code != grpc.StatusCode.RESOURCE_EXHAUSTED) == (
            grpc.StatusCode.OK
        )
        for stream in idle_streams[1:]:
            stream.cancel()


@pytest.mark.parametrize("app", [{"http__max_connections": "600"}], indirect=True)
async def test_connections_arriving_while_the_loop_is_busy_wait_in_a_queue_as_deep_as_the_bound(
    app: Sendtime,
) -> None:
    """400 clients connect at once while the event loop is busy (here: held by
    this test). The kernel completes their handshakes into the listening
    socket's queue, as deep as http.max_connections: at aiohttp's default of
    128 the rest had their SYNs dropped and waited a second or more for a
    retransmission, a health check among them."""
    sockets = [socket.socket() for _ in range(400)]
    try:
        for sock in sockets:
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", app.http_port))
        # the loop is held: nothing is accepted while the handshakes complete
        pending = list(sockets)
        deadline = time.monotonic() + 2.0  # under the first SYN retransmission and the next
        while pending and time.monotonic() < deadline:
            _, writable, _ = select.select([], pending, [], 0.1)
            pending = [sock for sock in pending if sock not in writable]
        connected = [
            sock
            for sock in sockets
            if sock not in pending and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        ]
        assert len(connected) == len(sockets)
        assert await _healthz(app) == 200
    finally:
        for sock in sockets:
            sock.close()
