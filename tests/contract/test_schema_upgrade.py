"""Opening a store written by the previous schema version upgrades it: the
identity links (schema 3) are made from the events it still holds, and
what it held before is all there."""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

from sendtime.server.domain.errors import Unavailable
from sendtime.server.store.postgres import LATEST, PostgresBackend
from sendtime.server.store.postgres._migrations import migrate, version
from sendtime.server.store.sqlite import SCHEMA_VERSION, SqliteBackend
from sendtime.server.store.sqlite._db import SCHEMA
from sendtime.server.store.sqlite._rows import micros
from tests.contract.conftest import NOW, postgres_schema

AT = NOW - timedelta(hours=1)

# Events as schema 2 stored them: (message_id, profile_key, user_id,
# anonymous_id, kind, name, ref_id, body)
OLD_EVENTS = [
    ("v1", "a:anon-1", "", "anon-1", "track", "Product Viewed", "", b"{}"),
    ("i1", "u:ada", "ada", "anon-1", "identify", "", "", b'{"email":"ada@example.com"}'),
    ("t1", "u:bob", "bob", "anon-2", "track", "Product Added", "", b'{"product_id":"p1"}'),
    ("al", "u:ada-2", "ada-2", "", "alias", "", "ada", b"{}"),
    ("p1", "u:cy", "cy", "anon-3", "page", "", "", b"{}"),
]
EXPECTED = {
    ("a:anon-1", "u:ada"),
    ("a:anon-2", "u:bob"),
    ("a:ada", "u:ada-2"),
    ("u:ada", "u:ada-2"),
}


def _version_2_file(path: Path) -> None:
    """A file as sendtime with schema version 2 left it (no identity_links)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(SCHEMA)
    conn.execute("DROP TABLE identity_links")
    conn.execute("PRAGMA user_version = 2")
    for message_id, key, user, anonymous, kind, name, ref_id, body in OLD_EVENTS:
        conn.execute(
            "INSERT INTO events (message_id, profile_key, user_id, anonymous_id, kind, name, event_time,"
            " received_at, ref_id, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (message_id, key, user, anonymous, kind, name, micros(AT), micros(NOW), ref_id, body),
        )
    conn.close()


async def test_a_sqlite_file_of_version_2_is_upgraded_with_the_links_of_its_events(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    _version_2_file(path)
    storage = await SqliteBackend.open(path)
    try:
        people = await storage.links.load_people(["u:ada", "u:bob"])
        assert {(link.from_key, link.to_key) for link in people.links} == EXPECTED
        assert {link.at for link in people.links} == {AT}
        replayed, _ = await storage.profiles.replay(0)
        assert [e.message_id for e in replayed] == [row[0] for row in OLD_EVENTS]
    finally:
        await storage.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    conn.close()
    # and it opens again as it is now
    storage = await SqliteBackend.open(path)
    try:
        people = await storage.links.load_people(["a:anon-1"])
        assert len(people.links) == 3  # anon-1 -> ada -> ada-2 <- a:ada
    finally:
        await storage.close()


async def test_a_sqlite_file_of_an_unknown_version_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "odd.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    with pytest.raises(Unavailable, match="schema version 1"):
        await SqliteBackend.open(path)


async def test_a_postgres_database_at_migration_2_gets_the_links_of_its_events() -> None:
    async with postgres_schema() as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            assert await migrate(conn, target=2) == [1, 2]
            await conn.executemany(
                "INSERT INTO events (profile_key, message_id, user_id, anonymous_id, kind, name, event_time,"
                " received_at, ref_id, body) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                [
                    (key, mid, user, anon, kind, name, AT, NOW, ref, body)
                    for mid, key, user, anon, kind, name, ref, body in OLD_EVENTS
                ],
            )
        finally:
            await conn.close()
        storage = await PostgresBackend.open(dsn, pool_size=2)  # applies migration 3 (and those after)
        try:
            people = await storage.links.load_people(["u:ada", "u:bob"])
            assert {(link.from_key, link.to_key) for link in people.links} == EXPECTED
        finally:
            await storage.close()
        conn = await asyncpg.connect(dsn)
        try:
            assert await version(conn) == LATEST
        finally:
            await conn.close()
