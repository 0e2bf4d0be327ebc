"""No acknowledged event is lost: kill -9 mid-stream, and a graceful SIGTERM
that drains open streams. The server runs as a real child process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import zlib
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sendtime.v1 import event_pb2, event_service_pb2, profile_service_pb2
from tests.conftest import DEV_AUTH, event_stub, profile_stub
from tests.integration.server_process import ServerProcess, start_server

# slow: servers run as processes and are killed (make test-fast leaves them out)
pytestmark = pytest.mark.slow

BATCH = 50


def user_of(message_id: str) -> str:
    return f"user-{zlib.crc32(message_id.encode()) % 200}"


def event(message_id: str) -> event_pb2.Event:
    user = user_of(message_id)
    properties = {"cart_id": f"cart-{user}", "product_id": f"p-{message_id}", "price": 5, "quantity": 1}
    return event_pb2.Event(
        message_id=message_id,
        user_id=user,
        track=event_pb2.TrackPayload(name="Product Added", properties_json=json.dumps(properties).encode()),
    )


async def stream_until_broken(server: ServerProcess, acked: set[str], sent: list[str]) -> grpc.StatusCode:
    """Stream batches as fast as acks allow, recording every acked id, until the call ends."""
    async with grpc.aio.insecure_channel(server.target) as channel:
        call = event_stub(channel).StreamEvents(None, metadata=DEV_AUTH)

        async def write() -> None:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                for n in range(1_000_000):
                    batch = [event(f"e-{n}-{i}") for i in range(BATCH)]
                    sent.extend(e.message_id for e in batch)
                    await call.write(event_service_pb2.StreamEventsRequest(events=batch))

        writer = asyncio.create_task(write())
        try:
            async for response in call:
                for ack in response.acks:
                    assert ack.outcome == event_pb2.EVENT_OUTCOME_ACCEPTED, ack
                    assert ack.message_id not in acked, "acked twice"
                    acked.add(ack.message_id)
        except grpc.aio.AioRpcError as error:
            return error.code()
        finally:
            writer.cancel()
        return await call.code()


async def event_counts(server: ServerProcess, users: set[str]) -> dict[str, int]:
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = profile_stub(channel)
        counts = {}
        for user in users:
            reply = await stub.GetProfile(
                profile_service_pb2.GetProfileRequest(user_id=user), metadata=DEV_AUTH
            )
            counts[user] = reply.profile.event_count
        return counts


async def resend(server: ServerProcess, message_ids: list[str]) -> dict[str, int]:
    """Send the ids again: an id the server kept comes back DUPLICATE."""
    outcomes: dict[str, int] = {}
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = event_stub(channel)
        for start in range(0, len(message_ids), 2000):
            chunk = [event(m) for m in message_ids[start : start + 2000]]
            reply = await stub.IngestEvents(
                event_service_pb2.IngestEventsRequest(events=chunk), metadata=DEV_AUTH
            )
            outcomes.update({a.message_id: a.outcome for a in reply.acks})
    return outcomes


async def test_kill_9_mid_stream_loses_no_acked_event(tmp_path: Path) -> None:
    server = await start_server(tmp_path / "data")
    acked: set[str] = set()
    sent: list[str] = []
    stream = asyncio.create_task(stream_until_broken(server, acked, sent))
    while len(acked) < 3000:  # well into the stream, with commits in flight
        await asyncio.sleep(0.01)
        assert not stream.done(), "the stream ended before the kill"
    server.kill()
    code = await asyncio.wait_for(stream, 30)
    # the connection dropped under the call: gRPC reports UNAVAILABLE or, when
    # the socket was reset mid-frame, INTERNAL; either way nothing was acked after
    assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
    assert await server.wait() == -9
    assert len(sent) > len(acked), "some events were in flight, unacked, at the kill"

    restarted = await start_server(tmp_path / "data")
    try:
        # Profiles are saved about once a second, so the kill lost some saves:
        # the restart must fold those events again, each exactly once.
        counts = await event_counts(restarted, {user_of(m) for m in sent})
        outcomes = await resend(restarted, sorted(acked))
    finally:
        restarted.terminate()
        await restarted.wait()
    lost = [m for m in acked if outcomes[m] != event_pb2.EVENT_OUTCOME_DUPLICATE]
    assert lost == [], f"{len(lost)} acked events were lost"
    stored = {m for m, outcome in outcomes.items() if outcome == event_pb2.EVENT_OUTCOME_DUPLICATE}
    for user, count in counts.items():
        acked_for_user = sum(1 for m in acked if user_of(m) == user)
        sent_for_user = sum(1 for m in sent if user_of(m) == user)
        assert acked_for_user <= count <= sent_for_user, (user, acked_for_user, count, sent_for_user)
    assert sum(counts.values()) >= len(stored)


async def test_sigterm_drains_streams_and_acks_what_it_read(tmp_path: Path) -> None:
    server = await start_server(tmp_path / "data")
    acked: set[str] = set()
    sent: list[str] = []
    stream = asyncio.create_task(stream_until_broken(server, acked, sent))
    async with grpc.aio.insecure_channel(server.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        while len(acked) < 2000:
            await asyncio.sleep(0.01)
        server.terminate()
        statuses = []
        with contextlib.suppress(grpc.aio.AioRpcError):
            while (update := await watch.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
                statuses.append(update.status)
                if update.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
        assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
    code = await asyncio.wait_for(stream, 30)
    exit_code = await server.wait()  # first: a failed check must not leave the process behind
    assert code == grpc.StatusCode.UNAVAILABLE, "the client is told to reconnect"
    assert exit_code == 0, server.stderr

    restarted = await start_server(tmp_path / "data")
    try:
        outcomes = await resend(restarted, sorted(acked))
    finally:
        restarted.terminate()
        await restarted.wait()
    assert all(outcomes[m] == event_pb2.EVENT_OUTCOME_DUPLICATE for m in acked)
