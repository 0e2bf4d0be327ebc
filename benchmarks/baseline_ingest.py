"""The ingest benchmark's baseline: Segment's ``POST /v1/batch`` written the
plain way, FastAPI + pydantic + SQLite, one process.

Each request's events are validated by pydantic (benchmarks.baseline_http's
SegmentBatch), then stored in one transaction (WAL, synchronous=FULL, as
sendtime's default) with the message id as the primary key (INSERT OR
IGNORE: a retried event is stored once), and the request is answered only
after the commit: the same durability promise sendtime makes. The endpoint
is a plain ``def``, so FastAPI runs it in its thread pool and the blocking
SQLite commit does not stall the event loop; one connection, guarded by a lock.

    python -m benchmarks.baseline_ingest --db FILE [--port 0]

prints "baseline ingest serving HTTP on http://HOST:PORT" when ready;
SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI

from benchmarks.baseline_http import SegmentBatch, check_key, serve

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    message_id TEXT PRIMARY KEY,
    user_id TEXT,
    anonymous_id TEXT,
    type TEXT NOT NULL,
    name TEXT,
    timestamp TEXT,
    received_at TEXT NOT NULL,
    body TEXT NOT NULL
)
"""


def build_app(db: Path) -> FastAPI:
    conn = sqlite3.connect(db, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(SCHEMA)
    lock = threading.Lock()
    app = FastAPI()

    @app.post("/v1/batch")
    def batch(body: SegmentBatch, _: Annotated[None, Depends(check_key)]) -> dict[str, Any]:
        received = datetime.now(UTC).isoformat()
        rows = [
            (
                m.messageId,
                m.userId,
                m.anonymousId,
                m.type,
                m.event,
                m.timestamp.isoformat() if m.timestamp else None,
                received,
                m.model_dump_json(),
            )
            for m in body.batch
        ]
        with lock:
            before = conn.total_changes
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany("INSERT OR IGNORE INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            stored = conn.total_changes - before
        return {"success": True, "accepted": stored, "duplicate": len(rows) - stored}

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.baseline_ingest", description=__doc__)
    parser.add_argument("--db", required=True, help="the SQLite file")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    serve(build_app(Path(args.db)), "baseline ingest", port=args.port)


if __name__ == "__main__":
    main()
