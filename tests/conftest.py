"""Shared fixtures: a real sendtime on 127.0.0.1 port 0, with its data in a
temporary folder, and a gRPC channel to it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import grpc.aio
import pytest
import uvloop

from sendtime.server.app import Sendtime
from sendtime.server.settings import Settings, load_settings
from sendtime.v1 import event_service_pb2_grpc, profile_service_pb2_grpc

DEV_AUTH = (("authorization", "Bearer dev-key"),)

SettingsFactory = Callable[..., Settings]


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], object]]:
    """Run every async test on uvloop, the loop sendtime runs on in production."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
def make_settings(tmp_path: Path) -> SettingsFactory:
    """Settings for a test server: ports 0, data under tmp_path, emails
    rendered on the event loop (no worker processes to start and stop: the
    render pool has tests of its own, and the subprocess servers run it); an
    optional TOML config text, and SENDTIME_* style overrides as keyword
    arguments (grpc__port="0", content__render_processes="2")."""

    def make(config: str | None = None, **overrides: str) -> Settings:
        environ = {
            "SENDTIME_GRPC__PORT": "0",
            "SENDTIME_HTTP__PORT": "0",
            "SENDTIME_STORAGE__DATA_DIR": str(tmp_path / "data"),
            "SENDTIME_SHUTDOWN_GRACE_S": "5",
            "SENDTIME_CONTENT__RENDER_PROCESSES": "0",
        }
        environ.update({f"SENDTIME_{k.upper()}": v for k, v in overrides.items()})
        path = None
        if config is not None:
            path = tmp_path / "sendtime.toml"
            path.write_text(config)
        return load_settings(path, environ=environ)

    return make


@pytest.fixture
async def server(make_settings: SettingsFactory) -> AsyncIterator[Sendtime]:
    async with Sendtime(make_settings()) as app:
        yield app


@pytest.fixture
async def channel(server: Sendtime) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as chan:
        yield chan


@pytest.fixture
def events(channel: grpc.aio.Channel) -> event_service_pb2_grpc.EventServiceAsyncStub:
    return event_stub(channel)


@pytest.fixture
def profiles(channel: grpc.aio.Channel) -> profile_service_pb2_grpc.ProfileServiceAsyncStub:
    return profile_stub(channel)


def event_stub(channel: grpc.aio.Channel) -> event_service_pb2_grpc.EventServiceAsyncStub:
    return event_service_pb2_grpc.EventServiceStub(channel)


def profile_stub(channel: grpc.aio.Channel) -> profile_service_pb2_grpc.ProfileServiceAsyncStub:
    return profile_service_pb2_grpc.ProfileServiceStub(channel)


@pytest.fixture
def http_url(server: Sendtime) -> str:
    return f"http://127.0.0.1:{server.http_port}"
