"""How the ``sendtime`` client commands find the server: the same settings the
server reads (--config, SENDTIME_CONFIG, SENDTIME_GRPC__PORT), --target over
them, a clear and prompt error when nothing listens, and errors on stderr only
with --json. Real CLI processes against a real sendtime on 127.0.0.1:0."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from sendtime.server.app import Sendtime
from tests.integration.server_process import Result, run_sendtime

# slow: each command runs the CLI as a process of its own (make test-fast leaves them out)
pytestmark = pytest.mark.slow


async def run_cli(*args: str, cwd: Path, **env: str) -> Result:
    # Generous, and far under the --timeout the unreachable cases pass: a
    # command that waited for its timeout instead of failing fast ends here.
    return await run_sendtime(*args, cwd=cwd, env=env, timeout=45)


def free_port() -> int:
    with socket.socket() as sock:  # a port nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_the_cli_dials_the_port_the_servers_settings_name(server: Sendtime, tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    # a server listening on every address (so it must force the dev key on) is dialled on loopback
    config.write_text(
        f'[grpc]\nhost = "0.0.0.0"\nport = {server.grpc_port}\n[auth]\ndev_key_beyond_loopback = true\n'
    )

    for how in (
        {"args": ("--config", str(config))},
        {"env": {"SENDTIME_CONFIG": str(config)}},
        {"env": {"SENDTIME_GRPC__PORT": str(server.grpc_port)}},
    ):
        args: tuple[str, ...] = how.get("args", ())  # type: ignore[assignment]
        env: dict[str, str] = how.get("env", {})  # type: ignore[assignment]
        result = await run_cli("flows", "--json", *args, cwd=tmp_path, **env)
        assert result.code == 0, (how, result.stderr)
        assert [f["id"] for f in json.loads(result.stdout)["flows"]] == [
            "abandoned_cart",
            "browse_abandonment",
            "post_purchase",
        ]

    # --target wins over the settings, as the help says
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(f"[grpc]\nport = {free_port()}\n")
    result = await run_cli(
        "flows", "--config", str(wrong), "--target", f"127.0.0.1:{server.grpc_port}", cwd=tmp_path
    )
    assert result.code == 0, result.stderr


async def test_a_config_without_the_dev_key_asks_for_a_key(server: Sendtime, tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text(f"[grpc]\nport = {server.grpc_port}\n[auth]\ndev_key = false\n")
    result = await run_cli("flows", "--config", str(config), cwd=tmp_path)
    assert result.code == 2
    assert "auth.dev_key = false" in result.stderr
    assert "--api-key" in result.stderr


async def test_nothing_listening_fails_at_once_naming_where_the_address_came_from(tmp_path: Path) -> None:
    port = free_port()
    from_env = await run_cli("flows", "--timeout", "120", cwd=tmp_path, SENDTIME_GRPC__PORT=str(port))
    assert from_env.code == 1
    assert f"cannot reach sendtime at 127.0.0.1:{port} (from SENDTIME_GRPC__PORT)" in from_env.stderr
    assert "sendtime serve" in from_env.stderr

    config = tmp_path / "server.toml"
    config.write_text(f"[grpc]\nport = {port}\n")
    from_config = await run_cli("profile", "ada", "--config", str(config), "--timeout", "120", cwd=tmp_path)
    assert from_config.code == 1
    assert f"(from the [grpc] settings of {config})" in from_config.stderr


async def test_with_json_errors_go_to_stderr_only(server: Sendtime, tmp_path: Path) -> None:
    target = f"127.0.0.1:{server.grpc_port}"
    refused = await run_cli("profile", "nobody", "--json", "--target", target, cwd=tmp_path)
    assert (refused.code, refused.stdout) == (1, "")
    assert json.loads(refused.stderr)["error"]["code"] == "NOT_FOUND"

    unreachable = await run_cli("flows", "--json", "--target", f"127.0.0.1:{free_port()}", cwd=tmp_path)
    assert (unreachable.code, unreachable.stdout) == (1, "")
    assert "cannot reach sendtime" in json.loads(unreachable.stderr)["error"]["message"]

    bad = await run_cli(
        "track", "X", "--user", "u", "--properties", "[1]", "--json", "--target", target, cwd=tmp_path
    )
    assert (bad.code, bad.stdout) == (2, "")
    assert "--properties" in json.loads(bad.stderr)["error"]["message"]


async def test_top_level_help_says_how_to_reach_a_server_and_pass_a_key(tmp_path: Path) -> None:
    result = await run_cli("--help", cwd=tmp_path)
    assert result.code == 0
    for needed in ("--config", "SENDTIME_CONFIG", "SENDTIME_GRPC__PORT", "--target", "SENDTIME_API_KEY"):
        assert needed in result.stdout, needed
    assert "authorization: Bearer KEY" in result.stdout
