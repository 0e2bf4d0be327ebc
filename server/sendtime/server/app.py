"""The server factory: one typed Settings in, a running sendtime out.

    async with Sendtime(settings) as app:   # tests pass port 0 and read app.grpc_port
        ...

``serve`` is what the ``sendtime serve`` command runs: uvloop, signal handlers,
and a graceful stop (health NOT_SERVING, streams drain and ack what was
committed, the store commits what it was handed, then exit).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from datetime import datetime, timedelta
from types import TracebackType
from typing import Self

import uvloop

from sendtime.server.auth import Authenticator
from sendtime.server.domain.ingest import Ingestor, utc_now
from sendtime.server.domain.profiles import ProfileBook
from sendtime.server.domain.queries import ProfileQueries
from sendtime.server.edge.grpc_server import GrpcEdge, build_grpc_edge
from sendtime.server.edge.http_server import HttpEdge, build_http_edge
from sendtime.server.settings import Settings
from sendtime.server.store.sqlite import SqliteStore

log = logging.getLogger("sendtime")

DB_FILE = "sendtime.sqlite3"


class Sendtime:
    def __init__(self, settings: Settings, *, clock: Callable[[], datetime] = utc_now) -> None:
        self.settings = settings
        self._clock = clock
        self._store: SqliteStore | None = None
        self._profiles: ProfileBook | None = None
        self._grpc: GrpcEdge | None = None
        self._http: HttpEdge | None = None
        self._serving = False

    @property
    def grpc_port(self) -> int:
        assert self._grpc is not None, "start() first"
        return self._grpc.port

    @property
    def http_port(self) -> int:
        assert self._http is not None, "start() first"
        return self._http.port

    @property
    def store(self) -> SqliteStore:
        assert self._store is not None, "start() first"
        return self._store

    async def start(self) -> None:
        settings = self.settings
        storage = settings.storage
        self._store = await SqliteStore.open(
            storage.data_dir / DB_FILE,
            synchronous="normal" if storage.synchronous == "normal" else "full",
            dedupe_retention=timedelta(seconds=storage.dedupe_retention_s),
            max_queued_events=storage.max_queued_events,
            cache_mib=storage.sqlite_cache_mib,
        )
        self._profiles = ProfileBook(
            self._store,
            max_cached=storage.profile_cache_size,
            flush_interval_s=storage.profile_flush_interval_s,
        )
        self._store.on_commit = self._profiles.committed
        ingestor = Ingestor(self._store, self._profiles, self._clock)
        queries = ProfileQueries(self._profiles)
        authenticator = Authenticator(settings.auth)
        try:
            await self._profiles.start()
            self._grpc = build_grpc_edge(
                settings.grpc, ingestor=ingestor, queries=queries, authenticator=authenticator
            )
            self._http = build_http_edge(
                settings.http,
                ingestor=ingestor,
                queries=queries,
                authenticator=authenticator,
                webhooks=settings.webhooks,
                ready=lambda: self._serving,
                shutdown_grace_s=settings.shutdown_grace_s,
                clock=self._clock,
            )
            await self._grpc.start()
            await self._http.start()
        except BaseException:
            await self.stop()
            raise
        self._serving = True

    async def stop(self) -> None:
        """Graceful: stop taking work, finish what was taken, then close the store."""
        self._serving = False
        grace = self.settings.shutdown_grace_s
        if self._grpc is not None:
            await self._grpc.stop(grace)
        if self._http is not None:
            await self._http.stop()
        if self._profiles is not None:
            await self._profiles.close()
        if self._store is not None:
            await self._store.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


async def _serve(settings: Settings, on_ready: Callable[[Sendtime], None]) -> None:
    app = Sendtime(settings)
    await app.start()
    on_ready(app)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining for up to %.0f s", settings.shutdown_grace_s)
    await app.stop()
    log.info("stopped")


def serve(settings: Settings, on_ready: Callable[[Sendtime], None]) -> None:
    uvloop.run(_serve(settings, on_ready))
