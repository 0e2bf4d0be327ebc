"""What other installed distributions add to the CLI, found through entry points.

The client works alone against any server it can reach. The server
distribution, when installed beside it, adds two things:

- ``sendtime.commands``: functions ``register(commands)`` that add
  subcommands (the server adds ``serve``, ``migrate`` and ``keygen``);
- ``sendtime.settings``: one function ``load(config) -> ServerSettings`` that
  reads the server's settings (its TOML file and SENDTIME_* variables), so a
  client command dials the address ``sendtime serve`` would listen on.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Final, TypeAlias

COMMANDS_GROUP: Final = "sendtime.commands"
SETTINGS_GROUP: Final = "sendtime.settings"
#: The commands the server distribution brings: without it, they say so.
SERVER_COMMANDS: Final = {
    "serve": "run the server",
    "migrate": "bring the PostgreSQL schema up to date",
    "keygen": "make an API key and the hash to put in the config",
}
SERVER_MISSING: Final = (
    "the sendtime server is not installed here: this is the client alone (pip install "
    "./clients/python). Install the server beside it (pip install . in a sendtime checkout), or "
    "point the client commands at a running server with --target HOST:PORT."
)

#: What ``add_subparsers`` returns (not subscriptable at run time, hence a string).
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
Register = Callable[[Subcommands], None]


@dataclass(frozen=True)
class ServerSettings:
    """What a client command needs of the server's settings."""

    host: str = "127.0.0.1"
    port: int = 50051
    tls: bool = False
    #: Whether the server accepts the development key (dev-key).
    dev_key: bool = True


#: Reads the server's settings from its TOML file (None: defaults) and the
#: SENDTIME_* variables; raises ValueError naming what is wrong.
SettingsLoader = Callable[[Path | None], ServerSettings]


def command_plugins() -> Iterator[Register]:
    for entry in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        register: Register = entry.load()
        yield register


def settings_loader() -> SettingsLoader | None:
    """The server's settings loader, or None when the server is not installed."""
    for entry in entry_points(group=SETTINGS_GROUP):
        loader: SettingsLoader = entry.load()
        return loader
    return None


def add_missing_server_commands(commands: Subcommands) -> None:
    """The server's commands, where it is not installed: each says so and exits 1."""
    taken = set(commands.choices)
    for name, what in SERVER_COMMANDS.items():
        if name in taken:
            continue
        parser = commands.add_parser(name, help=f"{what} (needs the sendtime server installed)")
        parser.set_defaults(run=server_missing)


def server_missing(args: argparse.Namespace) -> int:
    """Run for a server command without the server: its arguments are not read."""
    print(f"sendtime {args.command}: {SERVER_MISSING}", file=sys.stderr)
    return 1
