"""The smaller ports on PostgreSQL: profiles, identity links, catalog, suppressions, exits."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Final

import asyncpg
import msgspec

from sendtime.server.domain.catalog import Product
from sendtime.server.domain.events import Event
from sendtime.server.domain.identity import IdLink
from sendtime.server.domain.ports import MAX_LINKED_KEYS, People
from sendtime.server.domain.profile import Profile
from sendtime.server.store.postgres._events import replay

_decode_product = msgspec.json.Decoder(Product).decode
_encode_json = msgspec.json.Encoder().encode
_decode_profile = msgspec.msgpack.Decoder(Profile).decode


class PostgresProfiles:
    """Profiles are folded and written in the events' transaction, under a row
    lock per user (see _events.py): what is stored is always every committed
    event's result, so the profile book has nothing to save or replay."""

    writes_profiles_with_events = True

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def load_profiles(self, keys: Sequence[str]) -> dict[str, Profile]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT profile_key, doc FROM profiles WHERE profile_key = ANY($1::text[]) AND doc != ''::bytea",
                list(keys),
            )
        return {key: _decode_profile(doc) for key, doc in rows}

    async def stage_profiles(self, rows: Sequence[tuple[str, bytes]]) -> None:
        await self.save_profiles(rows, 0)

    async def save_profiles(self, rows: Sequence[tuple[str, bytes]], position: int) -> None:
        """Saving a profile folded elsewhere could undo a commit: refused."""
        if rows:
            raise RuntimeError("profiles are written with their events on PostgreSQL")

    async def profiles_position(self) -> int:
        async with self._pool.acquire() as conn:
            return int(await conn.fetchval("SELECT coalesce(max(position), 0) FROM events"))

    async def replay(self, after: int) -> tuple[list[Event], int]:
        return await replay(self._pool, after)

    async def scan_profiles(self, after: str, limit: int) -> list[tuple[str, bytes]]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT profile_key, doc FROM profiles WHERE profile_key > $1 AND doc != ''::bytea"
                " ORDER BY profile_key LIMIT $2",
                after,
                limit,
            )
        return [(row[0], row[1]) for row in rows]


# Every key linked to the keys asked for, through links either way (at most
# $2 keys: the walk stops when the outer query has enough), then in one
# answer the links that leave the keys reached and those keys' profiles.
_PEOPLE: Final = """
WITH RECURSIVE reach(k) AS (
    SELECT unnest($1::text[])
    UNION SELECT CASE WHEN l.from_key = r.k THEN l.to_key ELSE l.from_key END
    FROM identity_links l JOIN reach r ON l.from_key = r.k OR l.to_key = r.k
), reached AS (SELECT k FROM reach LIMIT $2)
SELECT from_key, to_key, message_id, at, NULL::bytea AS doc FROM identity_links
WHERE from_key IN (SELECT k FROM reached)
UNION ALL
SELECT profile_key, NULL, NULL, NULL, doc FROM profiles
WHERE profile_key IN (SELECT k FROM reached) AND doc != ''::bytea
"""


class PostgresLinks:
    """Identity links (written by the event store with their events), read
    with the profiles they reach in one statement: one round trip, as
    loading the profiles alone was."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def load_people(self, keys: Sequence[str]) -> People:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(_PEOPLE, list(keys), len(keys) + MAX_LINKED_KEYS)
        profiles: dict[str, Profile] = {}
        links: list[IdLink] = []
        for from_key, to_key, message_id, at, doc in rows:
            if doc is not None:
                profiles[from_key] = _decode_profile(doc)
            else:
                links.append(IdLink(from_key, to_key, at, message_id))
        return People(profiles, links)


class PostgresCatalog:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def save_products(self, products: Sequence[Product]) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO catalog SELECT * FROM unnest($1::text[], $2::bytea[])"
                " ON CONFLICT (product_id) DO UPDATE SET doc = excluded.doc",
                [p.id for p in products],
                [_encode_json(p) for p in products],
            )

    async def load_products(self) -> list[Product]:
        async with self._pool.acquire() as conn:
            return [_decode_product(doc) for (doc,) in await conn.fetch("SELECT doc FROM catalog")]


class PostgresSuppressions:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def suppress(self, subject: str, group: str, reason: str, source: str) -> bool:
        async with self._pool.acquire() as conn:
            status = await conn.execute(
                "INSERT INTO suppressions VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                subject,
                group,
                reason,
                source,
                datetime.now(UTC),
            )
        return str(status).endswith(" 1")

    async def is_suppressed(self, subjects: Sequence[str], group: str) -> bool:
        async with self._pool.acquire() as conn:
            row = await conn.fetchval(
                "SELECT 1 FROM suppressions WHERE subject = ANY($1::text[]) AND grp IN ($2, '*') LIMIT 1",
                list(subjects),
                group,
            )
        return row is not None

    async def unsuppress(self, subject: str, group: str, reason: str) -> bool:
        async with self._pool.acquire() as conn:
            status = await conn.execute(
                "DELETE FROM suppressions WHERE subject = $1 AND grp = $2 AND reason = $3",
                subject,
                group,
                reason,
            )
        return str(status).endswith(" 1")
