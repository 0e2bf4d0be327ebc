"""The server's part of the ``sendtime`` command, which the client
distribution owns (sendtime.cli); it finds these through entry points:

    sendtime serve [--config FILE] [--workers N]
                                       run the server (gRPC + HTTP), in N processes
    sendtime migrate [--config FILE]   bring the PostgreSQL schema up to date
    sendtime keygen --name N --scopes ingest,content
                                       make an API key and the hash to configure

and the client commands (track, profile, content ...) read the server's
settings through ``connection_settings``, to dial where ``serve`` listens.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
from pathlib import Path

from sendtime.cli import ServerSettings, Subcommands
from sendtime.server.settings import DEV_KEY, Scope, Settings, SettingsError, hash_key, load_settings


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


def add_commands(commands: Subcommands) -> None:
    """The server's commands, added to the client's ``sendtime`` command (the
    ``sendtime.commands`` entry point)."""
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


def connection_settings(config: Path | None) -> ServerSettings:
    """What the client commands dial, read as ``sendtime serve`` reads its
    settings (the ``sendtime.settings`` entry point)."""
    try:
        settings = load_settings(config)
    except SettingsError as exc:
        raise ValueError(str(exc)) from None
    return ServerSettings(
        host=settings.grpc.host,
        port=settings.grpc.port,
        tls=settings.grpc.tls is not None,
        dev_key=settings.auth.dev_key,
    )
