"""Prometheus metrics: the catalogue of every family sendtime exports, and
the one object per server that keeps them.

Two ways in, both cheap on the hot paths:

- counts made where the work happens (RPCs, blocks, events, upstream calls,
  relay tries, sends) go to the loop-only instruments of ``_instruments``,
  through children looked up once per label set and kept;
- counts that already exist (the cache's, the fetcher's, the breakers', the
  store's) are read by a collector when Prometheus scrapes, and cost nothing
  in between.

Label values are bounded: gRPC methods and HTTP routes as registered
(anything else is "unknown"), block names as configured ("unknown" for a name
a caller made up), status codes, flows, relays, hosts from
content.allowed_upstream_hosts, and reason classes from code. No label holds a
user id, an email address or a URL.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sendtime.server.domain.sends import SendOutcome
from sendtime.server.observe._instruments import Counter, CounterFamily, Histogram, HistogramFamily

if TYPE_CHECKING:
    from sendtime.server.cache import CacheFetcher
    from sendtime.server.dispatch import Attempt
    from sendtime.server.domain.content import Block
    from sendtime.server.domain.events import Event
    from sendtime.server.domain.ingest import Ack
    from sendtime.server.domain.ports import StoreStats
    from sendtime.server.domain.sends import SendRecord


class Kind(enum.StrEnum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclass(frozen=True, slots=True)
class MetricInfo:
    #: The name as exposed; counters end in _total.
    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


_RPC_SECONDS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BUDGET_RATIO: Final = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0, 1.25)
_UPSTREAM_SECONDS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_LAG_SECONDS: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    3600.0,
    86400.0,
)
# flows wait on purpose (30 min, an hour, days): the buckets reach a week
_SEND_LATENCY_SECONDS: Final = (
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0,
    86400.0, 259200.0, 604800.0,
)  # fmt: skip
_RELAY_SECONDS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

C, G, H = Kind.COUNTER, Kind.GAUGE, Kind.HISTOGRAM

#: Every metric family sendtime exports (besides prometheus_client's process_*
#: and python_* ones). Dashboards and alert rules may name these and no others.
CATALOGUE: Final[tuple[MetricInfo, ...]] = (
    # -- the edges
    MetricInfo(
        "sendtime_grpc_requests_total",
        C,
        "gRPC calls finished, by status code (errors are code != OK).",
        ("service", "method", "code"),
    ),
    MetricInfo(
        "sendtime_grpc_request_duration_seconds",
        H,
        "Time from a gRPC call's arrival to its answer (for streams: to the stream's end).",
        ("service", "method"),
        _RPC_SECONDS,
    ),
    MetricInfo(
        "sendtime_http_requests_total",
        C,
        "HTTP requests answered, by route pattern and status (errors are status >= 400).",
        ("route", "method", "status"),
    ),
    MetricInfo(
        "sendtime_http_request_duration_seconds",
        H,
        "Time from an HTTP request's arrival to its answer.",
        ("route", "method"),
        _RPC_SECONDS,
    ),
    # -- content
    MetricInfo(
        "sendtime_content_blocks_total",
        C,
        "Content blocks answered, by block, source (fresh, cached, stale, fallback) and the reason it is not fresh.",
        ("block", "source", "reason"),
    ),
    MetricInfo(
        "sendtime_content_budget_used_ratio",
        H,
        "Time a content answer took as a share of the caller's whole budget (1 = at the deadline).",
        ("call",),
        _BUDGET_RATIO,
    ),
    MetricInfo("sendtime_content_requests_in_flight", G, "Content requests being answered now."),
    MetricInfo(
        "sendtime_content_late_answers_total",
        C,
        "Content answers (blocks, whole email or refusal) handed to the transport after the caller's deadline.",
        ("call",),
    ),
    MetricInfo(
        "sendtime_content_shed_total",
        C,
        "Content calls shed at admission: blocks served from cache or fallback at once (call=content),"
        " or a whole email refused with RESOURCE_EXHAUSTED / 429 (call=email).",
        ("call",),
    ),
    # -- the block cache (MemoryCache.stats and CacheFetcher.stats, read at scrape)
    MetricInfo(
        "sendtime_cache_lookups_total",
        C,
        "Block cache lookups: hit (fresh), stale (past its TTL, within its stale window) or miss.",
        ("result",),
    ),
    MetricInfo("sendtime_cache_evictions_total", C, "Entries dropped to stay under the byte bound."),
    MetricInfo("sendtime_cache_expirations_total", C, "Entries dropped past their stale window."),
    MetricInfo("sendtime_cache_invalidations_total", C, "Entries dropped by an event or a catalog update."),
    MetricInfo(
        "sendtime_cache_rejections_total", C, "Values not stored: too big, or invalidated while fetched."
    ),
    MetricInfo("sendtime_cache_entries", G, "Entries in the block cache."),
    MetricInfo("sendtime_cache_size_bytes", G, "Bytes the block cache's entries are charged."),
    MetricInfo("sendtime_cache_capacity_bytes", G, "The block cache's byte bound (content.cache_max_bytes)."),
    MetricInfo(
        "sendtime_cache_fetches_total", C, "Fetches started to fill the cache (one per key at a time)."
    ),
    MetricInfo("sendtime_cache_fetch_failures_total", C, "Fetches that failed or timed out."),
    MetricInfo("sendtime_cache_coalesced_total", C, "Calls that joined a fetch another call had started."),
    MetricInfo(
        "sendtime_cache_wait_timeouts_total", C, "Calls that stopped waiting for a fetch at their budget."
    ),
    MetricInfo(
        "sendtime_cache_negative_hits_total", C, "Calls answered from a remembered failure without fetching."
    ),
    MetricInfo("sendtime_cache_stale_served_total", C, "Calls answered with a stale value."),
    MetricInfo("sendtime_cache_fallbacks_total", C, "Calls answered with no value (the block's fallback)."),
    MetricInfo("sendtime_cache_fetches_in_flight", G, "Fetches running now."),
    # -- upstreams
    MetricInfo(
        "sendtime_upstream_requests_total",
        C,
        "HTTP calls to upstream content providers, by outcome (ok, http_error, bad_answer, timeout, connection_error, cancelled).",
        ("upstream", "host", "outcome"),
    ),
    MetricInfo(
        "sendtime_upstream_request_duration_seconds",
        H,
        "Time an HTTP call to an upstream took, retries counted apart.",
        ("upstream", "host"),
        _UPSTREAM_SECONDS,
    ),
    MetricInfo(
        "sendtime_upstream_circuit_state",
        G,
        "1 for the state each upstream host's circuit breaker is in (closed, open, half_open).",
        ("host", "state"),
    ),
    MetricInfo("sendtime_upstream_circuit_opened_total", C, "Times a host's circuit opened.", ("host",)),
    MetricInfo(
        "sendtime_upstream_circuit_rejections_total", C, "Fetches refused by an open circuit.", ("host",)
    ),
    MetricInfo(
        "sendtime_upstream_circuit_consecutive_failures",
        G,
        "Failures in a row of a host's fetches.",
        ("host",),
    ),
    # -- ingestion
    MetricInfo(
        "sendtime_ingest_events_total",
        C,
        "Events by outcome (accepted, duplicate, rejected) and, when rejected, the reason.",
        ("outcome", "reason"),
    ),
    MetricInfo(
        "sendtime_ingest_ack_lag_seconds",
        H,
        "From an event's own timestamp (the client's clock) to its durable acknowledgement.",
        (),
        _LAG_SECONDS,
    ),
    MetricInfo("sendtime_store_queued_events", G, "Events handed to the store's writer and not yet durable."),
    MetricInfo("sendtime_store_commits_total", C, "Group commits of events."),
    # -- flows and relay
    MetricInfo(
        "sendtime_sends_scheduled_total",
        C,
        'Sends scheduled (flow "api": asked for through the API).',
        ("flow",),
    ),
    MetricInfo("sendtime_sends_cancelled_total", C, "Scheduled sends cancelled by an exit event.", ("flow",)),
    MetricInfo(
        "sendtime_sends_skipped_total",
        C,
        "Sends not made, by reason (no_email, opted_out, no_opt_in, suppressed, frequency_cap, quiet_hours, nothing_to_show, bad_address, not_sending).",
        ("flow", "reason"),
    ),
    MetricInfo("sendtime_sends_held_total", C, "Sends held until the quiet hours end.", ("flow",)),
    MetricInfo("sendtime_sends_sent_total", C, "Sends the ESP accepted.", ("flow", "relay")),
    MetricInfo(
        "sendtime_sends_uncertain_total",
        C,
        "Sends handed to the ESP whose answer never came (it may have taken them): not resent.",
        ("flow", "relay"),
    ),
    MetricInfo(
        "sendtime_sends_failed_total",
        C,
        "Sends that failed for good, by reason (refused, gave_up, render_error, internal).",
        ("flow", "relay", "reason"),
    ),
    MetricInfo(
        "sendtime_sends_retried_total",
        C,
        "Sends scheduled again after the relay failed transiently.",
        ("flow", "relay"),
    ),
    MetricInfo(
        "sendtime_send_latency_seconds",
        H,
        "From the triggering event's arrival to the ESP's acceptance (a flow's delay included).",
        ("flow",),
        _SEND_LATENCY_SECONDS,
    ),
    MetricInfo("sendtime_sends_in_flight", G, "Sends claimed and being rendered or relayed."),
    MetricInfo(
        "sendtime_relay_attempts_total",
        C,
        "Tries at handing an email to the ESP, by outcome (accepted, transient, permanent, uncertain).",
        ("relay", "outcome"),
    ),
    MetricInfo("sendtime_relay_retries_total", C, "Tries after the first, within one send.", ("relay",)),
    MetricInfo(
        "sendtime_relay_attempt_duration_seconds",
        H,
        "Time one try at the ESP took.",
        ("relay",),
        _RELAY_SECONDS,
    ),
    # -- the process
    MetricInfo("sendtime_build_info", G, "Always 1; the version is in the label.", ("version",)),
)

BY_NAME: Final = {info.name: info for info in CATALOGUE}
UNKNOWN: Final = "unknown"


def _counter(name: str) -> CounterFamily:
    info = BY_NAME[name]
    assert info.kind is Kind.COUNTER, name
    return CounterFamily(info.name, info.help, info.labels)


def _histogram(name: str) -> HistogramFamily:
    info = BY_NAME[name]
    assert info.kind is Kind.HISTOGRAM, name
    return HistogramFamily(info.name, info.help, info.labels, info.buckets)


def _gauge(name: str, value: float | None = None) -> GaugeMetricFamily:
    info = BY_NAME[name]
    return GaugeMetricFamily(
        info.name, info.help, value=value, labels=None if value is not None else info.labels
    )


def _stat_counter(name: str, value: float | None = None) -> CounterMetricFamily:
    info = BY_NAME[name]
    return CounterMetricFamily(
        info.name, info.help, value=value, labels=None if value is not None else info.labels
    )


class RpcMetrics:
    """One gRPC method's or HTTP route's children, looked up once."""

    __slots__ = ("_codes", "_family", "_labels", "duration")

    def __init__(self, requests: CounterFamily, durations: HistogramFamily, labels: tuple[str, ...]) -> None:
        self._family = requests
        self._labels = labels
        self._codes: dict[str, Counter] = {}
        self.duration: Histogram = durations.labels(*labels)

    def finished(self, code: str, seconds: float) -> None:
        child = self._codes.get(code)
        if child is None:
            child = self._codes[code] = self._family.labels(*self._labels, code)
        child.value += 1
        self.duration.observe(seconds)


class Metrics:
    """Every family of the catalogue, for one server, with its own registry."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.grpc_requests = _counter("sendtime_grpc_requests_total")
        self.grpc_durations = _histogram("sendtime_grpc_request_duration_seconds")
        self.http_requests = _counter("sendtime_http_requests_total")
        self.http_durations = _histogram("sendtime_http_request_duration_seconds")
        self.content_blocks = _counter("sendtime_content_blocks_total")
        self.budget_ratio = _histogram("sendtime_content_budget_used_ratio")
        self.content_late = _counter("sendtime_content_late_answers_total")
        self.content_shed = _counter("sendtime_content_shed_total")
        self.upstream_requests = _counter("sendtime_upstream_requests_total")
        self.upstream_durations = _histogram("sendtime_upstream_request_duration_seconds")
        self.ingest_events = _counter("sendtime_ingest_events_total")
        self.ingest_lag = _histogram("sendtime_ingest_ack_lag_seconds")
        self.sends_cancelled = _counter("sendtime_sends_cancelled_total")
        self.sends_skipped = _counter("sendtime_sends_skipped_total")
        self.sends_held = _counter("sendtime_sends_held_total")
        self.sends_sent = _counter("sendtime_sends_sent_total")
        self.sends_uncertain = _counter("sendtime_sends_uncertain_total")
        self.sends_failed = _counter("sendtime_sends_failed_total")
        self.sends_retried = _counter("sendtime_sends_retried_total")
        self.send_latency = _histogram("sendtime_send_latency_seconds")
        self.relay_attempts = _counter("sendtime_relay_attempts_total")
        self.relay_retries = _counter("sendtime_relay_retries_total")
        self.relay_durations = _histogram("sendtime_relay_attempt_duration_seconds")
        self._instruments: tuple[CounterFamily | HistogramFamily, ...] = (
            self.grpc_requests,
            self.grpc_durations,
            self.http_requests,
            self.http_durations,
            self.content_blocks,
            self.budget_ratio,
            self.content_late,
            self.content_shed,
            self.upstream_requests,
            self.upstream_durations,
            self.ingest_events,
            self.ingest_lag,
            self.sends_skipped,
            self.sends_held,
            self.sends_sent,
            self.sends_uncertain,
            self.sends_failed,
            self.sends_retried,
            self.send_latency,
            self.relay_attempts,
            self.relay_retries,
            self.relay_durations,
        )
        self._fetcher: CacheFetcher | None = None
        self._store_stats: Callable[[], StoreStats] | None = None
        self._gauges: dict[str, Callable[[], float]] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    # -- what is read at scrape time ---------------------------------------------

    def watch_cache(self, fetcher: CacheFetcher) -> None:
        self._fetcher = fetcher

    def watch_store(self, stats: Callable[[], StoreStats]) -> None:
        self._store_stats = stats

    def watch_gauge(self, name: str, read: Callable[[], float]) -> None:
        assert BY_NAME[name].kind is Kind.GAUGE, name
        assert not BY_NAME[name].labels, name
        self._gauges[name] = read

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition the Accept header asks for (OpenMetrics or the text
        format), and its content type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    def collect(self) -> Iterator[Metric]:
        for instrument in self._instruments:
            yield instrument.family()
        yield from self._collect_sends()
        yield from self._collect_cache()
        for name, read in self._gauges.items():
            yield _gauge(name, read())
        build = _gauge("sendtime_build_info")
        build.add_metric([self.version], 1)
        yield build

    def _collect_sends(self) -> Iterator[Metric]:
        stats = self._store_stats() if self._store_stats is not None else None
        scheduled = _stat_counter("sendtime_sends_scheduled_total")
        store_cancelled: dict[tuple[str, ...], float] = {}
        if stats is not None:
            for flow_id, count in stats.scheduled.items():
                scheduled.add_metric([flow_id or "api"], count)
            store_cancelled = {(flow_id or "api",): count for flow_id, count in stats.cancelled.items()}
            yield _gauge("sendtime_store_queued_events", stats.queued_events)
            yield _stat_counter("sendtime_store_commits_total", stats.commits)
        yield scheduled
        yield self.sends_cancelled.family(extra=store_cancelled)

    def _collect_cache(self) -> Iterator[Metric]:
        fetcher = self._fetcher
        if fetcher is None:
            return
        cache = fetcher.cache.stats()
        lookups = _stat_counter("sendtime_cache_lookups_total")
        lookups.add_metric(["hit"], cache.hits)
        lookups.add_metric(["stale"], cache.stale_hits)
        lookups.add_metric(["miss"], cache.misses)
        yield lookups
        yield _stat_counter("sendtime_cache_evictions_total", cache.evictions)
        yield _stat_counter("sendtime_cache_expirations_total", cache.expirations)
        yield _stat_counter("sendtime_cache_invalidations_total", cache.invalidations)
        yield _stat_counter("sendtime_cache_rejections_total", cache.rejections)
        yield _gauge("sendtime_cache_entries", cache.entries)
        yield _gauge("sendtime_cache_size_bytes", cache.size_bytes)
        yield _gauge("sendtime_cache_capacity_bytes", cache.max_bytes)
        fetches = fetcher.stats()
        yield _stat_counter("sendtime_cache_fetches_total", fetches.fetches)
        yield _stat_counter("sendtime_cache_fetch_failures_total", fetches.fetch_failures)
        yield _stat_counter("sendtime_cache_coalesced_total", fetches.coalesced)
        yield _stat_counter("sendtime_cache_wait_timeouts_total", fetches.timeouts)
        yield _stat_counter("sendtime_cache_negative_hits_total", fetches.negative_hits)
        yield _stat_counter("sendtime_cache_stale_served_total", fetches.stale_served)
        yield _stat_counter("sendtime_cache_fallbacks_total", fetches.fallbacks)
        yield _gauge("sendtime_cache_fetches_in_flight", fetches.in_flight)
        state = _gauge("sendtime_upstream_circuit_state")
        opened = _stat_counter("sendtime_upstream_circuit_opened_total")
        rejections = _stat_counter("sendtime_upstream_circuit_rejections_total")
        failures = _gauge("sendtime_upstream_circuit_consecutive_failures")
        for breaker in fetcher.breakers.stats():
            for name in ("closed", "open", "half_open"):
                state.add_metric([breaker.name, name], 1.0 if breaker.state.value == name else 0.0)
            opened.add_metric([breaker.name], breaker.opened)
            rejections.add_metric([breaker.name], breaker.rejections)
            failures.add_metric([breaker.name], breaker.consecutive_failures)
        yield from (state, opened, rejections, failures)

    # -- hooks for the code that does the work --------------------------------------

    def grpc_method(self, service: str, method: str) -> RpcMetrics:
        return RpcMetrics(self.grpc_requests, self.grpc_durations, (service, method))

    def http_route(self, route: str, method: str) -> RpcMetrics:
        return RpcMetrics(self.http_requests, self.http_durations, (route, method))

    def content(self, block_names: Iterable[str]) -> ContentMetrics:
        return ContentMetrics(self, frozenset(block_names))

    def ingest(self) -> IngestMetrics:
        return IngestMetrics(self)

    def upstream(self, name: str) -> UpstreamMetrics:
        return UpstreamMetrics(self, name)

    def relay(self, name: str) -> RelayMetrics:
        return RelayMetrics(self, name)

    def sends(self) -> SendMetrics:
        return SendMetrics(self)


class _Collector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return list(self._metrics.collect())


class ContentMetrics:
    """sendtime.server.domain.content.ContentObserver"""

    def __init__(self, metrics: Metrics, known_blocks: frozenset[str]) -> None:
        self._family = metrics.content_blocks
        self._known = known_blocks
        self._blocks: dict[tuple[str, str, str | None], Counter] = {}
        self._ratio = {call: metrics.budget_ratio.labels(call) for call in ("content", "email")}
        # Made up front, so both series show 0 before the first late or shed call.
        self._late = {call: metrics.content_late.labels(call) for call in ("content", "email")}
        self._shed = {call: metrics.content_shed.labels(call) for call in ("content", "email")}

    def answered(self, call: str, blocks: Sequence[Block], budget_s: float, elapsed_s: float) -> None:
        children = self._blocks
        for block in blocks:
            key = (block.name, block.source, block.reason)
            child = children.get(key)
            if child is None:
                child = self._child(key)
            child.value += 1
        self._ratio[call].observe(elapsed_s / budget_s if budget_s > 0 else 1.0)

    def shed(self, call: str) -> None:
        self._shed[call].value += 1

    def late(self, call: str) -> None:
        self._late[call].value += 1

    def _child(self, key: tuple[str, str, str | None]) -> Counter:
        name, source, reason = key
        if name not in self._known:
            # a name a caller made up: counted, but not kept as a label of its own
            return self._family.labels(UNKNOWN, str(source), str(reason or ""))
        child = self._blocks[key] = self._family.labels(name, str(source), str(reason or ""))
        return child


class IngestMetrics:
    """sendtime.server.domain.ingest.IngestObserver"""

    def __init__(self, metrics: Metrics) -> None:
        self._family = metrics.ingest_events
        self._outcomes: dict[tuple[str, str], Counter] = {}
        self._lag = metrics.ingest_lag.labels()

    def acked(self, acks: Sequence[Ack], stored: Sequence[Event], acked_at: datetime) -> None:
        outcomes = self._outcomes
        for ack in acks:
            key = (ack.outcome.value, ack.error.reason if ack.error is not None else "")
            child = outcomes.get(key)
            if child is None:
                child = outcomes[key] = self._family.labels(*key)
            child.value += 1
        observe = self._lag.observe
        for event in stored:
            observe(max((acked_at - event.timestamp).total_seconds(), 0.0))

    def refused(self, count: int, reason: str) -> None:
        self._family.labels("rejected", reason).inc(count)


class UpstreamMetrics:
    """sendtime.server.upstream.CallObserver, for one provider."""

    def __init__(self, metrics: Metrics, name: str) -> None:
        self._metrics = metrics
        self._name = name
        self._children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}

    def called(self, host: str, outcome: str, seconds: float) -> None:
        children = self._children.get((host, outcome))
        if children is None:
            children = self._children[host, outcome] = (
                self._metrics.upstream_requests.labels(self._name, host, outcome),
                self._metrics.upstream_durations.labels(self._name, host),
            )
        count, duration = children
        count.value += 1
        duration.observe(seconds)


class RelayMetrics:
    """sendtime.server.relay.base.AttemptObserver, for one relay."""

    def __init__(self, metrics: Metrics, name: str) -> None:
        self._attempts = {
            outcome: metrics.relay_attempts.labels(name, outcome)
            for outcome in ("accepted", "transient", "permanent", "uncertain")
        }
        self._retries = metrics.relay_retries.labels(name)
        self._duration = metrics.relay_durations.labels(name)

    def attempted(self, attempt: int, outcome: str, seconds: float) -> None:
        self._attempts[outcome].value += 1
        if attempt > 1:
            self._retries.value += 1
        self._duration.observe(seconds)


class SendMetrics:
    """The outcome of each claimed send (see sendtime.server.dispatch.Attempt)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def attempted(self, record: SendRecord, attempt: Attempt, relay: str) -> None:
        metrics = self._metrics
        flow = record.flow_id or "api"
        match attempt.outcome:
            case SendOutcome.SENT:
                metrics.sends_sent.labels(flow, relay).inc()
                if attempt.latency_s is not None:
                    metrics.send_latency.labels(flow).observe(attempt.latency_s)
            case SendOutcome.UNCERTAIN:
                metrics.sends_uncertain.labels(flow, relay).inc()
            case SendOutcome.FAILED:
                metrics.sends_failed.labels(flow, relay, attempt.reason).inc()
            case SendOutcome.RETRY:
                metrics.sends_retried.labels(flow, relay).inc()
            case SendOutcome.SKIPPED:
                metrics.sends_skipped.labels(flow, attempt.reason).inc()
            case SendOutcome.CANCELLED:
                metrics.sends_cancelled.labels(flow).inc()
            case SendOutcome.HELD:
                metrics.sends_held.labels(flow).inc()
