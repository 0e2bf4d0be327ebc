"""The ``sendtime`` command's parts from other distributions: commands added
through the ``sendtime.commands`` entry points (the server's serve, migrate
and keygen here), and what stands in for the server's when it is absent."""

from __future__ import annotations

import argparse
import contextlib
import io
from importlib.metadata import entry_points

import pytest

from sendtime.cli import Subcommands, build_parser, main
from sendtime.cli._plugins import COMMANDS_GROUP, SERVER_COMMANDS, SETTINGS_GROUP, settings_loader
from tests.unit.test_client_surface import sendtime_modules_imported_by


def test_the_server_registers_its_commands_and_settings_through_entry_points() -> None:
    assert [e.value for e in entry_points(group=COMMANDS_GROUP)] == ["sendtime.server.cli:add_commands"]
    assert [e.value for e in entry_points(group=SETTINGS_GROUP)] == [
        "sendtime.server.cli:connection_settings"
    ]
    commands = _commands(build_parser())
    assert {"serve", "migrate", "keygen"} <= set(commands)
    assert commands["serve"].get_default("run").__module__ == "sendtime.server.cli"


def test_a_plugin_adds_a_command_with_one_function() -> None:
    ran: list[argparse.Namespace] = []

    def hello(args: argparse.Namespace) -> int:
        ran.append(args)
        return 0

    def register(commands: Subcommands) -> None:
        parser = commands.add_parser("hello", help="say hello")
        parser.add_argument("--name", default="world")
        parser.set_defaults(run=hello)

    parser = build_parser([register])
    args = parser.parse_args(["hello", "--name", "ada"])
    assert args.run(args) == 0
    assert [a.name for a in ran] == ["ada"]
    # without the server's registration, its commands stand in and say it is missing
    commands = _commands(parser)
    assert set(SERVER_COMMANDS) <= set(commands)
    assert commands["serve"].get_default("run").__module__ == "sendtime.cli._plugins"


def test_the_server_commands_stand_in_without_reading_their_arguments(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = build_parser([])
    args, unknown = parser.parse_known_args(["serve", "--workers", "2"])
    assert unknown == ["--workers", "2"]
    assert args.run(args) == 1
    assert "the sendtime server is not installed here" in capsys.readouterr().err


def test_unknown_arguments_of_a_client_command_are_still_refused() -> None:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_:
        main(["profile", "u1", "--no-such-flag"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in stderr.getvalue()


def test_the_settings_reach_the_client_as_the_server_reads_them(monkeypatch: pytest.MonkeyPatch) -> None:
    load = settings_loader()
    assert load is not None
    monkeypatch.setenv("SENDTIME_GRPC__PORT", "6123")
    settings = load(None)
    assert (settings.host, settings.port, settings.tls, settings.dev_key) == ("127.0.0.1", 6123, False, True)
    monkeypatch.setenv("SENDTIME_GRPC__PORT", "seventy")
    with pytest.raises(ValueError, match=r"grpc\.port"):
        load(None)


def test_the_cli_package_does_not_import_the_server() -> None:
    modules = sendtime_modules_imported_by("sendtime.cli")
    assert not [m for m in modules if m.startswith("sendtime.server")]
    assert "sendtime.cli._deliveries" in modules


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)
