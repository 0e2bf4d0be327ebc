"""What the async and the sync client share: credentials, metadata, channel
options and argument checks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import grpc

DEFAULT_TIMEOUT: Final = 5.0

ChannelOptions = Sequence[tuple[str, Any]]

#: grpc's own reconnect backoff starts at 1 s and grows to 2 minutes; calls
#: made while it waits fail at once with UNAVAILABLE. Keep it short, so a
#: restarted server is found again within our own retries and deadlines.
DEFAULT_CHANNEL_OPTIONS: Final[ChannelOptions] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


def credentials(tls: bool | grpc.ChannelCredentials) -> grpc.ChannelCredentials | None:
    """None for plaintext; the system's roots for ``tls=True``."""
    if isinstance(tls, grpc.ChannelCredentials):
        return tls
    return grpc.ssl_channel_credentials() if tls else None


def auth_metadata(api_key: str) -> tuple[tuple[str, str], ...]:
    if not api_key:
        raise ValueError("api_key must not be empty")
    return (("authorization", f"Bearer {api_key}"),)


def channel_options(extra: ChannelOptions) -> list[tuple[str, Any]]:
    given = {name for name, _ in extra}
    return [*extra, *(option for option in DEFAULT_CHANNEL_OPTIONS if option[0] not in given)]


def check_timeout(timeout: float) -> float:
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, not {timeout}")
    return timeout
