"""How a client command reaches the server: the connection flags, the address,
TLS and API key they resolve to, the check that something listens there, and
the wrapper that runs a command and prints its result or a clear error."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from sendtime.cli._output import CommandError, UsageError
from sendtime.cli._plugins import ServerSettings, settings_loader
from sendtime.client import Client, DeadlineExceeded, SendtimeError, Unavailable

#: The key the server accepts in development (its auth.dev_key setting).
DEV_KEY: Final = "dev-key"
#: How long the check that something listens at the target may take: a
#: refused connection answers at once, a silent host is given this long.
CONNECT_CHECK_S: Final = 2.0

#: A command's work: the result as a JSON object (keys starting with "_" are
#: for the readable output only) ...
Run = Callable[[Client, argparse.Namespace], dict[str, Any]]
#: ... and its readable form.
Show = Callable[[dict[str, Any]], str]


def connection_arguments() -> argparse.ArgumentParser:
    """The flags every client command takes, as a parent parser."""
    connection = argparse.ArgumentParser(add_help=False)
    group = connection.add_argument_group("connection")
    group.add_argument(
        "--config",
        metavar="FILE",
        help="the server's TOML settings: its gRPC host, port and TLS are dialled (default: "
        "$SENDTIME_CONFIG; SENDTIME_GRPC__PORT and the other SENDTIME_* variables apply on top, "
        "as for sendtime serve)",
    )
    group.add_argument(
        "--target",
        metavar="HOST:PORT",
        help="the server's gRPC address, over the settings (default: $SENDTIME_TARGET, else the "
        "settings' grpc.host:grpc.port, 127.0.0.1:50051 by default)",
    )
    group.add_argument(
        "--api-key",
        help="API key (default: $SENDTIME_API_KEY, else the development key dev-key)",
    )
    group.add_argument(
        "--tls",
        action="store_true",
        help="connect with TLS, system root certificates (on anyway when the settings have [grpc.tls])",
    )
    group.add_argument("--timeout", type=float, default=5.0, help="seconds before giving up (default: 5)")
    group.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return connection


def connect(args: argparse.Namespace) -> None:
    """Fill in args.target, args.tls and args.api_key as the flags, the
    environment and the server's settings say, and args.target_from with
    where the address came from (for the error when nothing listens)."""
    if args.target:
        args.target_from = "--target"
    elif os.environ.get("SENDTIME_TARGET"):
        args.target, args.target_from = os.environ["SENDTIME_TARGET"], "$SENDTIME_TARGET"
    config = args.config or os.environ.get("SENDTIME_CONFIG")
    settings = _server_settings(args, config)
    if not args.target:
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(  # noqa: S104
            settings.host, settings.host
        )
        args.target = f"[{host}]:{settings.port}" if ":" in host else f"{host}:{settings.port}"
        sources = [f"the [grpc] settings of {config}"] if config else []
        sources += sorted(name for name in os.environ if name.startswith("SENDTIME_GRPC__"))
        args.target_from = " and ".join(sources) or "the default settings"
        args.tls = args.tls or settings.tls
    if args.api_key is None:
        args.api_key = os.environ.get("SENDTIME_API_KEY")
    if args.api_key is None:
        if config and not settings.dev_key:
            raise UsageError(
                f"--api-key: {config} turns the development key off (auth.dev_key = false); "
                "give a key with --api-key or $SENDTIME_API_KEY"
            )
        args.api_key = DEV_KEY


def _server_settings(args: argparse.Namespace, config: str | None) -> ServerSettings:
    """The server's settings as the server would read them; the defaults when
    the server is not installed and nothing asks for its settings."""
    flag = "--config" if args.config else "$SENDTIME_CONFIG" if config else "SENDTIME_* variables"
    load = settings_loader()
    if load is None:
        asked = [flag] if config else []
        if not args.target:
            asked += sorted(name for name in os.environ if name.startswith("SENDTIME_GRPC__"))
        if asked:
            raise UsageError(
                f"{', '.join(asked)}: reading the server's settings needs the sendtime server "
                "installed beside this client; give the server's address with --target HOST:PORT"
            )
        return ServerSettings()
    try:
        return load(Path(config) if config else None)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def check_listening(target: str, target_from: str, timeout: float) -> None:
    """Fail at once when nothing listens at ``target``: gRPC would retry a
    refused connection until the call's timeout, and say less."""
    if "://" in target or target.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):
        return  # a gRPC name scheme: leave the resolving to gRPC
    parts = urlsplit(f"//{target}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or port is None:
        raise UsageError(f"{target_from}: {target!r} is not HOST:PORT")
    try:
        with socket.create_connection((host, port), timeout=min(timeout, CONNECT_CHECK_S)):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise CommandError(
            f"cannot reach sendtime at {target} (from {target_from}): {reason}. Is the server running? "
            "Start it with `sendtime serve` (or `make run`), or point this command at it with "
            "--config FILE, --target HOST:PORT or SENDTIME_GRPC__PORT as the server was started with."
        ) from None


def command(run: Run, show: Show) -> Callable[[argparse.Namespace], int]:
    """Wrap a command: connect, run, print the result or a clear error."""

    def main(args: argparse.Namespace) -> int:
        prog = f"sendtime {args.command}"
        try:
            if args.timeout <= 0:
                raise UsageError("--timeout: must be positive")
            connect(args)
            check_listening(args.target, args.target_from, args.timeout)
            with Client(args.target, args.api_key, tls=args.tls, default_timeout=args.timeout) as client:
                result = run(client, args)
        except UsageError as exc:
            if args.json:
                _json_error({"code": "INVALID_ARGUMENT", "message": str(exc)})
            else:
                print(f"{prog}: error: {exc}", file=sys.stderr)
            return 2
        except CommandError as exc:
            if args.json:
                _json_error({"code": "FAILED", "message": str(exc)})
            else:
                print(f"{prog}: {exc}", file=sys.stderr)
            return 1
        except SendtimeError as exc:
            _report(prog, args, exc)
            return 1
        try:
            public = {key: value for key, value in result.items() if not key.startswith("_")}
            print(json.dumps(public, ensure_ascii=False) if args.json else show(result), flush=True)
        except BrokenPipeError:  # piped into head: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        # a command that did its work may still report an outcome that is not success
        return int(result.get("_exit", 0))

    return main


def _json_error(error: Mapping[str, Any]) -> None:
    """With --json, an error is one JSON object on stderr: stdout holds only
    results, so a script reading it never mistakes an error for one."""
    print(json.dumps({"error": error}, ensure_ascii=False), file=sys.stderr)


def _report(prog: str, args: argparse.Namespace, error: SendtimeError) -> None:
    if args.json:
        _json_error(
            {
                "code": error.code.name,
                "reason": error.reason,
                "message": error.message,
                "field_violations": [
                    {"field": v.field, "description": v.description} for v in error.field_violations
                ],
            }
        )
        return
    # A violation the message already states is named by its field only, so
    # the reason is said once.
    stated = [v.field for v in error.field_violations if v.description in error.message]
    fields = f" (field {', '.join(stated)})" if stated else ""
    if isinstance(error, Unavailable):
        print(f"{prog}: cannot reach sendtime at {args.target}: {error.message}", file=sys.stderr)
    elif isinstance(error, DeadlineExceeded) and getattr(args, "deadline_ms", None) is not None:
        print(
            f"{prog}: no answer within --deadline-ms {args.deadline_ms:g}: {error.message}", file=sys.stderr
        )
    else:
        code = error.code.name.lower().replace("_", " ")
        print(f"{prog}: {code}: {error.message}{fields}", file=sys.stderr)
    for violation in error.field_violations:
        if violation.field not in stated:
            print(f"  {violation.field}: {violation.description}", file=sys.stderr)
