"""kill -9 in the middle of a broadcast: after the restart every recipient
gets the email once, or is reported uncertain (the ESP may have taken it
when the process died), and none is lost or sent twice."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import grpc.aio
import pytest

from sendtime.v1 import broadcast_service_pb2 as B
from sendtime.v1 import broadcast_service_pb2_grpc, event_pb2, event_service_pb2
from tests.conftest import DEV_AUTH, event_stub
from tests.integration.server_process import ServerProcess, start_server
from tests.integration.smtp_server import SmtpServer
from tests.integration.test_delivery import smtp_relay

AUDIENCE = 300


def config(tmp_path: Path, smtp_port: int) -> Path:
    path = tmp_path / "sendtime.toml"
    path.write_text(
        f"""
[delivery]
public_base_url = "https://mail.example.com"
frequency_cap_count = 0
poll_interval_ms = 50
max_concurrent_sends = 8
[delivery.relay]
{smtp_relay(smtp_port)}
"""
    )
    return path


async def broadcast_state(server: ServerProcess, broadcast_id: str) -> B.Broadcast:
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = broadcast_service_pb2_grpc.BroadcastServiceStub(channel)
        answer = await stub.GetBroadcast(B.GetBroadcastRequest(id=broadcast_id), metadata=DEV_AUTH)
        return answer.broadcast


@pytest.mark.slow  # servers run as processes and are killed
async def test_kill_9_mid_broadcast_loses_and_repeats_nobody(tmp_path: Path) -> None:
    smtp = SmtpServer()
    smtp.start()
    settings = config(tmp_path, smtp.port)
    server = await start_server(tmp_path / "data", config=settings)
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            people = [
                event_pb2.Event(
                    message_id=f"who-{n}",
                    user_id=f"user{n}",
                    identify=event_pb2.IdentifyPayload(traits=event_pb2.Traits(email=f"user{n}@example.com")),
                )
                for n in range(AUDIENCE)
            ]
            await event_stub(channel).IngestEvents(
                event_service_pb2.IngestEventsRequest(events=people), metadata=DEV_AUTH
            )
            made = await broadcast_service_pb2_grpc.BroadcastServiceStub(channel).CreateBroadcast(
                B.CreateBroadcastRequest(
                    broadcast=B.Broadcast(
                        idempotency_key="killed",
                        template_id="post_purchase",
                        expression='email.endsWith("@example.com")',
                        transactional=True,
                        rate_limit=100.0,  # about three seconds for everyone
                    )
                ),
                metadata=DEV_AUTH,
            )
        await asyncio.to_thread(smtp.inbox.wait_for, 60, 30.0)  # well into it
        server.kill()
        assert await server.wait() == -9
        at_kill = len(smtp.inbox.messages)
        assert at_kill < AUDIENCE, "the broadcast ended before the kill"

        server = await start_server(tmp_path / "data", config=settings)
        for _ in range(3000):
            final = await broadcast_state(server, made.broadcast.id)
            if final.state == B.BROADCAST_STATE_DONE:
                break
            await asyncio.sleep(0.01)
        assert final.state == B.BROADCAST_STATE_DONE, final
    finally:
        server.terminate()
        await server.wait()
        smtp.stop()

    progress = final.progress
    received = Counter(str(m["To"]) for m in smtp.inbox.messages)
    assert [to for to, n in received.items() if n > 1] == [], "an email went twice"
    assert progress.audience == AUDIENCE
    # every recipient's delivery is sent, or uncertain (handed over when the process died)
    assert progress.sent + progress.uncertain == AUDIENCE
    assert progress.sent <= len(received) <= progress.sent + progress.uncertain
    assert progress.uncertain <= 8  # at most what was in flight at the kill (max_concurrent_sends)
