"""What the plain baselines (benchmarks.baseline_content, benchmarks.baseline_ingest)
share: Segment's batch envelope as pydantic models, the API key check, and
serving a FastAPI app with uvicorn (uvloop, httptools) on a port the OS picks.

These are the services a team would write in an afternoon instead of
sendtime, so they are written the plain way on purpose: FastAPI's own request
validation and JSON responses, no hand-tuned encoding.
"""

from __future__ import annotations

import base64
import socket
from datetime import datetime
from typing import Annotated, Any, Final

import uvicorn
from fastapi import FastAPI, Header, HTTPException
from pydantic import BaseModel, Field

API_KEY: Final = "dev-key"
#: Segment's limit, as sendtime keeps it.
MAX_BATCH_EVENTS: Final = 2500


class SegmentMessage(BaseModel):
    type: str = "track"
    messageId: str = Field(min_length=1, max_length=100)  # Segment's camelCase names
    userId: str | None = None
    anonymousId: str | None = None
    event: str | None = None
    properties: dict[str, Any] = {}
    traits: dict[str, Any] = {}
    context: dict[str, Any] = {}
    timestamp: datetime | None = None


class SegmentBatch(BaseModel):
    batch: list[SegmentMessage] = Field(max_length=MAX_BATCH_EVENTS)


def check_key(authorization: Annotated[str | None, Header()] = None) -> None:
    """Bearer KEY, or Basic with KEY as the user name (Segment's write key)."""
    if authorization is None:
        raise HTTPException(401, "no API key")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "basic":
        value = base64.b64decode(value).decode().partition(":")[0]
    elif scheme.lower() != "bearer":
        raise HTTPException(401, "unknown authorization scheme")
    if value != API_KEY:
        raise HTTPException(401, "unknown API key")


def serve(app: FastAPI, name: str, host: str = "127.0.0.1", port: int = 0) -> None:
    """Serves ``app`` until SIGTERM/SIGINT; prints "NAME serving HTTP on
    http://HOST:PORT" once it listens."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    bound_host, bound_port = sock.getsockname()[:2]
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        lifespan="off",
        backlog=2048,
    )
    server = uvicorn.Server(config)
    print(f"{name} serving HTTP on http://{bound_host}:{bound_port}", flush=True)
    server.run(sockets=[sock])
