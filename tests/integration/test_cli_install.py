"""``pip install ./clients/python`` alone, into a fresh virtual environment,
gives a ``sendtime`` command whose client commands work against a running
server, and whose server commands say that the server is not installed.

The server is this test's own (the project's environment, 127.0.0.1:0); the
fresh environment has the client's dependencies only."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from sendtime.server.app import Sendtime
from tests.integration.server_process import Result

CLIENT = Path(__file__).parents[2] / "clients" / "python"

pytestmark = pytest.mark.slow


async def run(*command: str | Path, env: dict[str, str] | None = None, timeout: float = 60) -> Result:
    process = await asyncio.create_subprocess_exec(
        *command, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


async def test_the_client_alone_gives_a_working_sendtime_command(server: Sendtime, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    made = await run(sys.executable, "-m", "venv", venv)
    assert made.code == 0, made.stderr
    installed = await run(venv / "bin" / "python", "-m", "pip", "install", "--quiet", CLIENT, timeout=300)
    assert installed.code == 0, installed.stderr
    sendtime = venv / "bin" / "sendtime"
    # the client only: no server package, none of its dependencies
    probe = await run(
        venv / "bin" / "python", "-c", "import importlib.util as u; print(u.find_spec('sendtime.server'))"
    )
    assert probe.stdout.strip() == "None", probe

    env = {k: v for k, v in os.environ.items() if not k.startswith("SENDTIME_")}
    target = ("--target", f"127.0.0.1:{server.grpc_port}")
    tracked = await run(
        sendtime,
        "track",
        "Product Added",
        "--user",
        "u1",
        "--properties",
        '{"product_id": "p1", "cart_id": "c1", "name": "Socks", "price": 9.5, "quantity": 2}',
        "--message-id",
        "install-1",
        "--json",
        *target,
        env=env,
    )
    assert (tracked.code, json.loads(tracked.stdout or "{}")) == (
        0,
        {"message_id": "install-1", "outcome": "accepted"},
    ), tracked.stderr

    profile = await run(sendtime, "profile", "u1", "--json", *target, env=env)
    assert profile.code == 0, profile.stderr
    assert [line["product_id"] for line in json.loads(profile.stdout)["carts"][0]["lines"]] == ["p1"]

    content = await run(sendtime, "content", "u1", "--blocks", "cart", "--json", *target, env=env)
    assert content.code == 0, content.stderr
    cart = json.loads(content.stdout)["blocks"]["cart"]
    assert [line["product"]["id"] for line in cart["data"]["lines"]] == ["p1"]

    # readable output too, through $SENDTIME_TARGET
    readable = await run(sendtime, "profile", "u1", env=env | {"SENDTIME_TARGET": target[1]})
    assert (readable.code, readable.stdout.splitlines()[0]) == (0, "user u1"), readable.stderr

    for command in (("serve",), ("serve", "--config", "x.toml", "--workers", "2"), ("migrate",)):
        refused = await run(sendtime, *command, env=env)
        assert refused.code == 1, (command, refused)
        assert "the sendtime server is not installed here" in refused.stderr, refused.stderr
        assert refused.stdout == ""

    # the server's settings cannot be read without it: said, not silently ignored
    for flags, extra, named in (
        (("--config", "server.toml"), {}, "--config"),
        ((), {"SENDTIME_GRPC__PORT": str(server.grpc_port)}, "SENDTIME_GRPC__PORT"),
    ):
        unread = await run(sendtime, "profile", "u1", *flags, env=env | extra)
        assert unread.code == 2, unread
        assert f"{named}: reading the server's settings needs the sendtime server" in unread.stderr
