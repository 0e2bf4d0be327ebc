"""The smaller ports on SQLite: profiles, identity links, catalog, suppressions and exits."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import cache
from typing import Final

import msgspec

from sendtime.server.domain.catalog import Product
from sendtime.server.domain.events import Event
from sendtime.server.domain.identity import IdLink
from sendtime.server.domain.ports import MAX_LINKED_KEYS, People
from sendtime.server.domain.profile import Profile
from sendtime.server.store.sqlite._db import PROFILES_POSITION, SqliteDatabase, select_meta
from sendtime.server.store.sqlite._events import replay
from sendtime.server.store.sqlite._ledger import select_exit, select_suppressed
from sendtime.server.store.sqlite._rows import encode_json, from_micros, insert_rows, micros, padded

_decode_product = msgspec.json.Decoder(Product).decode
_encode_json = msgspec.json.Encoder().encode
_decode_profile = msgspec.msgpack.Decoder(Profile).decode


class SqliteProfiles:
    """Folded profiles, written in batches with the event position they include.
    The saves are writes of their own (not the events' transaction): a restart
    folds the events past the saved position again."""

    writes_profiles_with_events = False

    def __init__(self, db: SqliteDatabase) -> None:
        self._db = db

    async def load_profiles(self, keys: Sequence[str]) -> dict[str, Profile]:
        return await self._db.read(_select_profiles, list(keys))

    async def stage_profiles(self, rows: Sequence[tuple[str, bytes]]) -> None:
        flat = [value for row in rows for value in row]
        await self._db.submit(lambda conn: _upsert_profiles(conn, "profiles_staged", flat))

    async def save_profiles(self, rows: Sequence[tuple[str, bytes]], position: int) -> None:
        flat = [value for row in rows for value in row]

        def save(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO profiles SELECT profile_key, doc FROM profiles_staged WHERE true"
                " ON CONFLICT (profile_key) DO UPDATE SET doc = excluded.doc"
            )
            conn.execute("DELETE FROM profiles_staged")
            _upsert_profiles(conn, "profiles", flat)
            conn.execute(
                "INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (PROFILES_POSITION, position),
            )

        await self._db.submit(save)

    async def profiles_position(self) -> int:
        return await self._db.read(select_meta, PROFILES_POSITION)

    async def replay(self, after: int) -> tuple[list[Event], int]:
        return await self._db.scan(lambda conn: replay(conn, after))

    async def scan_profiles(self, after: str, limit: int) -> list[tuple[str, bytes]]:
        # a connection of its own: a page is a long read, and the shared
        # reader serves the profile loads of content calls meanwhile
        return await self._db.scan(lambda conn: _scan_profiles(conn, (after, limit)))


def _scan_profiles(conn: sqlite3.Connection, arg: tuple[str, int]) -> list[tuple[str, bytes]]:
    return conn.execute(
        "SELECT profile_key, doc FROM profiles WHERE profile_key > ? ORDER BY profile_key LIMIT ?", arg
    ).fetchall()


def _upsert_profiles(conn: sqlite3.Connection, table: str, flat: list[bytes | str]) -> None:
    tail = " ON CONFLICT (profile_key) DO UPDATE SET doc = excluded.doc"
    insert_rows(conn, f"INSERT INTO {table} VALUES", "(?,?)", flat, tail=tail)


def _select_profiles(conn: sqlite3.Connection, keys: list[str]) -> dict[str, Profile]:
    found: dict[str, Profile] = {}
    for start in range(0, len(keys), 512):
        chunk = padded(keys[start : start + 512])
        found.update(
            (key, _decode_profile(doc)) for key, doc in conn.execute(_select_profiles_sql(len(chunk)), chunk)
        )
    return found


@cache
def _select_profiles_sql(keys: int) -> str:
    return f"SELECT profile_key, doc FROM profiles WHERE profile_key IN ({','.join('?' * keys)})"  # noqa: S608


class SqliteLinks:
    """Identity links (written by the event store with their events), read
    with the profiles they reach in one call on the reader: one thread hop,
    as loading the profiles alone was."""

    def __init__(self, db: SqliteDatabase) -> None:
        self._db = db

    async def load_people(self, keys: Sequence[str]) -> People:
        return await self._db.read(_select_people, list(keys))


# Every key linked to the keys asked for, through links either way, then the
# links that leave the keys reached. (A link's both keys are reached, unless
# the bound cut the walk short.)
_REACHED_LINKS: Final = """
WITH RECURSIVE reach(k) AS (
    SELECT value FROM json_each(?)
    UNION SELECT to_key FROM identity_links JOIN reach ON from_key = k
    UNION SELECT from_key FROM identity_links JOIN reach ON to_key = k
    LIMIT ?
)
SELECT from_key, to_key, at, message_id FROM identity_links WHERE from_key IN reach
"""


def _select_people(conn: sqlite3.Connection, keys: list[str]) -> People:
    links = [
        IdLink(from_key, to_key, from_micros(at), message_id)
        for from_key, to_key, at, message_id in conn.execute(
            _REACHED_LINKS, (_encode_json(keys).decode(), len(keys) + MAX_LINKED_KEYS)
        )
    ]
    if links:
        keys = list(dict.fromkeys([*keys, *(key for link in links for key in (link.from_key, link.to_key))]))
    return People(_select_profiles(conn, keys), links)


class SqliteCatalog:
    def __init__(self, db: SqliteDatabase) -> None:
        self._db = db

    async def save_products(self, products: Sequence[Product]) -> None:
        rows = [(p.id, encode_json(p)) for p in products]

        def save(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO catalog VALUES (?, ?) ON CONFLICT (product_id) DO UPDATE SET doc = excluded.doc",
                rows,
            )

        await self._db.submit(save)

    async def load_products(self) -> list[Product]:
        rows = await self._db.read(_select_catalog, None)
        return [_decode_product(doc) for (doc,) in rows]


def _select_catalog(conn: sqlite3.Connection, _arg: object) -> list[tuple[bytes]]:
    return conn.execute("SELECT doc FROM catalog").fetchall()


class SqliteSuppressions:
    def __init__(self, db: SqliteDatabase) -> None:
        self._db = db

    async def suppress(self, subject: str, group: str, reason: str, source: str) -> bool:
        def add(conn: sqlite3.Connection) -> bool:
            return bool(
                conn.execute(
                    "INSERT OR IGNORE INTO suppressions VALUES (?, ?, ?, ?, ?)",
                    (subject, group, reason, source, micros(datetime.now(UTC))),
                ).rowcount
            )

        return await self._db.submit(add)

    async def is_suppressed(self, subjects: Sequence[str], group: str) -> bool:
        return await self._db.read(select_suppressed, (list(subjects), group))

    async def unsuppress(self, subject: str, group: str, reason: str) -> bool:
        def lift(conn: sqlite3.Connection) -> bool:
            return bool(
                conn.execute(
                    "DELETE FROM suppressions WHERE subject = ? AND grp = ? AND reason = ?",
                    (subject, group, reason),
                ).rowcount
            )

        return await self._db.submit(lift)


class SqliteExits:
    def __init__(self, db: SqliteDatabase) -> None:
        self._db = db

    async def exit_since(self, profile_key: str, flow_id: str, entry_key: str, since: datetime) -> str | None:
        return await self._db.read(select_exit, (profile_key, flow_id, entry_key, micros(since)))
