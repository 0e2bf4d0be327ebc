"""What the HTTP ESP adapters share: one aiohttp session per adapter (its
connection pool is the connection reuse), one POST per attempt, and the mapping
of what came back onto the two kinds of failure.

Status codes: 2xx is the adapter's to read; 408, 429 and 5xx are worth another
try (with the ESP's Retry-After); any other 4xx is the ESP refusing for good.
A failure before the request went out (connecting, a timeout while connecting)
is transient. After it went out, the ESP may have taken the message anyway: a
timeout, or a new connection lost before the answer, is uncertain (retried only
by adapters whose ESP honours our idempotency key). A reused keep-alive
connection lost before the answer stays transient: that is nearly always the
ESP having closed it while idle, before our request reached it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Final

import aiohttp
import msgspec
from multidict import CIMultiDictProxy

from sendtime.server.relay.base import (
    PermanentFailure,
    RelayFailure,
    TransientFailure,
    UncertainFailure,
    retry_after,
)

USER_AGENT: Final = "sendtime-relay/0.1"
_MAX_REASON_CHARS: Final = 500
_JSON = msgspec.json.Decoder()


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON, or None when it is not JSON."""
        try:
            return _JSON.decode(self.body)
        except msgspec.DecodeError:
            return None

    def text(self) -> str:
        return self.body.decode("utf-8", "replace").strip()[:_MAX_REASON_CHARS]


def failure(relay: str, reply: Reply, reason: str, *, transient: bool | None = None) -> RelayFailure:
    """The failure an unsuccessful reply stands for; ``transient`` overrides the
    status-code rule where the ESP's own error code says otherwise."""
    if transient is None:
        transient = reply.status in (408, 429) or reply.status >= 500
    text = f"{relay}: HTTP {reply.status}: {reason or reply.text() or 'no reason given'}"
    if transient:
        return TransientFailure(text, retry_after_s=retry_after(reply.headers.get("Retry-After")))
    return PermanentFailure(text)


@dataclass(slots=True)
class _RequestProgress:
    """How far one POST got, told by aiohttp's request tracing."""

    went_out: bool = False
    reused_connection: bool = False


async def _on_reused(_session: object, ctx: SimpleNamespace, _params: object) -> None:
    ctx.trace_request_ctx.reused_connection = True


async def _on_headers_sent(_session: object, ctx: SimpleNamespace, _params: object) -> None:
    ctx.trace_request_ctx.went_out = True


class HttpRelayBase:
    """One aiohttp session, made on first use (inside the running loop) and
    closed by ``close()``."""

    name: str
    idempotent: bool = False

    def __init__(self, *, timeout_s: float) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            progress = aiohttp.TraceConfig(trace_config_ctx_factory=SimpleNamespace)
            progress.on_connection_reuseconn.append(_on_reused)
            progress.on_request_headers_sent.append(_on_headers_sent)
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                headers={"User-Agent": USER_AGENT},
                raise_for_status=False,
                trace_configs=[progress],
            )
        return self._session

    async def _post(self, url: str, *, headers: Mapping[str, str], data: bytes | aiohttp.FormData) -> Reply:
        progress = _RequestProgress()
        try:
            async with self._client().post(
                url, data=data, headers=dict(headers), trace_request_ctx=progress
            ) as response:
                return Reply(response.status, response.headers, await response.read())
        except aiohttp.InvalidURL as error:
            raise PermanentFailure(f"{self.name}: invalid URL {url!r}") from error
        except aiohttp.ClientConnectorCertificateError as error:
            # a certificate that does not verify is a setup problem, not bad luck
            raise PermanentFailure(f"{self.name}: TLS certificate refused: {error}") from error
        except (aiohttp.ClientError, TimeoutError) as error:
            reason = f"{self.name}: {type(error).__name__}: {error}".rstrip(": ")
            if progress.went_out and (
                isinstance(error, TimeoutError)
                or (isinstance(error, aiohttp.ServerDisconnectedError) and not progress.reused_connection)
            ):
                raise UncertainFailure(f"{reason} (after the request went out)") from error
            raise TransientFailure(reason) from error

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def encode_json(value: object) -> bytes:
    return msgspec.json.encode(value)


JSON_HEADERS: Final[Mapping[str, str]] = {"Content-Type": "application/json", "Accept": "application/json"}
