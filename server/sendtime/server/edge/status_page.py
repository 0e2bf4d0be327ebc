"""The live status page at GET / (admin scope): what sendtime is doing, for a
person, as server-rendered HTML that reloads itself every few seconds.

Numbers come from the Prometheus registry the server already keeps (nothing
is added to the hot paths): each view takes a snapshot of the cumulative
counters and histogram buckets and keeps it in a small ring, and rates and
percentiles are the difference from the oldest snapshot within the window.
The first view after a start therefore reads "since the server started".
Flows and the latest deliveries are read from the ledger (deliveries.DeliveryQueries).

The exact HTML of a sent email is not stored, so GET
/v1/deliveries/{id}/preview renders the delivery's template for its user
*now*; the page says so.

The admin key may come as a Bearer token, as the Basic user name (a browser
asks for it on the 401) or as ``?key=``, because a browser cannot set a
Bearer header and a bookmark or headless browser cannot answer a Basic
prompt. A key in a URL can leak through history and Referer headers, so the
page sends ``Referrer-Policy: no-referrer`` and never copies the key into its
own links: each preview link carries instead a token signed with a secret of
this process, good for that one delivery's preview for PREVIEW_TOKEN_S.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from aiohttp import web

from sendtime.server.auth import Authenticator
from sendtime.server.cache import CacheFetcher
from sendtime.server.deliveries import MAX_ID, DeliveryQueries
from sendtime.server.domain.broadcasts import FLOW_PREFIX, Broadcast, Progress
from sendtime.server.domain.content import ContentContext, ContentPipeline
from sendtime.server.domain.errors import NotFound, Overloaded, PermissionDenied, Unauthenticated
from sendtime.server.domain.events import Identity
from sendtime.server.domain.sends import SendRecord
from sendtime.server.edge.http_keys import header_key, names_a_key
from sendtime.server.observe.metrics import Metrics
from sendtime.server.settings import Scope

REFRESH_S: Final = 5
WINDOW_S: Final = 300.0
#: Snapshots kept in the ring at least this far apart: a crowd of draws (each
#: takes one) would otherwise fill the ring in a second with hundreds of
#: thousands of tracked objects, which every full collection walks.
RING_SPACING_S: Final = 1.0
LATEST_DELIVERIES: Final = 20
#: How long a preview link from the page works without a key.
PREVIEW_TOKEN_S: Final = 900
_QUANTILES: Final = (0.5, 0.95, 0.99)

# which requests are "content" and which "ingestion", by the labels the edges record
_CONTENT_GRPC: Final = frozenset({"GetContent", "RenderEmail"})
_INGEST_GRPC: Final = frozenset(
    {"IngestEvent", "IngestEvents"}
)  # StreamEvents: a stream's life, not a call's
_CONTENT_ROUTES: Final = frozenset({"/v1/content/{user_id}"})
_INGEST_ROUTES: Final = frozenset({"/v1/batch", "/v1/import", "/v1/{kind}", "/v1/webhooks/{source}"})

# (sample name, sorted label items) -> value
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _snapshot(metrics: Metrics) -> Samples:
    samples: Samples = {}
    for family in metrics.registry.collect():
        if not family.name.startswith("sendtime_") or family.type == "gauge":
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


@dataclass(frozen=True, slots=True)
class Latency:
    per_second: float
    count: int
    quantiles: tuple[float | None, ...]


def _quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """histogram_quantile's linear interpolation over cumulative (le, count) pairs."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lower_le, lower_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return lower_le
            if count == lower_count:
                return le
            return lower_le + (le - lower_le) * (rank - lower_count) / (count - lower_count)
        lower_le, lower_count = le, count
    return lower_le


@dataclass
class _Window:
    """The difference between now and the oldest snapshot within WINDOW_S."""

    now: Samples
    then: Samples
    seconds: float
    since_start: bool

    def delta(self, name: str, match: Callable[[dict[str, str]], bool] = lambda _: True) -> float:
        return sum(
            value - self.then.get(key, 0.0)
            for key, value in self.now.items()
            if key[0] == name and match(dict(key[1]))
        )

    def by_label(self, name: str, label: str) -> dict[str, float]:
        totals: dict[str, float] = {}
        for key, value in self.now.items():
            if key[0] == name:
                labels = dict(key[1])
                totals[labels.get(label, "")] = totals.get(labels.get(label, ""), 0.0) + (
                    value - self.then.get(key, 0.0)
                )
        return totals

    def latency(self, histogram: str, match: Callable[[dict[str, str]], bool]) -> Latency:
        per_le: dict[float, float] = {}
        for key, value in self.now.items():
            if key[0] != f"{histogram}_bucket":
                continue
            labels = dict(key[1])
            le = float(labels.pop("le"))
            if match(labels):
                per_le[le] = per_le.get(le, 0.0) + value - self.then.get(key, 0.0)
        buckets = sorted(per_le.items())
        count = buckets[-1][1] if buckets else 0.0
        return Latency(
            per_second=count / self.seconds if self.seconds > 0 else 0.0,
            count=round(count),
            quantiles=tuple(_quantile(q, buckets) for q in _QUANTILES),
        )


@dataclass
class StatusPage:
    authenticator: Authenticator
    deliveries: DeliveryQueries
    pipeline: ContentPipeline
    cache: CacheFetcher
    metrics: Metrics | None
    flow_ids: Sequence[str]
    started: float = field(default_factory=time.monotonic)
    _ring: deque[tuple[float, Samples]] = field(
        default_factory=lambda: deque(maxlen=int(WINDOW_S / RING_SPACING_S) + 2)
    )
    #: Signs preview links; made anew at each start (old links stop working).
    _link_secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    #: Pages and previews drawn at once; more are answered 429 at once. A page
    #: costs milliseconds of the loop (a preview renders an email): a crowd of
    #: operators' tabs or a misbehaving scraper must not delay content calls,
    #: and an answer that would come late is worth less than a quick "retry".
    max_drawing: int = 4
    _drawing: int = 0
    #: The broadcasts not done or cancelled, with their progress (None: none to show).
    broadcasts: Callable[[], Awaitable[list[tuple[Broadcast, Progress]]]] | None = None

    @contextmanager
    def _admitted(self) -> Iterator[None]:
        if self._drawing >= self.max_drawing:
            raise Overloaded(f"the status page is being drawn {self._drawing} times at once; retry shortly")
        self._drawing += 1
        try:
            yield
        finally:
            self._drawing -= 1

    def register(self, app: web.Application) -> None:
        app.router.add_get("/", self.page)
        app.router.add_get("/v1/deliveries/{id}/preview", self.preview)

    # -- routes ------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.Response:
        denied = self._deny(request)
        if denied is not None:
            return denied
        with self._admitted():
            flows, counted_s_ago = await self.deliveries.flow_counts()
            sends = await self.deliveries.latest(LATEST_DELIVERIES)
            running = await self.broadcasts() if self.broadcasts is not None else []
            body = "".join(
                (
                    self._traffic(),
                    self._cache(),
                    self._broadcasts(running),
                    self._flows(flows, counted_s_ago),
                    self._deliveries(sends),
                )
            )
        return _html(_document("sendtime status", body, refresh=True))

    async def preview(self, request: web.Request) -> web.Response:
        raw_id = request.match_info["id"]
        send_id = int(raw_id) if raw_id.isascii() and raw_id.isdigit() and len(raw_id) < 20 else 0
        if not self._signed_for(send_id, request.query.get("token", "")):
            denied = self._deny(request)
            if denied is not None:
                return denied
        record = await self.deliveries.find(send_id) if 0 < send_id < MAX_ID else None
        if record is None:
            raise NotFound("no delivery has that id")
        with self._admitted():
            answer = await self.pipeline.email(
                record.template_id,
                Identity(record.user_id, record.anonymous_id),
                ContentContext(campaign=record.flow_id),
                budget_s=1.0,
            )
        response = web.Response(text=answer.email.html, content_type="text/html")
        # the email's HTML is the template's: it runs nothing and loads only images
        response.headers["Content-Security-Policy"] = (
            "sandbox; default-src 'none'; img-src * data:; style-src 'unsafe-inline'"
        )
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Sendtime-Preview"] = "rendered now for the delivery's user; not the stored email"
        return response

    def _preview_link(self, send_id: int) -> str:
        expires = int(time.time()) + PREVIEW_TOKEN_S
        return f"/v1/deliveries/{send_id}/preview?token={expires}.{self._signature(send_id, expires)}"

    def _signature(self, send_id: int, expires: int) -> str:
        message = f"preview:{send_id}:{expires}".encode()
        return hmac.new(self._link_secret, message, hashlib.sha256).hexdigest()

    def _signed_for(self, send_id: int, token: str) -> bool:
        raw_expires, _, given = token.partition(".")
        if not send_id or not (raw_expires.isascii() and raw_expires.isdigit()) or len(raw_expires) > 12:
            return False
        expires = int(raw_expires)
        if expires < time.time():
            return False
        return hmac.compare_digest(self._signature(send_id, expires), given)

    def _deny(self, request: web.Request) -> web.Response | None:
        try:
            self.authenticator.authorize(_key(request), Scope.ADMIN)
        except Unauthenticated as error:
            response = _html(_document("Unauthenticated", f"<p>{_e(error.message)}</p>"), status=401)
            response.headers["WWW-Authenticate"] = 'Basic realm="sendtime admin", charset="UTF-8"'
            return response
        except PermissionDenied as error:
            return _html(_document("Forbidden", f"<p>{_e(error.message)}</p>"), status=403)
        return None

    # -- sections ------------------------------------------------------------------

    def _window(self) -> _Window | None:
        if self.metrics is None:
            return None
        now = time.monotonic()
        samples = _snapshot(self.metrics)
        ring = self._ring
        while ring and now - ring[0][0] > WINDOW_S:
            ring.popleft()
        if not ring or now - ring[-1][0] >= RING_SPACING_S:
            ring.append((now, samples))
        then_at, then = ring[0]
        if then is samples or now - then_at < 1.0:
            return _Window(samples, {}, now - self.started, since_start=True)
        return _Window(samples, then, now - then_at, since_start=False)

    def _traffic(self) -> str:
        window = self._window()
        if window is None:
            return "<section><h2>Traffic</h2><p>Metrics are off (metrics.enabled = false).</p></section>"
        span = (
            f"since the server started ({window.seconds:.0f} s ago)"
            if window.since_start
            else f"over the last {window.seconds:.0f} s"
        )
        rows = []
        for name, grpc_methods, routes in (
            ("Content", _CONTENT_GRPC, _CONTENT_ROUTES),
            ("Ingestion", _INGEST_GRPC, _INGEST_ROUTES),
        ):
            for edge, latency in (
                (
                    "gRPC",
                    window.latency(
                        "sendtime_grpc_request_duration_seconds", _label_in("method", grpc_methods)
                    ),
                ),
                (
                    "HTTP",
                    window.latency("sendtime_http_request_duration_seconds", _label_in("route", routes)),
                ),
            ):
                cells = "".join(f"<td>{_ms(q)}</td>" for q in latency.quantiles)
                rows.append(
                    f"<tr><th scope=row>{_e(name)} ({edge})</th><td>{latency.count}</td>"
                    f"<td>{latency.per_second:.2f}</td>{cells}</tr>"
                )
        events = window.by_label("sendtime_ingest_events_total", "outcome")
        blocks = window.by_label("sendtime_content_blocks_total", "source")
        fallbacks = {
            reason or "none": count
            for reason, count in _by_two(window, "sendtime_content_blocks_total", "source", "reason")
            .get("fallback", {})
            .items()
        }
        header = "".join(f"<th>p{round(q * 100)}</th>" for q in _QUANTILES)
        return (
            f"<section><h2>Traffic</h2><p class=note>{_e(span)}; refreshed every {REFRESH_S} s.</p>"
            f"<table id=traffic><tr><th>Requests</th><th>count</th><th>per s</th>{header}</tr>"
            f"{''.join(rows)}</table>"
            f"<h3>Events ingested</h3>{_counts_table('events', events)}"
            f"<h3>Block sources</h3>{_counts_table('block-sources', blocks)}"
            f"<h3>Fallback reasons</h3>{_counts_table('fallback-reasons', fallbacks)}</section>"
        )

    def _cache(self) -> str:
        stats = self.cache.cache.stats()
        lookups = stats.hits + stats.stale_hits + stats.misses
        ratio = f"{stats.hits / lookups:.1%}" if lookups else "no lookups yet"
        stale = f"{stats.stale_hits / lookups:.1%}" if lookups else "-"
        fetches = self.cache.stats()
        return (
            "<section><h2>Block cache</h2><table id=cache>"
            f"<tr><th scope=row>Hit ratio (fresh)</th><td>{_e(ratio)}</td></tr>"
            f"<tr><th scope=row>Stale hits</th><td>{_e(stale)}</td></tr>"
            f"<tr><th scope=row>Lookups</th><td>{lookups}</td></tr>"
            f"<tr><th scope=row>Entries</th><td>{stats.entries}</td></tr>"
            f"<tr><th scope=row>Size</th><td>{_bytes(stats.size_bytes)} of {_bytes(stats.max_bytes)}</td></tr>"
            f"<tr><th scope=row>Fetches / failures</th><td>{fetches.fetches} / {fetches.fetch_failures}</td></tr>"
            "</table><p class=note>Since the server started.</p></section>"
        )

    def _broadcasts(self, running: Sequence[tuple[Broadcast, Progress]]) -> str:
        if not running:
            return "<section><h2>Broadcasts</h2><p>No broadcast is running.</p></section>"
        rows = "".join(
            f"<tr><th scope=row>{_e(b.name)}<br><small>{_e(b.id)}</small></th><td>{_e(b.state.value)}</td>"
            f"<td>{_e(b.template_id)}</td>"
            f"<td><progress value={p.settled} max={max(p.audience, p.planned, 1)}></progress> "
            f"{p.settled:,} of {p.audience:,}</td>"
            f"<td>{p.sent:,}</td><td>{sum(p.skipped.values()):,}</td><td>{p.failed:,}</td>"
            f"<td>{p.uncertain:,}</td><td>{p.scheduled + p.in_flight:,}</td></tr>"
            for b, p in running
        )
        return (
            "<section><h2>Broadcasts</h2><table id=broadcasts><tr><th>Broadcast</th><th>state</th>"
            "<th>template</th><th>progress</th><th>sent</th><th>skipped</th><th>failed</th>"
            f"<th>uncertain</th><th>to go</th></tr>{rows}</table></section>"
        )

    def _flows(self, counts: dict[str, dict[str, int]], counted_s_ago: float) -> str:
        # a broadcast's sends are shown with the broadcast
        counts = {k: v for k, v in counts.items() if not k.startswith(FLOW_PREFIX)}
        ids = list(dict.fromkeys([*self.flow_ids, *sorted(counts)]))
        statuses = sorted({status for per_flow in counts.values() for status in per_flow})
        if not ids:
            return "<section><h2>Flows</h2><p>No flows are configured and no sends were made.</p></section>"
        header = "".join(f"<th>{_e(s)}</th>" for s in statuses)
        rows = "".join(
            f"<tr><th scope=row>{_e(flow_id or 'api')}</th>"
            + "".join(f"<td>{counts.get(flow_id, {}).get(s, 0)}</td>" for s in statuses)
            + "</tr>"
            for flow_id in ids
        )
        return (
            f"<section><h2>Flows</h2><table id=flows><tr><th>Flow</th>{header}</tr>{rows}</table>"
            f"<p class=note>Sends by status, counted {counted_s_ago:.0f} s ago.</p></section>"
        )

    def _deliveries(self, sends: Iterable[SendRecord]) -> str:
        rows = []
        for record in sends:
            latency = record.latency
            preview = self._preview_link(record.id)
            rows.append(
                f"<tr><td>{record.id}</td><td>{_time(record.accepted_at or record.updated_at)}</td>"
                f"<td>{_e(record.flow_id or 'api')}</td><td>{_e(record.template_id)}</td>"
                f"<td>{_e(record.user_id or record.anonymous_id)}</td><td>{_e(record.status.value)}</td>"
                f"<td>{_e(record.reason)}</td>"
                f"<td>{_e(f'{latency.total_seconds():.2f} s') if latency is not None else ''}</td>"
                f'<td><a href="{_e(preview)}" rel="noreferrer">preview</a></td></tr>'
            )
        if not rows:
            return "<section><h2>Latest deliveries</h2><p>No deliveries yet.</p></section>"
        return (
            "<section><h2>Latest deliveries</h2>"
            "<p class=note>A preview renders the delivery's template for its user now, with today's"
            " data: the exact HTML sent is not stored.</p><table id=deliveries><tr><th>Id</th><th>When</th>"
            "<th>Flow</th><th>Template</th><th>User</th><th>Status</th><th>Reason</th>"
            f"<th>Event to send</th><th>Email</th></tr>{''.join(rows)}</table></section>"
        )


def _label_in(label: str, values: frozenset[str]) -> Callable[[dict[str, str]], bool]:
    return lambda labels: labels.get(label) in values


def _by_two(window: _Window, name: str, first: str, second: str) -> dict[str, dict[str, float]]:
    nested: dict[str, dict[str, float]] = {}
    for key, value in window.now.items():
        if key[0] == name:
            labels = dict(key[1])
            inner = nested.setdefault(labels.get(first, ""), {})
            inner[labels.get(second, "")] = inner.get(labels.get(second, ""), 0.0) + (
                value - window.then.get(key, 0.0)
            )
    return nested


def _counts_table(table_id: str, counts: dict[str, float]) -> str:
    shown = {k: v for k, v in counts.items() if v > 0}
    if not shown:
        return f"<p id={table_id}>None in this window.</p>"
    total = sum(shown.values())
    rows = "".join(
        f"<tr><th scope=row>{_e(k)}</th><td>{round(v)}</td><td>{v / total:.1%}</td></tr>"
        for k, v in sorted(shown.items(), key=lambda kv: -kv[1])
    )
    return f"<table id={table_id}>{rows}</table>"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if count < 1024:
            return f"{count:.0f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def _time(moment: datetime | None) -> str:
    return "" if moment is None else _e(moment.strftime("%Y-%m-%d %H:%M:%S %Z"))


def _key(request: web.Request) -> str | None:
    """The Authorization header's key (edge.http_keys), else ``?key=``."""
    if names_a_key(request.headers):
        return header_key(request.headers)
    return request.query.get("key") or None


_STYLE: Final = (
    "body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}"
    "table{border-collapse:collapse;margin:.5rem 0}th,td{border:1px solid #ccc;padding:.25rem .5rem;"
    "text-align:left}td{font-variant-numeric:tabular-nums}.note{color:#666;font-size:.9em}"
    "section{margin-bottom:1.5rem}"
)


def _document(title: str, body: str, *, refresh: bool = False) -> str:
    meta = f'<meta http-equiv="refresh" content="{REFRESH_S}">' if refresh else ""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f'<meta name=viewport content="width=device-width,initial-scale=1">{meta}'
        '<meta name="referrer" content="no-referrer">'
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head>"
        f"<body><h1>{_e(title)}</h1>{body}</body></html>"
    )


def _html(text: str, status: int = 200) -> web.Response:
    response = web.Response(text=text, status=status, content_type="text/html")
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"
    return response


__all__ = ["StatusPage"]
