"""What the HTTP ESP adapters share: one aiohttp session per adapter (its
connection pool is the connection reuse), one POST per attempt, and the mapping
of what came back onto the two kinds of failure.

Status codes: 2xx is the adapter's to read; 408, 429 and 5xx are worth another
try (with the ESP's Retry-After); any other 4xx is the ESP refusing for good.
Connection errors and timeouts are transient. A timeout after the request went
out is the one case where the ESP may have taken the message anyway: only
adapters whose ESP honours our idempotency key can retry that without risk.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import msgspec
from multidict import CIMultiDictProxy

from sendtime.server.relay.base import PermanentFailure, RelayFailure, TransientFailure, retry_after

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
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, headers={"User-Agent": USER_AGENT}, raise_for_status=False
            )
        return self._session

    async def _post(self, url: str, *, headers: Mapping[str, str], data: bytes | aiohttp.FormData) -> Reply:
        try:
            async with self._client().post(url, data=data, headers=dict(headers)) as response:
                return Reply(response.status, response.headers, await response.read())
        except aiohttp.InvalidURL as error:
            raise PermanentFailure(f"{self.name}: invalid URL {url!r}") from error
        except aiohttp.ClientConnectorCertificateError as error:
            # a certificate that does not verify is a setup problem, not bad luck
            raise PermanentFailure(f"{self.name}: TLS certificate refused: {error}") from error
        except (aiohttp.ClientError, TimeoutError) as error:
            raise TransientFailure(f"{self.name}: {type(error).__name__}: {error}".rstrip(": ")) from error

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def encode_json(value: object) -> bytes:
    return msgspec.json.encode(value)


JSON_HEADERS: Final[Mapping[str, str]] = {"Content-Type": "application/json", "Accept": "application/json"}
