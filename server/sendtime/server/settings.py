"""One typed settings object for the whole server.

Read from an optional TOML file, then SENDTIME_* environment variables on top
(nested keys joined by a double underscore: ``SENDTIME_GRPC__PORT=0``), then
validated at once, so a bad setting stops the start with a message naming it.
The defaults are what ``make run`` serves with.

A relative path in the file is relative to the file's folder (one in an
environment variable, to the folder the server starts in), so that a server
started elsewhere finds the same files. The outbox relay's folder is the
exception: a relative one lives in the data folder.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final
from urllib.parse import urlsplit

import msgspec
import msgspec.inspect

from sendtime.server.relay.config import OutboxConfig, RelayConfig

ENV_PREFIX: Final = "SENDTIME_"
DEV_KEY: Final = "dev-key"

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]


class Scope(enum.StrEnum):
    INGEST = "ingest"
    CONTENT = "content"
    SEND = "send"
    ADMIN = "admin"


class SettingsError(Exception):
    """A setting is missing or wrong; the message names it."""


class TlsSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    cert_file: Path
    key_file: Path


class GrpcSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: Port = 50051
    tls: TlsSettings | None = None
    max_message_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 8 * 1024 * 1024
    #: Events a stream may have read but not yet acked before it stops reading.
    stream_window_events: Annotated[int, msgspec.Meta(ge=1)] = 20_000
    #: Client connections open at once; more are refused (keeps file
    #: descriptors for the HTTP edge and the store).
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 256
    #: Calls (unary calls and open streams) served at once across all
    #: connections; more are answered RESOURCE_EXHAUSTED at once.
    max_concurrent_calls: Annotated[int, msgspec.Meta(ge=1)] = 2000
    #: Streams one connection may have open at once (HTTP/2 SETTINGS).
    max_streams_per_connection: Annotated[int, msgspec.Meta(ge=1)] = 100
    #: A connection must finish its handshake (TLS, HTTP/2 preface) within this long.
    handshake_timeout_s: Seconds = 10.0
    #: A connection with no call open for this long is closed.
    idle_timeout_s: Seconds = 300.0
    #: Idle connections are pinged this often, and closed when a ping goes
    #: unanswered for keepalive_timeout_s: dead peers do not keep streams open.
    keepalive_interval_s: Seconds = 60.0
    keepalive_timeout_s: Seconds = 20.0
    #: Share the port with other processes (SO_REUSEPORT). Set by
    #: ``serve --workers`` for its workers; a lone server must fail loudly instead.
    reuse_port: bool = False


class HttpSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: Port = 8080
    tls: TlsSettings | None = None
    #: Connections open at once. At the bound a new connection closes the one
    #: that has waited longest for a request (idle, or a slow sender short of
    #: its request head); when all are inside requests, the new one is closed.
    #: Also the depth of the queue of connections not accepted yet (at least
    #: 128; the kernel caps it at net.core.somaxconn).
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 512
    #: A request head must arrive within this long of connecting or of the
    #: previous answer (an idle keep-alive connection closes then too).
    header_timeout_s: Seconds = 15.0
    #: A request body must arrive within this long of its head (else 408).
    body_timeout_s: Seconds = 30.0
    #: Bytes of intake bodies (Segment API, webhooks) being read, decoded or
    #: stored at once, counted from Content-Length (a chunked body counts as its
    #: route's limit); a request that would pass it is answered 429 with
    #: Retry-After before its body is read. Decoding runs on the event loop:
    #: this keeps health checks and content calls answered during a flood.
    max_ingest_bytes_in_flight: Annotated[int, msgspec.Meta(ge=1)] = 2 * 1024 * 1024
    #: Status pages and previews drawn at once; more are answered 429 with
    #: Retry-After at once (a page costs milliseconds of the event loop).
    max_status_page_draws: Annotated[int, msgspec.Meta(ge=1)] = 4
    #: As grpc.reuse_port.
    reuse_port: bool = False


class ServerSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: Processes serving the same two ports (``serve --workers`` overrides):
    #: one host uses all its cores. More than one needs storage.backend = "postgres".
    workers: Annotated[int, msgspec.Meta(ge=1, le=256)] = 1


class StorageSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    data_dir: Path = Path(".sendtime")
    #: "full" survives power loss; "normal" survives a crash of the process only.
    synchronous: str = "full"
    #: How long a message id is remembered for de-duplication.
    dedupe_retention_s: Seconds = 7 * 24 * 3600.0
    max_queued_events: Annotated[int, msgspec.Meta(ge=1)] = 100_000
    #: Profiles kept in memory (more when many are waiting to be saved).
    profile_cache_size: Annotated[int, msgspec.Meta(ge=1)] = 100_000
    #: How often changed profiles are saved (less often under heavy load, so that
    #: saving takes about a tenth of the loop's time, up to 30 s apart); a restart
    #: re-folds the events since.
    profile_flush_interval_s: Seconds = 1.0
    #: SQLite's page cache per connection, in MiB.
    sqlite_cache_mib: Annotated[int, msgspec.Meta(ge=1)] = 128
    #: "sqlite" (one process, data_dir) or "postgres" (any number of replicas on postgres_dsn).
    backend: str = "sqlite"
    #: postgresql://user@host:port/database, for backend = "postgres".
    postgres_dsn: str = ""
    #: Connections each replica keeps to PostgreSQL.
    postgres_pool_size: Annotated[int, msgspec.Meta(ge=2, le=100)] = 8
    #: PostgreSQL: how long a claimed send stays with the replica that claimed it.
    #: A send still "sending" after it is claimed again by another replica; one
    #: still "relaying" is marked uncertain (never resent). Longer than a send
    #: takes to render and relay.
    claim_lease_s: Annotated[float, msgspec.Meta(gt=0)] = 300.0

    def __post_init__(self) -> None:
        if self.synchronous not in ("full", "normal"):
            raise ValueError("storage.synchronous must be 'full' or 'normal'")
        if self.backend not in ("sqlite", "postgres"):
            raise ValueError("storage.backend must be 'sqlite' or 'postgres'")
        if self.backend == "postgres" and not self.postgres_dsn.startswith(("postgresql://", "postgres://")):
            raise ValueError(
                "storage.postgres_dsn must be a postgresql:// URL when storage.backend is 'postgres'"
            )


class EventSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Which event times the intake believes, from the server's clock at arrival."""

    #: An event dated further ahead than this is refused; one ahead by less
    #: counts as happening when it arrived (clock skew).
    max_ahead_s: Annotated[float, msgspec.Meta(ge=0, le=366 * 86400)] = 86400.0
    #: An event dated longer ago than this is refused, history imports included.
    max_age_s: Annotated[float, msgspec.Meta(gt=0, le=200 * 365 * 86400)] = 3650 * 86400.0


class ApiKey(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    #: "sha256:" + hex digest of the key; `sendtime keygen` makes both.
    hash: str
    scopes: list[Scope]

    def __post_init__(self) -> None:
        digest = self.hash.removeprefix("sha256:")
        if not self.hash.startswith("sha256:") or len(digest) != 64:
            raise ValueError(f"auth.keys[{self.name}].hash must be 'sha256:' and 64 hex digits")


class AuthSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    keys: list[ApiKey] = []
    #: Accept the key "dev-key" with every scope while no keys are configured
    #: (configuring a key turns it off). For development only: while it works,
    #: the server refuses to start if an edge listens beyond loopback.
    dev_key: bool = True
    #: Start with the dev key even on an edge that listens beyond loopback
    #: (a shared test box behind a firewall); logged as an error at start.
    dev_key_beyond_loopback: bool = False


class WebhookSource(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, msgspec.Meta(pattern="^[a-z0-9][a-z0-9_-]{0,62}$")]
    secret: Annotated[str, msgspec.Meta(min_length=16)]
    #: Accept signatures this much older or newer than the server's clock.
    tolerance_s: Seconds = 300.0


class UpstreamSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """An HTTP JSON endpoint whose answer becomes a content block of the same name."""

    name: Annotated[str, msgspec.Meta(pattern="^[a-z][a-z0-9_]{0,62}$")]
    #: URL template; {user.id}, {user.email}, {user.<trait>}, {context.campaign},
    #: {context.locale} and {context.cart_id} are filled in, URL-escaped.
    url: str
    method: str = "GET"
    headers: dict[str, str] = {}
    timeout_s: Seconds = 1.0
    ttl_s: Seconds = 300.0
    #: How long past its TTL a value may still be served when the upstream is late or down.
    stale_ttl_s: Annotated[float, msgspec.Meta(ge=0)] = 3600.0
    retries: Annotated[int, msgspec.Meta(ge=0, le=5)] = 1
    max_response_bytes: Annotated[int, msgspec.Meta(ge=1)] = 256 * 1024

    def __post_init__(self) -> None:
        if self.method not in ("GET", "POST"):
            raise ValueError(f"upstreams[{self.name}].method must be GET or POST")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"upstreams[{self.name}].url must start with http:// or https://")


class OfferSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    id: str
    code: str
    text: str
    min_cart_total: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    #: Only for these campaigns; empty: any.
    campaigns: list[str] = []


class ContentSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: The budget when a caller sets no deadline.
    default_deadline_ms: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    #: Kept back from every deadline for encoding and sending the answer ...
    answer_reserve_ms: Annotated[float, msgspec.Meta(ge=0)] = 5.0
    #: ... or this share of it, whichever is more (under load an answer waits
    #: in the event loop and the transport before it reaches the caller).
    answer_reserve_share: Annotated[float, msgspec.Meta(ge=0, lt=0.9)] = 0.1
    #: ... plus this much for every other call being answered meanwhile, or the
    #: time between answers the server measures when busy, if longer: calls
    #: whose fetches time out together are answered one after another.
    answer_reserve_per_call_ms: Annotated[float, msgspec.Meta(ge=0)] = 0.25
    #: Kept back from a whole-email deadline, on top, for Liquid and MJML.
    render_reserve_ms: Annotated[float, msgspec.Meta(ge=0)] = 15.0
    #: Below this much budget nothing is fetched: cached or fallback content at once.
    min_fetch_ms: Annotated[float, msgspec.Meta(ge=0)] = 2.0
    #: Cache life of blocks computed from profiles; an event for the user drops them sooner.
    block_ttl_s: Seconds = 60.0
    block_stale_ttl_s: Annotated[float, msgspec.Meta(ge=0)] = 600.0
    cache_max_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 64 * 1024 * 1024
    #: Off: every request recomputes every block (for benchmarks and debugging).
    cache_results: bool = True
    #: Requests served at once; beyond it, blocks come from cache or fallback at once.
    max_concurrent: Annotated[int, msgspec.Meta(ge=1)] = 256
    recommendations_size: Annotated[int, msgspec.Meta(ge=1, le=50)] = 4
    recently_viewed_size: Annotated[int, msgspec.Meta(ge=1, le=50)] = 4
    drop_out_of_stock: bool = False
    #: The products loaded at start (a JSON array or CSV); the catalog API
    #: updates them. Not set: the demo catalog shipped with sendtime.
    catalog_file: Path | None = None
    #: The folder of <id>.mjml.liquid templates. Not set: the templates shipped
    #: with sendtime (abandoned_cart, browse_abandonment, post_purchase).
    templates_dir: Path | None = None
    #: Worker processes that render emails (Liquid, MJML, text part) beside the
    #: event loop, which would otherwise stall for each render; 0 renders on
    #: the event loop itself.
    render_processes: Annotated[int, msgspec.Meta(ge=0, le=64)] = 2
    #: Hosts upstream URLs may name (exact host names).
    allowed_upstream_hosts: list[str] = []
    #: Connections open to upstreams at once, per host (a miss for many users
    #: at once must not queue behind a small pool and look like a failure).
    upstream_connections_per_host: Annotated[int, msgspec.Meta(ge=1)] = 256
    #: Consecutive failures that open an upstream host's circuit ...
    breaker_failures: Annotated[int, msgspec.Meta(ge=1)] = 5
    #: ... and how long it stays open before one probe is let through.
    breaker_reset_s: Seconds = 30.0
    #: After a failed fetch, the same key is not fetched again for this long.
    negative_ttl_s: Annotated[float, msgspec.Meta(ge=0)] = 2.0
    upstreams: list[UpstreamSettings] = []
    offers: list[OfferSettings] = []
    #: Links every email gets, e.g. unsubscribe_url, preferences_url,
    #: view_in_browser_url; a template shows "#" for one not set.
    links: dict[str, str] = {}


FlowId = Annotated[str, msgspec.Meta(pattern="^[a-z][a-z0-9_]{0,62}$")]
Clock = Annotated[str, msgspec.Meta(pattern="^([01][0-9]|2[0-3]):[0-5][0-9]$")]


class FlowSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """An event that schedules a templated email, and the events that cancel it."""

    id: FlowId
    template: str
    entry_event: str
    #: Properties the entry event must have, with these values.
    entry_filter: dict[str, str | int | float | bool] = {}
    #: The entry event's property that keys the send (e.g. cart_id): one send
    #: per key; "" keys it by the user alone.
    entry_key: str = ""
    delay_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    #: An entry event that happened longer ago than this when it arrives
    #: enters nothing: a history import, a backfill or a replay must not send
    #: reminders about carts and visits long gone. 0: no limit.
    max_entry_age_s: Annotated[float, msgspec.Meta(ge=0)] = 86400.0
    exit_events: list[str] = []
    #: "same_key": the exit event must carry the same entry key (an order for
    #: that cart); "any": any exit event after the entry.
    exit_on: str = "same_key"
    #: "once_per_key", or "once_per_period" (once per key per reentry_period_s).
    reentry: str = "once_per_key"
    reentry_period_s: Seconds = 86400.0
    #: Consent group the send needs; "" makes the flow transactional (no
    #: consent, caps, quiet hours or suppression by group).
    subscription_group: str = "marketing"
    #: Blocks that must have data, else the send is skipped (an abandoned-cart
    #: email with an empty cart helps nobody).
    require_blocks: list[str] = []
    sender: str = ""
    reply_to: str = ""

    def __post_init__(self) -> None:
        if self.exit_on not in ("same_key", "any"):
            raise ValueError(f"flows[{self.id}].exit_on must be 'same_key' or 'any'")
        if self.reentry not in ("once_per_key", "once_per_period"):
            raise ValueError(f"flows[{self.id}].reentry must be 'once_per_key' or 'once_per_period'")


SegmentName = Annotated[str, msgspec.Meta(pattern="^[a-z0-9][a-z0-9_-]{0,63}$")]


class SegmentSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A named audience: a CEL expression over the profile (see README, Segments and broadcasts)."""

    name: SegmentName
    expression: str
    description: str = ""


class BroadcastSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: Worker processes that evaluate segments over batches of stored profiles
    #: (beside the event loop, so planning a large audience does not hold it).
    #: 0 evaluates in a thread of the server's own process.
    segment_processes: Annotated[int, msgspec.Meta(ge=0, le=32)] = 1
    #: Profiles read from the store per batch.
    segment_batch: Annotated[int, msgspec.Meta(ge=100, le=100_000)] = 5000
    #: How often a running broadcast's progress is read from the ledger.
    progress_interval_s: Seconds = 1.0
    #: With replicas (PostgreSQL): how long the replica planning a broadcast
    #: holds it unless it renews the hold (a third of this apart); another
    #: replica takes the planning over this long after its planner died.
    plan_hold_s: Annotated[float, msgspec.Meta(ge=1.0, le=3600.0)] = 30.0


class QuietHoursSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    start: Clock = "21:00"
    end: Clock = "08:00"
    #: For users whose profile names no time zone.
    default_timezone: str = "UTC"
    #: "hold" until the quiet hours end, or "skip" the send.
    mode: str = "hold"

    def __post_init__(self) -> None:
        if self.mode not in ("hold", "skip"):
            raise ValueError("delivery.quiet_hours.mode must be 'hold' or 'skip'")


class FeedbackSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """ESP feedback webhooks; each is off until configured."""

    #: The Event Webhook's verification key SendGrid shows (base64 DER, ECDSA).
    sendgrid_public_key: str = ""
    #: A signed SendGrid request whose timestamp is further than this from the
    #: server's clock is refused: a captured request cannot be replayed later.
    sendgrid_tolerance_s: Seconds = 600.0
    #: Basic credentials the Postmark webhook URL carries (Postmark does not sign).
    postmark_username: str = ""
    postmark_password: str = ""


class DeliverySettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: How emails reach the ESP (kind = "smtp", "sendgrid", "postmark",
    #: "mailgun", "resend", "ses" or "outbox"); the default writes .eml files.
    relay: RelayConfig = msgspec.field(default_factory=OutboxConfig)
    #: A send that still fails transiently is tried again later, this many times in all.
    max_send_attempts: Annotated[int, msgspec.Meta(ge=1)] = 6
    default_sender: str = "Sendtime Shop <shop@example.com>"
    #: Marketing sends need the user's explicit opt-in to their group (GDPR,
    #: CASL). Off: anyone not opted out may get them (CAN-SPAM's rule).
    require_opt_in: bool = False
    #: Where the links in emails (one-click unsubscribe, email preferences)
    #: point: this server's public HTTPS address. Empty: the HTTP edge's own
    #: address (http://127.0.0.1:8080 with the defaults), which only this
    #: machine can open: set it in production.
    public_base_url: str = ""
    unsubscribe_mailto: str = ""
    #: Signs unsubscribe links. Empty: one is made and kept in the data folder
    #: (fine for one server; give every server the same one in production).
    unsubscribe_secret: str = ""
    list_id: str = "sendtime.local"
    message_id_domain: str = "sendtime.local"
    #: Marketing sends per user per period (count 0: no cap).
    frequency_cap_count: Annotated[int, msgspec.Meta(ge=0)] = 3
    frequency_cap_period_s: Seconds = 86400.0
    quiet_hours: QuietHoursSettings | None = None
    #: The budget for fetching and rendering a flow's email.
    render_budget_ms: Annotated[float, msgspec.Meta(gt=0)] = 2000.0
    max_concurrent_sends: Annotated[int, msgspec.Meta(ge=1)] = 32
    #: How often the scheduler looks for due sends when nothing wakes it sooner.
    poll_interval_ms: Annotated[float, msgspec.Meta(gt=0)] = 500.0
    feedback: FeedbackSettings = msgspec.field(default_factory=FeedbackSettings)


def _default_flows() -> list[FlowSettings]:
    """The three flows for the three shipped templates."""
    return [
        FlowSettings(
            id="abandoned_cart",
            template="abandoned_cart",
            entry_event="Product Added",
            entry_key="cart_id",
            delay_s=1800.0,
            exit_events=["Order Completed"],
            require_blocks=["cart"],
        ),
        FlowSettings(
            id="browse_abandonment",
            template="browse_abandonment",
            entry_event="Product Viewed",
            delay_s=3600.0,
            exit_events=["Product Added", "Order Completed"],
            exit_on="any",
            reentry="once_per_period",
            reentry_period_s=7 * 86400.0,
            require_blocks=["recently_viewed"],
        ),
        FlowSettings(
            id="post_purchase",
            template="post_purchase",
            entry_event="Order Completed",
            entry_key="order_id",
            delay_s=3 * 86400.0,
            exit_events=["Order Refunded"],
            require_blocks=["last_order"],
        ),
    ]


class MetricsSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Prometheus metrics at GET /metrics on the HTTP edge."""

    enabled: bool = True
    #: Ask for an API key with the admin scope (Prometheus sends it with
    #: ``authorization`` in its scrape config). Unset: asked for exactly when
    #: the HTTP edge listens beyond loopback (the metrics carry no user data,
    #: but they tell traffic, relays and upstreams to whoever can read them).
    require_admin_key: bool | None = None


class LoggingSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: "auto": readable lines on a terminal, JSON lines otherwise; "json"; "text".
    format: str = "auto"
    #: One line per gRPC call and HTTP request (logger sendtime.access, level INFO).
    access_log: bool = True
    #: User ids in log lines as the first 16 hex digits of their SHA-256; off: as given.
    hash_user_ids: bool = True

    def __post_init__(self) -> None:
        if self.format not in ("auto", "json", "text"):
            raise ValueError("logging.format must be 'auto', 'json' or 'text'")


class TracingSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """OpenTelemetry traces, exported over OTLP; off while otlp_endpoint is empty."""

    #: e.g. "http://127.0.0.1:4317" (grpc) or "http://127.0.0.1:4318/v1/traces" (http/protobuf).
    otlp_endpoint: str = ""
    #: "grpc" or "http/protobuf".
    otlp_protocol: str = "grpc"
    #: Sent with every export (a backend's API key goes here; never logged).
    otlp_headers: dict[str, str] = {}
    otlp_timeout_s: Seconds = 5.0
    service_name: str = "sendtime"
    #: Share of traces kept when the caller did not decide (a caller's sampled flag is followed).
    sample_ratio: Annotated[float, msgspec.Meta(ge=0, le=1)] = 1.0

    def __post_init__(self) -> None:
        if self.otlp_protocol not in ("grpc", "http/protobuf"):
            raise ValueError("tracing.otlp_protocol must be 'grpc' or 'http/protobuf'")
        if self.otlp_endpoint and not self.otlp_endpoint.startswith(("http://", "https://")):
            raise ValueError("tracing.otlp_endpoint must start with http:// or https://")


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    grpc: GrpcSettings = msgspec.field(default_factory=GrpcSettings)
    http: HttpSettings = msgspec.field(default_factory=HttpSettings)
    storage: StorageSettings = msgspec.field(default_factory=StorageSettings)
    events: EventSettings = msgspec.field(default_factory=EventSettings)
    auth: AuthSettings = msgspec.field(default_factory=AuthSettings)
    content: ContentSettings = msgspec.field(default_factory=ContentSettings)
    delivery: DeliverySettings = msgspec.field(default_factory=DeliverySettings)
    flows: list[FlowSettings] = msgspec.field(default_factory=_default_flows)
    segments: list[SegmentSettings] = []
    broadcasts: BroadcastSettings = msgspec.field(default_factory=BroadcastSettings)
    webhooks: list[WebhookSource] = []
    #: How long shutdown waits for streams and requests to finish.
    shutdown_grace_s: Seconds = 10.0
    log_level: str = "INFO"
    logging: LoggingSettings = msgspec.field(default_factory=LoggingSettings)
    metrics: MetricsSettings = msgspec.field(default_factory=MetricsSettings)
    tracing: TracingSettings = msgspec.field(default_factory=TracingSettings)

    def __post_init__(self) -> None:
        exposed = self.edges_beyond_loopback()
        if exposed and self.dev_key_works() and not self.auth.dev_key_beyond_loopback:
            raise ValueError(
                f"auth.dev_key is on while {' and '.join(exposed)} listens beyond loopback: anyone"
                " who reaches it would have every scope with 'dev-key'. Configure [[auth.keys]] and"
                " set auth.dev_key = false (or auth.dev_key_beyond_loopback = true to force it)"
            )

    def dev_key_works(self) -> bool:
        """The dev key is accepted: on, and no API key configured (one turns it off)."""
        return self.auth.dev_key and not self.auth.keys

    def edges_beyond_loopback(self) -> list[str]:
        """The edges reachable from other hosts, as "grpc.host = '0.0.0.0'"."""
        return [
            f"{name}.host = {edge.host!r}"
            for name, edge in (("grpc", self.grpc), ("http", self.http))
            if not is_loopback(edge.host)
        ]

    def metrics_need_key(self) -> bool:
        if self.metrics.require_admin_key is not None:
            return self.metrics.require_admin_key
        return not is_loopback(self.http.host)


def is_loopback(host: str) -> bool:
    """True for an address only this machine reaches ("localhost", 127.0.0.0/8,
    ::1); a host name other than localhost, or a wildcard, counts as reachable."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def public_base_url(settings: Settings, http_port: int) -> str:
    """Where email links point: ``delivery.public_base_url``, else the HTTP
    edge's own address on the port it listens on (a wildcard host is shown as
    the loopback address, the one a browser on this machine can open)."""
    if settings.delivery.public_base_url:
        return settings.delivery.public_base_url.rstrip("/")
    http = settings.http
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(http.host, http.host)  # noqa: S104
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if http.tls else 'http'}://{host}:{http_port}"


def is_loopback_url(url: str) -> bool:
    """True when ``url`` names this machine only (localhost, 127.0.0.0/8, ::1):
    a link no recipient elsewhere can open."""
    host = urlsplit(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def hash_key(key: str) -> str:
    """The stored form of an API key. Keys are long random tokens, so a fast
    hash is enough: nobody can brute-force 32 random bytes."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def load_settings(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Build settings from the TOML file (if any) and the environment."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise SettingsError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None
        # before the environment's values, which stay relative to the working folder
        _resolve_paths(raw, msgspec.inspect.type_info(Settings), path.expanduser().absolute().parent)
    _apply_env(raw, os.environ if environ is None else environ)
    try:
        return msgspec.convert(raw, Settings, strict=False, dec_hook=_decode_path)
    except msgspec.ValidationError as exc:
        raise SettingsError(f"invalid settings: {_readable(str(exc))}") from None


def _is_path(info: msgspec.inspect.Type) -> bool:
    if isinstance(info, msgspec.inspect.UnionType):
        return any(_is_path(t) for t in info.types)
    return isinstance(info, msgspec.inspect.CustomType) and info.cls is Path


def _resolve_paths(raw: dict[str, Any], info: msgspec.inspect.Type, base: Path) -> None:
    """Make the relative paths in a config file's tables relative to ``base``."""
    if isinstance(info, msgspec.inspect.UnionType):
        tables = [t for t in info.types if isinstance(t, msgspec.inspect.StructType)]
        # an optional table ([grpc.tls]); a union of several (the relay kinds) keeps its own rules
        if len(tables) == 1:
            _resolve_paths(raw, tables[0], base)
        return
    if not isinstance(info, msgspec.inspect.StructType):
        return
    for field in info.fields:
        value = raw.get(field.encode_name)
        if isinstance(value, str) and _is_path(field.type):
            given = Path(value).expanduser()
            if not given.is_absolute():
                raw[field.encode_name] = os.path.normpath(base / given)
        elif isinstance(value, dict):
            _resolve_paths(value, field.type, base)


def _decode_path(type_: type, value: Any) -> Any:
    if type_ is Path and isinstance(value, str):
        return Path(value).expanduser()
    raise NotImplementedError(f"cannot read {type_.__name__} from settings")


def _apply_env(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name in (
            "SENDTIME_CONFIG",
            "SENDTIME_TARGET",
            "SENDTIME_API_KEY",
        ):
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SettingsError(f"{name}: {'.'.join(path[:-1])} is not a table")
            node = child
        node[path[-1]] = value


def _readable(message: str) -> str:
    # msgspec says "... - at `$.grpc.port`"; show the setting as a dotted name
    return message.replace("`$.", "`").replace("- at", "at")
