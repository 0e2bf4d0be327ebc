"""The ``sendtime`` command's root: each command group registers its
subcommands, and installed distributions add theirs (sendtime.cli._plugins)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Sequence

from sendtime.cli import _broadcasts, _content, _deliveries, _demo, _events, _profiles
from sendtime.cli._connection import connection_arguments
from sendtime.cli._plugins import Register, add_missing_server_commands, command_plugins, server_missing

HELP = """\
client commands (track ... flows) reach the server these settings describe,
as `sendtime serve` reads them:
  --config FILE or SENDTIME_CONFIG      the server's TOML file (its [grpc] host, port, tls)
  SENDTIME_GRPC__PORT=6000 and others   the same overrides the server takes
  --target HOST:PORT or SENDTIME_TARGET a server's gRPC address outright
  --api-key KEY or SENDTIME_API_KEY     the API key (default: dev-key, for make run)
With none of them: 127.0.0.1:50051 and dev-key, what `make run` serves.
Over gRPC the key travels as the metadata "authorization: Bearer KEY".
Reading --config and SENDTIME_GRPC__* needs the server installed beside the
client; with the client alone, give --target.
Example: SENDTIME_GRPC__PORT=51051 sendtime profile ada --json
"""

#: The client's command groups, in the order the help lists them.
GROUPS = (_events, _profiles, _content, _demo, _deliveries, _broadcasts)

Command = Callable[[argparse.Namespace], int]


def build_parser(plugins: Iterable[Register] | None = None) -> argparse.ArgumentParser:
    """The whole command line; ``plugins`` default to the installed ones."""
    parser = argparse.ArgumentParser(
        prog="sendtime",
        description="Real-time email personalization service.",
        epilog=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in command_plugins() if plugins is None else plugins:
        register(commands)
    add_missing_server_commands(commands)
    connection = connection_arguments()
    for group in GROUPS:
        group.register(commands, connection)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    run: Command = args.run
    # A server command without the server says so whatever its arguments are.
    if unknown and run is not server_missing:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return run(args)
