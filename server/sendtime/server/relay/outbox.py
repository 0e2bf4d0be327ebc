"""The outbox: each email written as <idempotency key>.eml in a folder, so a
newcomer running ``make run`` can open what would have been sent.

A write is atomic and durable: the message goes to a temporary file in the same
folder, is fsynced, then hard-linked to its final name (which fails if the name
exists, so a second write of the same key leaves the first file alone and adds
nothing), and the folder is fsynced. The file I/O runs in a thread, off the
event loop. The "ESP message id" is the email's own Message-ID.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Final
from urllib.parse import quote

from sendtime.server.relay.base import OutgoingEmail, PermanentFailure, TransientFailure
from sendtime.server.relay.config import OutboxConfig

#: Room for ".eml" and the temporary files' prefix within a 255-byte name.
_MAX_NAME_BYTES: Final = 200
#: OS errors that another try cannot mend.
_PERMANENT_ERRNOS: Final = frozenset(
    {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENAMETOOLONG, errno.ENOTDIR}
)
#: What os.link says on a file system that has no hard links.
_NO_HARD_LINKS: Final = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP})


def file_name(idempotency_key: str) -> str:
    """A safe, unique file name for a key: characters outside [A-Za-z0-9._-] are
    percent-escaped (so "/" cannot leave the folder), a leading dot is escaped
    (no hidden files, no ".."), and a very long key becomes its digest."""
    stem = quote(idempotency_key, safe="")
    if stem.startswith("."):
        stem = "%2E" + stem[1:]
    if not stem or len(stem.encode()) > _MAX_NAME_BYTES:
        stem = "sha256-" + hashlib.sha256(idempotency_key.encode()).hexdigest()
    return stem + ".eml"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_once(directory: Path, name: str, content: bytes) -> bool:
    """Write ``content`` as ``directory/name`` unless that file exists; True when
    this call wrote it."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / name
    if final.exists():
        return False
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".eml")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temporary, final)  # atomic, and never replaces an existing file
        except FileExistsError:
            return False
        except OSError as error:
            if error.errno not in _NO_HARD_LINKS:
                raise
            # a file system without hard links: rename, after checking again
            if final.exists():
                return False
            os.replace(temporary, final)
            _fsync_dir(directory)
            return True
        _fsync_dir(directory)
        return True
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


class OutboxRelay:
    name = "outbox"
    #: The file name is the idempotency key: writing it again changes nothing.
    idempotent = True

    def __init__(self, config: OutboxConfig) -> None:
        self.directory = config.directory

    def path_for(self, email: OutgoingEmail) -> Path:
        return self.directory / file_name(email.idempotency_key)

    async def attempt(self, email: OutgoingEmail) -> str:
        try:
            await asyncio.to_thread(write_once, self.directory, file_name(email.idempotency_key), email.mime)
        except OSError as error:
            reason = f"outbox: cannot write to {self.directory}: {error.strerror or error}"
            if error.errno in _PERMANENT_ERRNOS:
                raise PermanentFailure(reason) from error
            raise TransientFailure(reason) from error
        return email.message_id

    async def close(self) -> None:
        return None
