"""The PostgreSQL backend as a server uses it: schema migrations (at start,
under a lock, and by ``sendtime migrate``), a whole sendtime on it, and what it
refuses. Each test works in a schema of its own on the machine's PostgreSQL,
dropped after; skipped, saying why, when none answers."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import msgspec
import pytest

from sendtime.server.app import Sendtime
from sendtime.server.domain.errors import Unavailable
from sendtime.server.domain.events import EventKind, IncomingEvent, TraitsUpdate, validate
from sendtime.server.domain.flows import FlowPlanner, PlannedSend
from sendtime.server.domain.ports import LastChecks
from sendtime.server.domain.profile import Profile
from sendtime.server.domain.sends import SendRecord
from sendtime.server.store.postgres import LATEST, PostgresBackend
from sendtime.server.store.postgres._migrations import migrate, version
from tests.conftest import SettingsFactory
from tests.contract.conftest import ABANDONED_CART, Listener, postgres_schema, track

WRITE_KEY = "Basic " + base64.b64encode(b"dev-key:").decode()


@pytest.fixture
async def dsn() -> AsyncIterator[str]:
    async with postgres_schema() as schema_dsn:
        yield schema_dsn


async def test_an_old_schema_with_data_is_upgraded_and_the_data_kept(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        assert await migrate(conn, target=1) == [1]
        now = datetime.now(UTC)
        await conn.execute(
            "INSERT INTO send_keys VALUES ('k1', 'u:ada', 1);INSERT INTO message_ids VALUES ('m1', now());"
        )
        await conn.execute(
            "INSERT INTO sends (profile_key, id, send_key, flow_id, template_id, user_id, anonymous_id, entry_key,"
            " entry_message_id, entry_time, received_at, due_at, status, subscription_group, created_at,"
            " updated_at) VALUES ('u:ada', 1, 'k1', 'abandoned_cart', 'abandoned_cart', 'ada', '', 'c1', 'm1',"
            " $1, $1, $1, 'scheduled', 'marketing', $1, $1)",
            now - timedelta(minutes=5),
        )
    finally:
        await conn.close()
    # a replica starting on it applies what is missing, and the send is there to claim
    storage = await PostgresBackend.open(dsn, pool_size=2)
    try:
        due = await storage.ledger.claim_due(datetime.now(UTC), 10)
        assert [r.send_key for r in due.records] == ["k1"]
        conn = await asyncpg.connect(dsn)
        try:
            assert await version(conn) == LATEST
            lease = await conn.fetchval("SELECT lease_until FROM sends WHERE id = 1")
            assert lease is not None  # the column migration 2 added, in use
        finally:
            await conn.close()
    finally:
        await storage.close()


async def test_replicas_starting_together_migrate_once(dsn: str) -> None:
    conns = [await asyncpg.connect(dsn) for _ in range(3)]
    try:
        applied = await asyncio.gather(*(migrate(conn) for conn in conns))
        assert sorted(applied, key=len) == [[], [], list(range(1, LATEST + 1))]
    finally:
        for conn in conns:
            await conn.close()


@pytest.mark.slow
def test_sendtime_migrate_brings_the_schema_up_to_date(dsn: str, tmp_path: Any) -> None:
    env = {
        "SENDTIME_STORAGE__BACKEND": "postgres",
        "SENDTIME_STORAGE__POSTGRES_DSN": dsn,
        "SENDTIME_STORAGE__DATA_DIR": str(tmp_path),
        "PATH": "/usr/bin:/bin",
    }
    command = [sys.executable, "-m", "sendtime.server", "migrate"]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert (first.returncode, first.stdout.strip()) == (
        0,
        f"applied schema migrations {list(range(1, LATEST + 1))}",
    )
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert (again.returncode, again.stdout.strip()) == (0, "the schema is up to date")


async def test_a_replica_without_a_shared_unsubscribe_secret_refuses_to_start(
    dsn: str, make_settings: SettingsFactory
) -> None:
    settings = make_settings(storage__backend="postgres", storage__postgres_dsn=dsn)
    with pytest.raises(Unavailable, match=r"delivery\.unsubscribe_secret"):
        await Sendtime(settings).start()


async def test_a_server_on_postgres_takes_events_once_and_shows_the_profile(
    dsn: str, make_settings: SettingsFactory
) -> None:
    settings = make_settings(
        storage__backend="postgres", storage__postgres_dsn=dsn, delivery__unsubscribe_secret="s" * 32
    )
    event = {
        "messageId": "pg-1",
        "userId": "ada",
        "event": "Product Added",
        "properties": {"cart_id": "c1", "product_id": "p1", "name": "Mug", "price": 12, "quantity": 1},
    }
    async with Sendtime(settings) as app, aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{app.http_port}"
        outcomes = []
        for _ in range(2):
            async with session.post(f"{url}/v1/track", json=event, headers={"Authorization": WRITE_KEY}) as r:
                assert r.status == 200, await r.text()
                outcomes.append((await r.json())["outcome"])
        assert outcomes == ["accepted", "duplicate"]
        async with session.get(f"{url}/v1/profiles/ada", headers={"Authorization": "Bearer dev-key"}) as r:
            assert r.status == 200, await r.text()
            body = await r.json()
        assert body["event_count"] == 1


def _planned(key: str, cart: str) -> PlannedSend:
    at = datetime.now(UTC) - timedelta(minutes=5)
    return PlannedSend(
        send_key=key,
        flow_id="abandoned_cart",
        template_id="abandoned_cart",
        profile_key="u:ada",
        user_id="ada",
        anonymous_id="",
        entry_key=cart,
        entry_message_id=f"m-{key}",
        entry_time=at,
        received_at=at,
        due_at=at,
        subscription_group="marketing",
    )


def _checks(record: SendRecord, cap_count: int) -> LastChecks:
    return LastChecks(
        profile_key=record.profile_key,
        flow_id=record.flow_id,
        entry_key=record.entry_key,
        entry_time=record.entry_time,
        group="marketing",
        subjects=(record.profile_key,),
        cap_since=datetime.now(UTC) - timedelta(days=1) if cap_count else None,
        cap_count=cap_count,
        attempt=record.attempts,
    )


async def test_a_cap_and_an_exit_hold_across_two_replicas(dsn: str) -> None:
    one = await PostgresBackend.open(dsn, pool_size=2)
    two = await PostgresBackend.open(dsn, pool_size=2)
    try:
        await one.ledger.schedule_send(_planned("k1", "c1"))
        await one.ledger.schedule_send(_planned("k2", "c2"))
        first, second = (
            (await one.ledger.claim_due(datetime.now(UTC), 1)),
            (await two.ledger.claim_due(datetime.now(UTC), 1)),
        )
        (a,), (b,) = first.records, second.records
        assert a.id != b.id  # never the same send to two replicas
        # both hand over at once under a cap of one: one goes out
        handovers = await asyncio.gather(
            one.ledger.hand_over(a.id, relay="smtp", template_version="v1", checks=_checks(a, 1)),
            two.ledger.hand_over(b.id, relay="smtp", template_version="v1", checks=_checks(b, 1)),
        )
        assert sorted(h.handed_over for h in handovers) == [False, True]
        assert [h.capped for h in handovers if not h.handed_over] == [True]
        # an exit committed by another process stops the hand-over
        await one.ledger.schedule_send(_planned("k3", "c3"))
        (c,) = (await two.ledger.claim_due(datetime.now(UTC), 5)).records
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(
                "INSERT INTO flow_exits VALUES ('u:ada', 'abandoned_cart', '*', now(), 'Order Completed')"
            )
        finally:
            await conn.close()
        stopped = await two.ledger.hand_over(c.id, relay="smtp", template_version="v1", checks=_checks(c, 0))
        assert (stopped.handed_over, stopped.exit_event) == (False, "Order Completed")
    finally:
        await one.close()
        await two.close()


async def test_two_stores_folding_brand_new_users_at_once_lose_no_event(dsn: str) -> None:
    # A round locks the profile rows that exist and inserts the new users'
    # rows at its end: when two replicas take one user for new at once, the
    # second's insert finds the first's row and its round is written again
    # (folding onto the first's profile), never over it.
    backends = [await PostgresBackend.open(dsn, pool_size=2) for _ in range(2)]
    try:
        stores = [backend.event_store(FlowPlanner([ABANDONED_CART]), Listener()) for backend in backends]
        users = [f"new{n}" for n in range(20)]
        rounds = 5
        appends = [
            store.append([track(f"{side}-{r}-{user}", "Product Viewed", user=user) for user in users])
            for r in range(rounds)
            for side, store in enumerate(stores)
        ]
        results = await asyncio.gather(*appends)
        assert all(all(result.is_new) and not result.failed for result in results)
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch("SELECT profile_key, doc FROM profiles ORDER BY 1")
        finally:
            await conn.close()
        counts = {key: msgspec.msgpack.decode(doc, type=Profile).event_count for key, doc in rows}
        assert counts == {f"u:{user}": 2 * rounds for user in users}
    finally:
        for backend in backends:
            await backend.close()


async def test_another_replica_hears_of_the_ids_a_commit_linked(dsn: str) -> None:
    """Its ProfileBook drops what it holds of both sides of a new link (the
    anonymous id's profile, read as the person's, is stale)."""
    backends = [await PostgresBackend.open(dsn, pool_size=2) for _ in range(2)]
    listeners = [Listener(), Listener()]
    try:
        stores = [
            backend.event_store(FlowPlanner([ABANDONED_CART]), listener)
            for backend, listener in zip(backends, listeners, strict=True)
        ]
        identify = validate(
            IncomingEvent(
                message_id="i1",
                kind=EventKind.IDENTIFY,
                user_id="ada",
                anonymous_id="anon-1",
                traits=TraitsUpdate(email="ada@example.com"),
            ),
            datetime.now(UTC),
        )
        await stores[0].append([identify])
        deadline = asyncio.get_running_loop().time() + 10
        while not listeners[1].elsewhere and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        told = {key for keys, _ in listeners[1].elsewhere for key in keys}
        assert told == {"u:ada", "a:anon-1"}
    finally:
        for backend in backends:
            await backend.close()
