import asyncio

import grpc.aio

from sendtime.server.app import Sendtime
from sendtime.v1 import event_pb2, event_service_pb2
from tests.conftest import DEV_AUTH, event_stub


async def test_runs_on_uvloop_and_accepts_an_event(server: Sendtime, channel: grpc.aio.Channel) -> None:
    assert "uvloop" in type(asyncio.get_running_loop()).__module__
    stub = event_stub(channel)
    event = event_pb2.Event(message_id="m1", user_id="u1", track=event_pb2.TrackPayload(name="Signed Up"))
    response = await stub.IngestEvent(event_service_pb2.IngestEventRequest(event=event), metadata=DEV_AUTH)
    assert response.ack.outcome == event_pb2.EVENT_OUTCOME_ACCEPTED
