"""Versioned schema migrations, applied in order under an advisory lock, so
that replicas starting together do not race: the first applies what is
missing, the others wait, then find nothing left to do.

Each migration runs in its own transaction with the row that records it.
Never edit a migration that has shipped: add the next one.

Tables that grow with users carry the user's profile key first in their
primary key (events, profiles, sends, send_attempts, flow_exits), so that a
distributed PostgreSQL (Citus) can shard them by it. Uniqueness that is not
per user lives in tables keyed by what must be unique (message_ids by message
id, send_keys by send key, suppressions by subject); catalog and
schema_migrations are small reference tables.
"""

from __future__ import annotations

import logging
from typing import Final

import asyncpg

log = logging.getLogger("sendtime.server.store.postgres")

#: Any number that no other application on the database uses as an advisory lock.
MIGRATION_LOCK: Final = 0x5E4D71E0

MIGRATIONS: Final[tuple[tuple[int, str, str], ...]] = (
    (
        1,
        "events, profiles, catalog, the delivery ledger, exits, suppressions",
        """
CREATE TABLE message_ids (
    message_id  text PRIMARY KEY,
    received_at timestamptz NOT NULL
);
CREATE SEQUENCE event_position;
CREATE TABLE events (
    profile_key  text NOT NULL,
    position     bigint NOT NULL DEFAULT nextval('event_position'),
    message_id   text NOT NULL,
    user_id      text NOT NULL,
    anonymous_id text NOT NULL,
    kind         text NOT NULL,
    name         text NOT NULL,
    event_time   timestamptz NOT NULL,
    received_at  timestamptz NOT NULL,
    ref_id       text NOT NULL,
    body         bytea NOT NULL,
    PRIMARY KEY (profile_key, position)
);
-- BRIN: nearly free to maintain on insert, enough for ordered scans and pruning.
CREATE INDEX events_by_position ON events USING brin (position);
CREATE INDEX events_by_received ON events USING brin (received_at);
CREATE INDEX message_ids_by_received ON message_ids USING brin (received_at);
CREATE TABLE profiles (
    profile_key text PRIMARY KEY,
    doc         bytea NOT NULL
);
CREATE TABLE catalog (
    product_id text PRIMARY KEY,
    doc        bytea NOT NULL
);
CREATE SEQUENCE send_id;
CREATE TABLE sends (
    profile_key        text NOT NULL,
    id                 bigint NOT NULL DEFAULT nextval('send_id'),
    send_key           text NOT NULL,
    flow_id            text NOT NULL,
    template_id        text NOT NULL,
    user_id            text NOT NULL,
    anonymous_id       text NOT NULL,
    entry_key          text NOT NULL,
    entry_message_id   text NOT NULL,
    entry_time         timestamptz NOT NULL,
    received_at        timestamptz NOT NULL,
    due_at             timestamptz NOT NULL,
    status             text NOT NULL,
    reason             text NOT NULL DEFAULT '',
    attempts           integer NOT NULL DEFAULT 0,
    relay              text NOT NULL DEFAULT '',
    esp_message_id     text NOT NULL DEFAULT '',
    template_version   text NOT NULL DEFAULT '',
    subscription_group text NOT NULL,
    created_at         timestamptz NOT NULL,
    updated_at         timestamptz NOT NULL,
    accepted_at        timestamptz,
    PRIMARY KEY (profile_key, id)
);
CREATE UNIQUE INDEX sends_by_id ON sends (id);
CREATE INDEX sends_due ON sends (due_at) WHERE status = 'scheduled';
CREATE INDEX sends_by_flow ON sends (flow_id, id);
-- One send per key, whoever asks: the key decides which user's send it is.
CREATE TABLE send_keys (
    send_key    text PRIMARY KEY,
    profile_key text NOT NULL,
    send_id     bigint NOT NULL
);
CREATE TABLE send_attempts (
    profile_key text NOT NULL,
    send_id     bigint NOT NULL,
    attempt     integer NOT NULL,
    at          timestamptz NOT NULL,
    outcome     text NOT NULL,
    detail      text NOT NULL,
    PRIMARY KEY (profile_key, send_id, attempt, outcome)
);
CREATE TABLE flow_exits (
    profile_key text NOT NULL,
    flow_id     text NOT NULL,
    entry_key   text NOT NULL,
    event_time  timestamptz NOT NULL,
    event_name  text NOT NULL,
    PRIMARY KEY (profile_key, flow_id, entry_key, event_time)
);
CREATE TABLE suppressions (
    subject    text NOT NULL,
    grp        text NOT NULL,
    reason     text NOT NULL,
    source     text NOT NULL,
    created_at timestamptz NOT NULL,
    PRIMARY KEY (subject, grp)
);
""",
    ),
    (
        2,
        "claim leases, so several replicas can share the ledger",
        """
ALTER TABLE sends ADD COLUMN lease_until timestamptz;
CREATE INDEX sends_leased ON sends (lease_until) WHERE status IN ('sending', 'relaying');
""",
    ),
    (
        3,
        "identity links, with those the stored events carry",
        """
-- Ids that are one person (domain.identity.IdLink): from 'a:<anonymous id>'
-- or 'u:<user id>' (alias) to 'u:<user id>', written in the transaction of
-- the event that says so. Keyed by from_key first, like the per-user tables.
CREATE TABLE identity_links (
    from_key   text NOT NULL,
    to_key     text NOT NULL,
    message_id text NOT NULL,
    at         timestamptz NOT NULL,
    PRIMARY KEY (from_key, to_key, message_id)
);
CREATE INDEX identity_links_to ON identity_links (to_key, from_key);
-- The links of the events still stored (those past the dedupe retention are gone).
INSERT INTO identity_links
SELECT 'a:' || anonymous_id, 'u:' || user_id, message_id, event_time FROM events
WHERE user_id != '' AND anonymous_id != '' AND kind IN ('identify', 'track')
UNION ALL
SELECT prefix || ref_id, 'u:' || user_id, message_id, event_time
FROM events, (VALUES ('a:'), ('u:')) AS p(prefix)
WHERE kind = 'alias' AND user_id != '' AND ref_id != '' AND ref_id != user_id
ON CONFLICT DO NOTHING;
""",
    ),
    (
        4,
        "segments and broadcasts (a broadcast's sends are rows of sends)",
        """
CREATE TABLE segments (
    name text PRIMARY KEY,
    doc  bytea NOT NULL
);
CREATE TABLE broadcasts (
    id              text PRIMARY KEY,
    idempotency_key text NOT NULL UNIQUE,
    state           text NOT NULL,
    created_at      timestamptz NOT NULL,
    doc             bytea NOT NULL
);
""",
    ),
)

LATEST: Final = MIGRATIONS[-1][0]


async def migrate(conn: asyncpg.Connection, *, target: int = LATEST) -> list[int]:
    """Apply the migrations past the database's version, up to ``target``;
    returns the versions applied (none when it is up to date)."""
    applied: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        # inside the lock: two CREATE TABLE IF NOT EXISTS at once can still collide
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations"
            " (version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        current = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations")
        if current > LATEST:
            raise RuntimeError(
                f"the database has schema version {current}; this sendtime knows up to {LATEST}"
            )
        for version, name, sql in MIGRATIONS:
            if current < version <= target:
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
                    )
                log.info("applied schema migration %d: %s", version, name)
                applied.append(version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    return applied


async def version(conn: asyncpg.Connection) -> int:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    return (
        int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations")) if exists else 0
    )
