"""What sendtime shows of itself: Prometheus metrics, structured logs, traces.

``Telemetry`` is built once per server from its Settings (app.Sendtime does)
and hands each part what it needs: the edges the request recorders, the
domain its observers (None when there is nothing to observe, so the hot paths
skip the calls), a tracer to the code that makes spans.

    metrics.CATALOGUE     every metric family exported
    logs.configure_logging   stderr as JSON lines (or readable on a terminal)
    tracing.build_tracing    OpenTelemetry over OTLP, when configured
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from importlib import metadata
from typing import TYPE_CHECKING, Any

from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.trace import Tracer

from sendtime.server.observe.logs import (
    AccessLog,
    DeliveryLog,
    RequestIds,
    UserIds,
    configure_logging,
    hash_user_id,
    request_id,
)
from sendtime.server.observe.metrics import CATALOGUE, Kind, MetricInfo, Metrics
from sendtime.server.observe.tracing import Tracing, build_tracing
from sendtime.server.settings import Settings

if TYPE_CHECKING:
    from sendtime.server.dispatch import Attempt
    from sendtime.server.domain.content import ContentObserver
    from sendtime.server.domain.ingest import IngestObserver
    from sendtime.server.domain.sends import SendRecord
    from sendtime.server.observe.metrics import RelayMetrics, SendMetrics, UpstreamMetrics


class Telemetry:
    def __init__(self, settings: Settings, *, span_exporter: SpanExporter | None = None) -> None:
        version = _version()
        self.metrics = Metrics(version) if settings.metrics.enabled else None
        self.metrics_need_key = settings.metrics_need_key()
        self.tracing = build_tracing(settings.tracing, span_exporter)
        self.users = UserIds(hashed=settings.logging.hash_user_ids)
        self.access_log = AccessLog(self.users) if settings.logging.access_log else None
        self.delivery_log = DeliveryLog(self.users)
        self.request_ids = RequestIds()

    @property
    def tracer(self) -> Tracer | None:
        return self.tracing.tracer if self.tracing is not None else None

    @property
    def propagator(self) -> TextMapPropagator | None:
        return self.tracing.propagator if self.tracing is not None else None

    def records_requests(self) -> bool:
        """Whether the edges need a recorder around each call at all."""
        return (
            self.metrics is not None
            or self.tracing is not None
            or (self.access_log is not None and self.access_log.enabled)
        )

    def content_observer(self, block_names: Iterable[str]) -> ContentObserver | None:
        return self.metrics.content(block_names) if self.metrics is not None else None

    def ingest_observer(self) -> IngestObserver | None:
        return self.metrics.ingest() if self.metrics is not None else None

    def upstream_observer(self, name: str) -> UpstreamMetrics | None:
        return self.metrics.upstream(name) if self.metrics is not None else None

    def relay_observer(self, name: str) -> RelayMetrics | None:
        return self.metrics.relay(name) if self.metrics is not None else None

    def send_observer(self) -> SendObserver:
        return SendObserver(self.metrics.sends() if self.metrics is not None else None, self.delivery_log)

    async def aclose(self) -> None:
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)


class SendObserver:
    """sendtime.server.dispatch.SendObserver: metrics and the log line per delivery attempt."""

    def __init__(self, metrics: SendMetrics | None, log: DeliveryLog) -> None:
        self._metrics = metrics
        self._log = log

    def attempted(self, record: SendRecord, attempt: Attempt, relay: str, elapsed_s: float) -> None:
        if self._metrics is not None:
            self._metrics.attempted(record, attempt, relay)
        if not self._log.enabled:
            return
        fields: dict[str, Any] = {
            # one id per attempt that leads back to the ledger: the send's key and its round
            "request_id": f"{record.send_key}.{record.attempts}",
            "send_id": record.id,
            "send_key": record.send_key,
            "flow": record.flow_id or "api",
            "template": record.template_id,
            "round": record.attempts,
            "outcome": attempt.outcome,
            "reason": attempt.reason,
            "duration_ms": round(elapsed_s * 1000, 3),
        }
        if attempt.render_s:
            fields["render_ms"] = round(attempt.render_s * 1000, 3)
        if attempt.relay_tries:
            fields["relay"] = relay
            fields["relay_tries"] = attempt.relay_tries
            fields["relay_ms"] = round(attempt.relay_s * 1000, 3)
        if attempt.latency_s is not None:
            fields["latency_s"] = round(attempt.latency_s, 3)
        self._log.attempt(fields, record.user_id or record.anonymous_id, attempt.detail)


def _version() -> str:
    try:
        return metadata.version("sendtime")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree
        return "0"


__all__ = [
    "CATALOGUE",
    "AccessLog",
    "DeliveryLog",
    "Kind",
    "MetricInfo",
    "Metrics",
    "RequestIds",
    "SendObserver",
    "Telemetry",
    "Tracing",
    "UserIds",
    "configure_logging",
    "hash_user_id",
    "request_id",
]
