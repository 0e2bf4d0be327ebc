"""The baseline: a trivial gRPC server with sendtime's streaming shape.

It implements sendtime.v1.EventService.StreamEvents with the generated
servicer base and answers every request message with one ack per event
(message id, ACCEPTED), without decoding properties, validating, storing or
checking keys. What the load generator gets from it is what this machine,
grpc.aio and uvloop allow; sendtime's rate is reported as a ratio to it.

    python -m benchmarks.echo_server [--port 0]

prints "echo serving gRPC on HOST:PORT" when ready; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc.aio
import uvloop

from sendtime.v1 import event_pb2, event_service_pb2, event_service_pb2_grpc

_ACCEPTED = event_pb2.EVENT_OUTCOME_ACCEPTED
Context = grpc.aio.ServicerContext[Any, Any]


def _acks(events: Iterable[event_pb2.Event]) -> list[event_pb2.EventAck]:
    return [
        event_pb2.EventAck(message_id=event.message_id, outcome=_ACCEPTED, index=index)
        for index, event in enumerate(events)
    ]


class EchoEventService(event_service_pb2_grpc.EventServiceServicer):
    async def IngestEvent(
        self, request: event_service_pb2.IngestEventRequest, context: Context
    ) -> event_service_pb2.IngestEventResponse:
        return event_service_pb2.IngestEventResponse(ack=_acks([request.event])[0])

    async def IngestEvents(
        self, request: event_service_pb2.IngestEventsRequest, context: Context
    ) -> event_service_pb2.IngestEventsResponse:
        return event_service_pb2.IngestEventsResponse(acks=_acks(request.events))

    async def StreamEvents(
        self,
        request_iterator: AsyncIterator[event_service_pb2.StreamEventsRequest],
        context: Context,
    ) -> AsyncIterator[event_service_pb2.StreamEventsResponse]:
        async for request in request_iterator:
            yield event_service_pb2.StreamEventsResponse(acks=_acks(request.events))


async def _serve(host: str, port: int) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 8 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
        ]
    )
    event_service_pb2_grpc.add_EventServiceServicer_to_server(EchoEventService(), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"echo serving gRPC on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(2.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    uvloop.run(_serve(args.host, args.port))


if __name__ == "__main__":
    main()
