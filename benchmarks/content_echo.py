"""The content benchmark's baseline: a trivial unary gRPC server with
sendtime's ContentService shape.

It implements sendtime.v1.ContentService.GetContent (and RenderEmail) with the
generated servicer base and answers every request with one fixed, small,
pre-built response: no profile, no cache, no rendering, no API key check. What
the load generator gets from it at the same concurrency and with the same
requests is what this machine, grpc.aio and uvloop allow for a unary call;
sendtime's rates are reported as ratios to it.

    python -m benchmarks.content_echo [--port 0]

prints "content echo serving gRPC on HOST:PORT" when ready; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any, Final

import grpc.aio
import uvloop
from google.protobuf.duration_pb2 import Duration

from sendtime.v1 import content_service_pb2, content_service_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]

_BLOCK: Final = content_service_pb2.ContentBlock(
    name="echo",
    data_json=b'{"echo":true}',
    source=content_service_pb2.BLOCK_SOURCE_CACHED,
)
_CONTENT: Final = content_service_pb2.GetContentResponse(
    blocks=[_BLOCK], server_time=Duration(nanos=1000), budget=Duration(nanos=200_000_000)
)
_EMAIL: Final = content_service_pb2.RenderEmailResponse(
    subject="echo", html="<p>echo</p>", text="echo", template_id="echo", blocks=[_BLOCK]
)


class EchoContentService(content_service_pb2_grpc.ContentServiceServicer):
    async def GetContent(
        self, request: content_service_pb2.GetContentRequest, context: Context
    ) -> content_service_pb2.GetContentResponse:
        return _CONTENT

    async def RenderEmail(
        self, request: content_service_pb2.RenderEmailRequest, context: Context
    ) -> content_service_pb2.RenderEmailResponse:
        return _EMAIL


async def _serve(host: str, port: int) -> None:
    # the same server options as sendtime's gRPC edge where they matter
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", 8 * 1024 * 1024), ("grpc.so_reuseport", 0)]
    )
    content_service_pb2_grpc.add_ContentServiceServicer_to_server(EchoContentService(), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"content echo serving gRPC on {host}:{bound}", flush=True)
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
