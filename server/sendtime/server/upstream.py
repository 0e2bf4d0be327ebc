"""Upstream content providers: HTTP JSON endpoints declared in config.

Each provider fills its URL template from the user's fields (URL-escaped), may
only call allowed hosts, never sends a path segment "." or ".." (a user id of
".." would otherwise climb out of the path the template meant), and fetches
within the time the caller has left: every attempt's timeout is the remaining
budget, and retries (transient failures only, exponential backoff with jitter)
stop when the budget does. Caching, single flight and the circuit breaker sit
around it in the content pipeline; this module only speaks HTTP.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Mapping
from typing import Any, Final, Protocol
from urllib.parse import quote, urlsplit

import aiohttp
import msgspec
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.trace import SpanKind, StatusCode, Tracer
from yarl import URL

from sendtime.server.domain.content import MissingValueError, RefusedUrlError
from sendtime.server.settings import UpstreamSettings

_PLACEHOLDER: Final = re.compile(r"\{((?:user|context)\.[A-Za-z0-9_]+)\}")
_RETRY_STATUSES: Final = frozenset({429, 500, 502, 503, 504})
_BACKOFF_BASE_S: Final = 0.02
_DOT_SEGMENTS: Final = frozenset({".", ".."})


class UpstreamFailure(Exception):
    """The upstream answered badly or not at all; ``detail`` says how."""

    def __init__(
        self, detail: str, *, retryable: bool = False, status: int = 0, outcome: str = "http_error"
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retryable = retryable
        #: The HTTP status, when the upstream answered with one.
        self.status = status
        #: For metrics: "http_error" or "bad_answer".
        self.outcome = outcome


class CallObserver(Protocol):
    def called(self, host: str, outcome: str, seconds: float) -> None:
        """One HTTP call: "ok", "http_error", "bad_answer", "timeout",
        "connection_error" or "cancelled", and how long it took."""
        ...


class UpstreamProvider:
    def __init__(
        self,
        settings: UpstreamSettings,
        session: aiohttp.ClientSession,
        allowed_hosts: frozenset[str],
        *,
        observer: CallObserver | None = None,
        tracer: Tracer | None = None,
        propagator: TextMapPropagator | None = None,
    ) -> None:
        self._observer = observer
        self._tracer = tracer
        #: Puts the trace context (W3C traceparent) on each call.
        self._propagator = propagator
        self.settings = settings
        self.name = settings.name
        self._session = session
        self._allowed = allowed_hosts
        literal_host = urlsplit(settings.url).hostname or ""
        if "{" not in literal_host and literal_host not in allowed_hosts:
            raise ValueError(
                f"upstreams[{settings.name}]: host {literal_host!r} is not in content.allowed_upstream_hosts"
            )
        self.host = literal_host
        self._templated_host = "{" in literal_host
        self.timeout_s = settings.timeout_s
        self.ttl_s = settings.ttl_s
        self.stale_ttl_s = settings.stale_ttl_s

    def url_for(self, values: Mapping[str, str]) -> str:
        """The URL with placeholders filled in, each value escaped as one path or query component."""

        def fill(match: re.Match[str]) -> str:
            value = values.get(match.group(1))
            if not value:
                raise MissingValueError(f"{self.name}: the profile has no {match.group(1)}")
            return quote(value, safe="")

        url = _PLACEHOLDER.sub(fill, self.settings.url)
        parts = urlsplit(url)
        host = parts.hostname or ""
        if host not in self._allowed:
            raise RefusedUrlError(f"{self.name}: host {host!r} is not in content.allowed_upstream_hosts")
        # quote() leaves dots alone, and a server (or a proxy on the way)
        # resolves "." and ".." segments: refuse them rather than send them.
        if any(segment in _DOT_SEGMENTS for segment in parts.path.split("/")):
            raise RefusedUrlError(f"{self.name}: the user's fields make a path segment '.' or '..'")
        return url

    async def fetch(self, url: str, budget_s: float) -> Any:
        """GET (or POST) ``url`` and decode its JSON, retrying transient failures
        while the budget lasts: each attempt's timeout is what is left of it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget_s
        attempt = 0
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"{self.name}: no answer within the budget")
            try:
                return await self._attempt(url, remaining)
            except (UpstreamFailure, aiohttp.ClientError) as failure:
                retryable = isinstance(failure, aiohttp.ClientError) or failure.retryable
                attempt += 1
                if not retryable or attempt > self.settings.retries:
                    if isinstance(failure, UpstreamFailure):
                        raise
                    raise UpstreamFailure(f"{self.name}: {type(failure).__name__}: {failure}") from failure
                backoff = _BACKOFF_BASE_S * (2**attempt) * random.uniform(0.5, 1.5)
                if loop.time() + backoff >= deadline:
                    raise UpstreamFailure(f"{self.name}: failed and no time is left to retry") from failure
                await asyncio.sleep(backoff)

    async def _attempt(self, url: str, timeout_s: float) -> Any:
        if self._observer is None and self._tracer is None:
            return await self._request(url, timeout_s, self.settings.headers)
        host = (urlsplit(url).hostname or "") if self._templated_host else self.host
        started = time.perf_counter()
        outcome = "cancelled"
        try:
            if self._tracer is None:
                answer = await self._request(url, timeout_s, self.settings.headers)
            else:
                answer = await self._traced(url, timeout_s, host)
            outcome = "ok"
            return answer
        except UpstreamFailure as failure:
            outcome = failure.outcome
            raise
        except TimeoutError:
            outcome = "timeout"
            raise
        except aiohttp.ClientError:
            outcome = "connection_error"
            raise
        finally:
            if self._observer is not None:
                self._observer.called(host, outcome, time.perf_counter() - started)

    async def _traced(self, url: str, timeout_s: float, host: str) -> Any:
        assert self._tracer is not None
        settings = self.settings
        # The URL template, not the URL: the filled one carries the user's fields.
        with self._tracer.start_as_current_span(
            f"{settings.method} {self.name}",
            kind=SpanKind.CLIENT,
            attributes={
                "http.request.method": settings.method,
                "server.address": host,
                "sendtime.upstream": self.name,
                "sendtime.upstream.url_template": settings.url,
            },
        ) as span:
            headers = dict(settings.headers)
            if self._propagator is not None:
                self._propagator.inject(headers)
            try:
                return await self._request(url, timeout_s, headers)
            except UpstreamFailure as failure:
                if failure.status:
                    span.set_attribute("http.response.status_code", failure.status)
                span.set_status(StatusCode.ERROR, failure.outcome)
                raise

    async def _request(self, url: str, timeout_s: float, headers: Mapping[str, str]) -> Any:
        settings = self.settings
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        # encoded=True: send the URL exactly as url_for escaped it (yarl would
        # otherwise re-normalise the user's fields)
        async with self._session.request(
            settings.method,
            URL(url, encoded=True),
            headers=headers,
            timeout=timeout,
            allow_redirects=False,
        ) as response:
            if response.status != 200:
                raise UpstreamFailure(
                    f"{self.name}: HTTP {response.status}",
                    retryable=response.status in _RETRY_STATUSES,
                    status=response.status,
                )
            body = await response.content.read(settings.max_response_bytes + 1)
        if len(body) > settings.max_response_bytes:
            raise UpstreamFailure(
                f"{self.name}: the answer is larger than {settings.max_response_bytes} bytes",
                outcome="bad_answer",
            )
        try:
            return msgspec.json.decode(body)
        except msgspec.DecodeError as exc:
            raise UpstreamFailure(
                f"{self.name}: the answer is not JSON: {exc}", outcome="bad_answer"
            ) from None
