"""The ``sendtime`` command.

    sendtime serve [--config FILE] [--workers N]
                                       run the server (gRPC + HTTP), in N processes
    sendtime migrate [--config FILE]   bring the PostgreSQL schema up to date
    sendtime keygen --name N --scopes ingest,content
                                       make an API key and the hash to configure

Client commands talk to a running server (see CLIENT_HELP below and
``sendtime COMMAND --help``): track, identify, profile, content, render,
preview, demo-data, send, deliveries, flows.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from sendtime.server.settings import DEV_KEY, Scope, Settings, SettingsError, hash_key, load_settings

Command = Callable[[argparse.Namespace], int]

CLIENT_HELP = """\
client commands (track ... flows) reach the server these settings describe,
as `sendtime serve` reads them:
  --config FILE or SENDTIME_CONFIG      the server's TOML file (its [grpc] host, port, tls)
  SENDTIME_GRPC__PORT=6000 and others   the same overrides the server takes
  --target HOST:PORT or SENDTIME_TARGET a server's gRPC address outright
  --api-key KEY or SENDTIME_API_KEY     the API key (default: dev-key, for make run)
With none of them: 127.0.0.1:50051 and dev-key, what `make run` serves.
Over gRPC the key travels as the metadata "authorization: Bearer KEY".
Example: SENDTIME_GRPC__PORT=51051 sendtime profile ada --json
"""


def _serve(args: argparse.Namespace) -> int:
    from sendtime.server.app import Sendtime, serve

    config = args.config or os.environ.get("SENDTIME_CONFIG")
    try:
        settings = load_settings(Path(config) if config else None)
    except SettingsError as exc:
        print(f"sendtime: {exc}", file=sys.stderr)
        return 2
    from sendtime.server.observe import configure_logging

    workers = args.workers or settings.server.workers
    if workers > 1:
        from sendtime.server.supervisor import WorkersRefused, check_workers, supervise

        try:
            check_workers(settings, workers)
        except WorkersRefused as exc:
            print(f"sendtime: {exc}", file=sys.stderr)
            return 2
        stop_logging = configure_logging(settings.log_level, settings.logging)
        try:
            return supervise(settings, workers, Path(config) if config else None)
        finally:
            stop_logging()
    stop_logging = configure_logging(settings.log_level, settings.logging)
    _warn_dev_key(settings)

    def ready(app: Sendtime) -> None:
        scheme = "https" if settings.http.tls else "http"
        print(
            f"sendtime serving gRPC on {settings.grpc.host}:{app.grpc_port}, "
            f"HTTP on {scheme}://{settings.http.host}:{app.http_port}, "
            f"data in {settings.storage.data_dir.resolve()}",
            flush=True,
        )

    try:
        serve(settings, ready)
    except Exception as exc:  # a start failure: say why, without a traceback
        from sendtime.server.domain.errors import SendtimeError

        if not isinstance(exc, SendtimeError | OSError):
            raise
        logging.getLogger("sendtime").error("cannot start: %s", exc)
        return 1
    finally:
        stop_logging()  # every line queued so far is written
    return 0


def _warn_dev_key(settings: Settings) -> None:
    exposed = settings.edges_beyond_loopback()
    if settings.dev_key_works() and exposed:  # allowed by auth.dev_key_beyond_loopback only
        logging.getLogger("sendtime").error(
            "the development API key %r is accepted with every scope while %s listens beyond"
            " loopback (auth.dev_key_beyond_loopback): anyone who reaches it can read profiles"
            " and send email. Configure auth.keys and set auth.dev_key = false.",
            DEV_KEY,
            " and ".join(exposed),
        )
    elif settings.dev_key_works():
        logging.getLogger("sendtime").warning(
            "the development API key %r is accepted with every scope. For development only:"
            " set auth.dev_key = false and configure auth.keys in production.",
            DEV_KEY,
        )


def _keygen(args: argparse.Namespace) -> int:
    try:
        scopes = [Scope(s.strip()) for s in args.scopes.split(",") if s.strip()]
    except ValueError as exc:
        print(f"sendtime keygen: --scopes: {exc}; choose from {', '.join(Scope)}", file=sys.stderr)
        return 2
    key = "st_" + secrets.token_urlsafe(32)
    print(f"API key (shown once, give it to the caller): {key}")
    print("Add to the server's config:")
    print("[[auth.keys]]")
    print(f'name = "{args.name}"')
    print(f'hash = "{hash_key(key)}"')
    print(f"scopes = [{', '.join(repr(s.value).replace(chr(39), chr(34)) for s in scopes)}]")
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from sendtime.server.app import migrate

    config = args.config or os.environ.get("SENDTIME_CONFIG")
    try:
        print(migrate(load_settings(Path(config) if config else None)))
    except SettingsError as exc:
        print(f"sendtime: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"sendtime: cannot reach the database: {exc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sendtime",
        description="Real-time email personalization service.",
        epilog=CLIENT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument(
        "--config", help="TOML settings file (default: $SENDTIME_CONFIG, else built-in defaults)"
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=0,
        help="processes sharing the two ports (default: server.workers); more than 1 needs PostgreSQL",
    )
    serve.set_defaults(run=_serve)

    migrate = commands.add_parser(
        "migrate", help="bring the PostgreSQL schema up to date (serve does it too)"
    )
    migrate.add_argument("--config", help="TOML settings file (default: $SENDTIME_CONFIG)")
    migrate.set_defaults(run=_migrate)

    keygen = commands.add_parser("keygen", help="make an API key and the hash to put in the config")
    keygen.add_argument("--name", required=True, help="who the key is for")
    keygen.add_argument("--scopes", required=True, help=f"comma-separated: {', '.join(Scope)}")
    keygen.set_defaults(run=_keygen)

    from sendtime.server import cli_client

    cli_client.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Command = args.run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
