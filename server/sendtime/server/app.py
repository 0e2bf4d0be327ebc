"""The server factory: one typed Settings in, a running sendtime out.

    async with Sendtime(settings) as app:   # tests pass port 0 and read app.grpc_port
        ...

``serve`` is what the ``sendtime serve`` command runs: uvloop, signal handlers,
and a graceful stop (health NOT_SERVING, streams drain and ack what was
committed, profiles are saved, the store commits what it was handed, then exit).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import secrets
import signal
from collections.abc import Callable, Sequence
from datetime import datetime, time, timedelta
from pathlib import Path
from types import TracebackType
from typing import Self

import aiohttp
import msgspec
import uvloop
from opentelemetry.sdk.trace.export import SpanExporter

from sendtime.server.auth import Authenticator
from sendtime.server.broadcasting import Broadcasts, SegmentEvaluator, Segments
from sendtime.server.cache import CacheFetcher, CircuitBreakers, MemoryCache
from sendtime.server.deliveries import Deliveries, DeliveryQueries, Suppressions
from sendtime.server.dispatch import Dispatcher, DispatchPolicy
from sendtime.server.domain.blocks import BUILT_IN_BLOCKS, OfferRule
from sendtime.server.domain.catalog import Catalog, CatalogUpdater, load_products
from sendtime.server.domain.commits import AfterCommit
from sendtime.server.domain.content import ContentPipeline, ContentPolicy
from sendtime.server.domain.errors import Unavailable
from sendtime.server.domain.events import EventWindow, known_payload
from sendtime.server.domain.flows import ExitOn, Flow, FlowPlanner, Reentry
from sendtime.server.domain.ingest import Ingestor, utc_now
from sendtime.server.domain.learning import LEARNED_EVENTS, EventLearner
from sendtime.server.domain.ports import EventStore, Storage
from sendtime.server.domain.profiles import ProfileBook
from sendtime.server.domain.queries import ProfileQueries
from sendtime.server.domain.recommend import Recommender
from sendtime.server.domain.segments import Segment
from sendtime.server.domain.sends import FrequencyCap, QuietHours
from sendtime.server.domain.unsubscribe import EmailLinks
from sendtime.server.edge.grpc_server import GrpcEdge, build_grpc_edge
from sendtime.server.edge.http_server import HttpEdge, build_http_edge
from sendtime.server.edge.status_page import StatusPage
from sendtime.server.fdlimit import fit_open_files
from sendtime.server.feedback import PostmarkFeedback, SendGridFeedback
from sendtime.server.looplag import LoopLag
from sendtime.server.observe import Telemetry
from sendtime.server.preferences import Preferences
from sendtime.server.relay import OutboxConfig, RelayConfig, build_retrying_relay
from sendtime.server.relay.base import RetryingRelay
from sendtime.server.rendering import RenderPool, TemplateStore
from sendtime.server.settings import (
    ContentSettings,
    DeliverySettings,
    FlowSettings,
    Settings,
    is_loopback_url,
    public_base_url,
)
from sendtime.server.shipped import DEMO_CATALOG, DEMO_IMAGES, TEMPLATES, shipped
from sendtime.server.store.postgres import PostgresBackend, migrate_database
from sendtime.server.store.sqlite import SqliteBackend
from sendtime.server.upstream import UpstreamProvider

log = logging.getLogger("sendtime")

DB_FILE = "sendtime.sqlite3"


class Sendtime:
    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], datetime] = utc_now,
        span_exporter: SpanExporter | None = None,
    ) -> None:
        """``span_exporter`` turns tracing on with that exporter instead of
        OTLP (tests pass the SDK's InMemorySpanExporter)."""
        self.settings = settings
        self._clock = clock
        self._span_exporter = span_exporter
        self._telemetry: Telemetry | None = None
        self._storage: Storage | None = None
        self._after_commit: AfterCommit | None = None
        self._profiles: ProfileBook | None = None
        self._fetcher: CacheFetcher | None = None
        self._session: aiohttp.ClientSession | None = None
        self._render_pool: RenderPool | None = None
        self._dispatcher: Dispatcher | None = None
        self._segment_evaluator: SegmentEvaluator | None = None
        self._broadcasts: Broadcasts | None = None
        self._loop_lag = LoopLag()
        self._grpc: GrpcEdge | None = None
        self._http: HttpEdge | None = None
        self._serving = False
        self.catalog = Catalog()
        self.recommender = Recommender()

    @property
    def grpc_port(self) -> int:
        assert self._grpc is not None, "start() first"
        return self._grpc.port

    @property
    def http_port(self) -> int:
        assert self._http is not None, "start() first"
        return self._http.port

    @property
    def storage(self) -> Storage:
        assert self._storage is not None, "start() first"
        return self._storage

    @property
    def public_base_url(self) -> str:
        """Where the links in emails point (delivery.public_base_url, else the HTTP edge)."""
        return public_base_url(self.settings, self.http_port)

    @property
    def broadcasts_runner(self) -> Broadcasts:
        assert self._broadcasts is not None, "start() first"
        return self._broadcasts

    @property
    def cache(self) -> CacheFetcher:
        assert self._fetcher is not None, "start() first"
        return self._fetcher

    @property
    def telemetry(self) -> Telemetry:
        assert self._telemetry is not None, "start() first"
        return self._telemetry

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise
        self._serving = True

    async def _start(self) -> None:
        """Build and start everything, in the order each part needs the others;
        the edges listen last, HTTP first, and only then do sends go out."""
        settings = self.settings
        self._telemetry = telemetry = Telemetry(settings, span_exporter=self._span_exporter)
        self._storage = backend = await self._open_storage()
        if telemetry.metrics is not None:
            telemetry.metrics.watch_store(backend.stats)
        self._profiles = profiles = ProfileBook(
            backend.profiles,
            backend.links,
            max_cached=settings.storage.profile_cache_size,
            flush_interval_s=settings.storage.profile_flush_interval_s,
        )
        flows = [flow_from_settings(f, settings.delivery.default_sender) for f in settings.flows]
        await self._load_catalog(settings.content)
        templates = TemplateStore(_templates_dir(settings.content))
        pipeline = await self._content_pipeline(profiles, templates)
        self._loop_lag.start()
        await profiles.start()
        # email links point at the HTTP edge's own port when no public address
        # is configured, known once it listens (port 0 in tests)
        links = EmailLinks(await self._unsubscribe_secret(settings.delivery), lambda: self.public_base_url)
        relay = self._relay()
        segments, broadcasts = self._broadcasting(backend, profiles, templates)
        dispatcher = self._dispatcher_for(backend, profiles, pipeline, relay, links, flows, broadcasts)
        ingestor = await self._ingestion(backend, profiles, pipeline, dispatcher, flows)
        authenticator = Authenticator(settings.auth)
        self._grpc = build_grpc_edge(
            settings.grpc,
            ingestor=ingestor,
            queries=ProfileQueries(profiles),
            pipeline=pipeline,
            default_deadline_s=settings.content.default_deadline_ms / 1000,
            deliveries=Deliveries(backend.ledger, flows, templates.get, dispatcher.wake, self._clock),
            segments=segments,
            broadcasts=broadcasts,
            authenticator=authenticator,
            telemetry=telemetry,
        )
        self._http = self._http_edge(
            backend, profiles, pipeline, links, flows, broadcasts, ingestor, authenticator
        )
        # HTTP first: the public address (links, catalog image paths) is the HTTP edge's
        # own until set, and a content call over gRPC must not cache one with port 0
        await self._http.start()
        await self._grpc.start()
        # after the HTTP edge listens: a send due at start renders links to its address
        await dispatcher.start()
        await broadcasts.start()
        if is_loopback_url(self.public_base_url) and not isinstance(settings.delivery.relay, OutboxConfig):
            log.warning(
                "links in emails (unsubscribe, preferences) point at %s, which only this machine can open,"
                " while the %s relay sends real emails: set delivery.public_base_url to this server's public"
                " https address",
                self.public_base_url,
                relay.name,
            )

    async def _content_pipeline(self, profiles: ProfileBook, templates: TemplateStore) -> ContentPipeline:
        """The block cache, the upstreams' HTTP session, the render workers, and the pipeline over them."""
        content = self.settings.content
        telemetry = self.telemetry
        breakers = CircuitBreakers(
            failure_threshold=content.breaker_failures, reset_timeout=content.breaker_reset_s
        )
        self._fetcher = fetcher = CacheFetcher(
            MemoryCache(max_bytes=content.cache_max_bytes), breakers=breakers
        )
        if telemetry.metrics is not None:
            telemetry.metrics.watch_cache(fetcher)
        self._session = session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=content.upstream_connections_per_host)
        )
        allowed = frozenset(content.allowed_upstream_hosts)
        self._render_pool = render_pool = RenderPool(content.render_processes)
        await render_pool.start()
        pipeline = ContentPipeline(
            profiles=profiles,
            catalog=self.catalog,
            recommender=self.recommender,
            cache=fetcher,
            upstreams={
                u.name: UpstreamProvider(
                    u,
                    session,
                    allowed,
                    observer=telemetry.upstream_observer(u.name),
                    tracer=telemetry.tracer,
                    propagator=telemetry.propagator,
                )
                for u in content.upstreams
            },
            templates=templates,
            policy=_policy(content),
            max_concurrent=content.max_concurrent,
            observer=telemetry.content_observer([*BUILT_IN_BLOCKS, *(u.name for u in content.upstreams)]),
            tracer=telemetry.tracer,
            loop_lag=lambda: self._loop_lag.recent_peak_s,
            renderer=render_pool,
            # a catalog image_url "/demo/images/..." is on this server: known once it listens
            public_base_url=lambda: self.public_base_url,
        )
        if telemetry.metrics is not None:
            telemetry.metrics.watch_gauge("sendtime_content_requests_in_flight", lambda: pipeline.in_flight)
        return pipeline

    def _broadcasting(
        self, backend: Storage, profiles: ProfileBook, templates: TemplateStore
    ) -> tuple[Segments, Broadcasts]:
        """Segments (counted in worker processes) and the broadcasts runner over them."""
        settings = self.settings
        self._segment_evaluator = SegmentEvaluator(settings.broadcasts.segment_processes)
        segments = Segments(
            store=backend.broadcasts,
            profiles=backend.profiles,
            book=profiles,
            configured=configured_segments(settings),
            evaluator=self._segment_evaluator,
            batch=settings.broadcasts.segment_batch,
            clock=self._clock,
        )
        self._broadcasts = broadcasts = Broadcasts(
            store=backend.broadcasts,
            segments=segments,
            templates=templates.get,
            clock=self._clock,
            default_sender=settings.delivery.default_sender,
            poll_interval_s=settings.broadcasts.progress_interval_s,
            # replicas share PostgreSQL; a SQLite file has one server
            plan_hold_s=settings.broadcasts.plan_hold_s if settings.storage.backend == "postgres" else 0.0,
        )
        return segments, broadcasts

    def _relay(self) -> RetryingRelay:
        """The relay to the ESP, with retries, observed and traced."""
        relay = build_retrying_relay(
            _in_data_dir(self.settings.delivery.relay, self.settings.storage.data_dir)
        )
        relay.observer = self.telemetry.relay_observer(relay.name)
        relay.tracer = self.telemetry.tracer
        return relay

    def _dispatcher_for(
        self,
        backend: Storage,
        profiles: ProfileBook,
        pipeline: ContentPipeline,
        relay: RetryingRelay,
        links: EmailLinks,
        flows: Sequence[Flow],
        broadcasts: Broadcasts,
    ) -> Dispatcher:
        """The dispatcher: due sends, through the relay, once each."""
        delivery = self.settings.delivery
        telemetry = self.telemetry
        self._dispatcher = dispatcher = Dispatcher(
            ledger=backend.ledger,
            profiles=profiles,
            pipeline=pipeline,
            relay=relay,
            links=links,
            flows={f.id: f for f in flows},
            policy=_dispatch_policy(delivery),
            observer=telemetry.send_observer(),
            tracer=telemetry.tracer,
            campaigns=broadcasts,
            clock=self._clock,
        )
        if telemetry.metrics is not None:
            telemetry.metrics.watch_gauge("sendtime_sends_in_flight", lambda: dispatcher.in_flight)
        return dispatcher

    async def _ingestion(
        self,
        backend: Storage,
        profiles: ProfileBook,
        pipeline: ContentPipeline,
        dispatcher: Dispatcher,
        flows: Sequence[Flow],
    ) -> Ingestor:
        """What follows a commit, the event store that tells it (made last: it
        needs them all), and the ingestor in front. The stored track events
        teach the recommender first."""
        settings = self.settings
        learner = EventLearner(self.recommender)
        self._after_commit = after_commit = AfterCommit(
            profiles=profiles,
            learn=learner.learned,
            invalidate_user=pipeline.invalidate_user,
            wake_dispatcher=dispatcher.wake,
        )
        events: EventStore = backend.event_store(FlowPlanner(flows), after_commit)
        learned = await events.replay_track_events(
            LEARNED_EVENTS, lambda key, name, body: learner.learn(key, known_payload(name, body))
        )
        log.info("recommendations learned from %d stored events", learned)
        after_commit.start()
        return Ingestor(
            events,
            after_commit,
            self._clock,
            observer=self.telemetry.ingest_observer(),
            window=EventWindow(
                max_ahead=timedelta(seconds=settings.events.max_ahead_s),
                max_age=timedelta(seconds=settings.events.max_age_s),
            ),
        )

    def _http_edge(
        self,
        backend: Storage,
        profiles: ProfileBook,
        pipeline: ContentPipeline,
        links: EmailLinks,
        flows: Sequence[Flow],
        broadcasts: Broadcasts,
        ingestor: Ingestor,
        authenticator: Authenticator,
    ) -> HttpEdge:
        settings = self.settings
        delivery = settings.delivery
        feedback = delivery.feedback
        telemetry = self.telemetry
        return build_http_edge(
            settings.http,
            ingestor=ingestor,
            queries=ProfileQueries(profiles),
            authenticator=authenticator,
            webhooks=settings.webhooks,
            pipeline=pipeline,
            catalog=CatalogUpdater(self.catalog, backend.catalog.save_products, pipeline.invalidate_catalog),
            default_deadline_s=settings.content.default_deadline_ms / 1000,
            suppressions=Suppressions(backend.suppressions, links.unsubscribe_tokens, self._clock),
            sendgrid=(
                SendGridFeedback(feedback.sendgrid_public_key, tolerance_s=feedback.sendgrid_tolerance_s)
                if feedback.sendgrid_public_key
                else None
            ),
            postmark=(
                PostmarkFeedback(feedback.postmark_username, feedback.postmark_password)
                if feedback.postmark_username
                else None
            ),
            ready=lambda: self._serving,
            shutdown_grace_s=settings.shutdown_grace_s,
            telemetry=telemetry,
            clock=self._clock,
            status_page=StatusPage(
                authenticator,
                DeliveryQueries(backend.ledger),
                pipeline,
                self.cache,
                telemetry.metrics,
                [f.id for f in flows],
                max_drawing=settings.http.max_status_page_draws,
                broadcasts=broadcasts.running,
            ),
            # refused before their bodies are read, rather than decoded and then refused by the store
            ingest_backlogged=lambda: backend.stats().queued_events >= settings.storage.max_queued_events,
            preferences=Preferences(
                tokens=links.preferences_tokens,
                profiles=profiles,
                suppressions=backend.suppressions,
                ingestor=ingestor,
                groups=[f.subscription_group for f in flows],
                require_opt_in=delivery.require_opt_in,
                clock=self._clock,
            ),
            demo_images=shipped(DEMO_IMAGES),
        )

    async def _open_storage(self) -> Storage:
        """The one place that picks a backend."""
        storage = self.settings.storage
        if storage.backend == "postgres":
            if not self.settings.delivery.unsubscribe_secret:
                # each replica would make its own, and links would break across them
                raise Unavailable(
                    "delivery.unsubscribe_secret must be set with storage.backend = 'postgres':"
                    " every replica must sign unsubscribe links with the same secret"
                )
            return await PostgresBackend.open(
                storage.postgres_dsn,
                pool_size=storage.postgres_pool_size,
                lease=timedelta(seconds=storage.claim_lease_s),
                dedupe_retention=timedelta(seconds=storage.dedupe_retention_s),
                max_queued_events=storage.max_queued_events,
            )
        return await SqliteBackend.open(
            storage.data_dir / DB_FILE,
            synchronous="normal" if storage.synchronous == "normal" else "full",
            dedupe_retention=timedelta(seconds=storage.dedupe_retention_s),
            max_queued_events=storage.max_queued_events,
            cache_mib=storage.sqlite_cache_mib,
        )

    async def _unsubscribe_secret(self, delivery: DeliverySettings) -> bytes:
        """The configured secret, else one made once and kept beside the data."""
        if delivery.unsubscribe_secret:
            return delivery.unsubscribe_secret.encode()
        path = self.settings.storage.data_dir / "unsubscribe.key"
        if not path.exists():
            path.write_text(secrets.token_urlsafe(32))
            path.chmod(0o600)
            log.warning(
                "made an unsubscribe secret in %s; set delivery.unsubscribe_secret when running several servers",
                path,
            )
        return path.read_text().strip().encode()

    async def _load_catalog(self, content: ContentSettings) -> None:
        path = content.catalog_file or shipped(DEMO_CATALOG)
        if path.exists():
            self.catalog.upsert(load_products(path))
        elif content.catalog_file is None:
            log.warning("no catalog at %s: starting with the products stored by the catalog API only", path)
        else:
            raise Unavailable(f"content.catalog_file {path} does not exist")
        # updates made through the API since are newer than the file
        self.catalog.upsert(await self.storage.catalog.load_products())
        log.info("catalog: %d products", len(self.catalog))

    async def stop(self) -> None:
        """Graceful: stop taking work, finish what was taken, save, then close the store."""
        self._serving = False
        grace = self.settings.shutdown_grace_s
        await self._loop_lag.stop()
        if self._grpc is not None:
            await self._grpc.stop(grace)
        if self._http is not None:
            await self._http.stop()
        if self._broadcasts is not None:
            await self._broadcasts.close()
        if self._dispatcher is not None:
            await self._dispatcher.close(grace)
        if self._segment_evaluator is not None:
            await self._segment_evaluator.close()
        if self._render_pool is not None:  # after the last render: edges and sends are done
            await self._render_pool.aclose()
        if self._fetcher is not None:
            await self._fetcher.aclose()
        if self._session is not None:
            await self._session.close()
        if self._after_commit is not None:
            await self._after_commit.close()
        if self._profiles is not None:
            await self._profiles.close()
        if self._storage is not None:
            await self._storage.close()
        if self._telemetry is not None:
            await self._telemetry.aclose()  # the last spans, exported

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


def _templates_dir(content: ContentSettings) -> Path:
    """The configured templates folder, which must exist, else the shipped one."""
    if content.templates_dir is None:
        return shipped(TEMPLATES)
    if not content.templates_dir.is_dir():
        problem = "is not a folder" if content.templates_dir.exists() else "does not exist"
        raise Unavailable(f"content.templates_dir {content.templates_dir} {problem}")
    return content.templates_dir


def _policy(content: ContentSettings) -> ContentPolicy:
    return ContentPolicy(
        block_ttl_s=content.block_ttl_s,
        block_stale_ttl_s=content.block_stale_ttl_s,
        min_fetch_s=content.min_fetch_ms / 1000,
        cache_results=content.cache_results,
        recommendations_size=content.recommendations_size,
        recently_viewed_size=content.recently_viewed_size,
        drop_out_of_stock=content.drop_out_of_stock,
        offers=tuple(
            OfferRule(o.id, o.code, o.text, o.min_cart_total, tuple(o.campaigns)) for o in content.offers
        ),
        answer_reserve_s=content.answer_reserve_ms / 1000,
        answer_reserve_share=content.answer_reserve_share,
        answer_reserve_per_call_s=content.answer_reserve_per_call_ms / 1000,
        render_reserve_s=content.render_reserve_ms / 1000,
        links=dict(content.links),
        negative_ttl_s=content.negative_ttl_s,
    )


def _in_data_dir(relay: RelayConfig, data_dir: Path) -> RelayConfig:
    """An outbox folder given as a relative path lives beside the data."""
    if isinstance(relay, OutboxConfig) and not relay.directory.is_absolute():
        return msgspec.structs.replace(relay, directory=data_dir / relay.directory)
    return relay


def flow_from_settings(flow: FlowSettings, default_sender: str) -> Flow:
    return Flow(
        id=flow.id,
        template=flow.template,
        entry_event=flow.entry_event,
        entry_filter=dict(flow.entry_filter),
        entry_key=flow.entry_key,
        delay=timedelta(seconds=flow.delay_s),
        max_entry_age=timedelta(seconds=flow.max_entry_age_s) if flow.max_entry_age_s else None,
        exit_events=tuple(flow.exit_events),
        exit_on=ExitOn(flow.exit_on),
        reentry=Reentry(flow.reentry),
        reentry_period=timedelta(seconds=flow.reentry_period_s),
        subscription_group=flow.subscription_group,
        sender=flow.sender or default_sender,
        reply_to=flow.reply_to,
        require_blocks=tuple(flow.require_blocks),
    )


def configured_segments(settings: Settings) -> list[Segment]:
    """[[segments]], checked: a bad expression stops the server at start, saying where."""
    segments = [
        Segment(name=s.name, expression=s.expression.strip(), description=s.description, source="config")
        for s in settings.segments
    ]
    Segments.check_configured(segments)
    return segments


def _dispatch_policy(delivery: DeliverySettings) -> DispatchPolicy:
    quiet = delivery.quiet_hours
    return DispatchPolicy(
        default_sender=delivery.default_sender,
        unsubscribe_mailto=delivery.unsubscribe_mailto,
        list_id=delivery.list_id,
        message_id_domain=delivery.message_id_domain,
        frequency_cap=(
            FrequencyCap(delivery.frequency_cap_count, timedelta(seconds=delivery.frequency_cap_period_s))
            if delivery.frequency_cap_count
            else None
        ),
        quiet_hours=(
            QuietHours(
                start=time.fromisoformat(quiet.start),
                end=time.fromisoformat(quiet.end),
                default_timezone=quiet.default_timezone,
                hold=quiet.mode == "hold",
            )
            if quiet is not None
            else None
        ),
        render_budget_s=delivery.render_budget_ms / 1000,
        max_concurrent=delivery.max_concurrent_sends,
        max_send_attempts=delivery.max_send_attempts,
        poll_interval_s=delivery.poll_interval_ms / 1000,
        require_opt_in=delivery.require_opt_in,
    )


async def _serve(settings: Settings, on_ready: Callable[[Sendtime], None]) -> None:
    fit_open_files(settings)
    app = Sendtime(settings)
    await app.start()
    # Everything built at start (modules, templates, the catalog, the profiles
    # folded from the store) lives as long as the process: out of the cyclic
    # collector's sight, full collections under load no longer walk it.
    gc.freeze()
    on_ready(app)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining for up to %.0f s", settings.shutdown_grace_s)
    await app.stop()
    log.info("stopped")


def migrate(settings: Settings) -> str:
    """``sendtime migrate``: bring the configured database's schema up to date
    (replicas also do it as they start, under a lock); says what it did."""
    if settings.storage.backend != "postgres":
        return "the SQLite backend creates its schema as it starts: nothing to migrate"
    applied = uvloop.run(migrate_database(settings.storage.postgres_dsn))
    return f"applied schema migrations {applied}" if applied else "the schema is up to date"


def serve(settings: Settings, on_ready: Callable[[Sendtime], None]) -> None:
    uvloop.run(_serve(settings, on_ready))
