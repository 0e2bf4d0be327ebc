"""What only the SQLite backend has: its files (personal data, owner-only)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sendtime.server.domain.flows import FlowPlanner
from sendtime.server.store.sqlite import FILE_MODE, SqliteBackend
from tests.contract.conftest import Listener, track


async def test_database_files_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "data" / "sendtime.sqlite3"
    old_umask = os.umask(0o022)  # what most shells give: files 0644 unless asked otherwise
    try:
        storage = await SqliteBackend.open(path)
        try:
            await storage.event_store(FlowPlanner([]), Listener()).append([track("m1", "Product Viewed")])
            files = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
            assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == dict.fromkeys(
                (f.name for f in files), FILE_MODE
            )
        finally:
            await storage.close()
        # a file left readable by an older version is closed up at start
        path.chmod(0o644)
        storage = await SqliteBackend.open(path)
        await storage.close()
        assert stat.S_IMODE(path.stat().st_mode) == FILE_MODE
    finally:
        os.umask(old_umask)
