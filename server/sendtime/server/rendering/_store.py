"""Templates from a directory, parsed once, picked up again when they change.

Each template file is looked at (one ``stat``) at most once per check interval
when it is asked for, and reparsed only when its mtime or size changed and its
content hash did too. The directory is listed at most once per interval, so a
new file is found without a restart. A file that turns broken keeps serving its
last good version (and says so in ``errors()``) so that a bad edit does not stop
every send; a file that was never good raises its TemplateError.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sendtime.server.domain.errors import NotFound

from ._errors import TemplateError
from ._spec import FILE_SUFFIX, template_id_for
from ._template import Dialect, RenderedEmail, Template, content_version, parse_template

log = logging.getLogger(__name__)

_Signature = tuple[int, int, int]  # (mtime_ns, size, inode)


class _Entry:
    __slots__ = ("checked_at", "error", "path", "signature", "template", "version")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.signature: _Signature | None = None
        self.version = ""
        self.template: Template | None = None
        self.error: TemplateError | None = None
        self.checked_at = float("-inf")


class TemplateStore:
    """The templates in ``directory`` (files named ``<id>.mjml.liquid``)."""

    def __init__(
        self,
        directory: Path,
        *,
        check_interval_ms: float = 1000.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = directory
        self._interval = check_interval_ms / 1000.0
        self._clock = clock
        self._dialect = Dialect()
        self._entries: dict[str, _Entry] = {}
        self._listed_at = float("-inf")
        self._scan(self._clock())

    def get(self, template_id: str) -> Template:
        """The current version of a template. Raises NotFound for an unknown id
        and TemplateError for a file that has never parsed."""
        now = self._clock()
        if now - self._listed_at >= self._interval:
            self._scan(now)
        entry = self._entries.get(template_id)
        if entry is None:
            raise NotFound(f"no template {template_id!r} in {self.directory}", reason="TEMPLATE_NOT_FOUND")
        if now - entry.checked_at >= self._interval:
            self._refresh(entry, now)
        if entry.template is None:
            assert entry.error is not None
            raise entry.error
        return entry.template

    def render(self, template_id: str, context: Mapping[str, Any]) -> RenderedEmail:
        return self.get(template_id).render(context)

    def ids(self) -> list[str]:
        """Every template file's id, broken ones included, sorted."""
        self._maybe_scan()
        return sorted(self._entries)

    def templates(self) -> list[Template]:
        """The templates that can render (a broken edit lists its last good
        version), sorted by id."""
        found = []
        for template_id in self.ids():
            try:
                found.append(self.get(template_id))
            except (TemplateError, NotFound):
                continue
        return found

    def errors(self) -> dict[str, TemplateError]:
        """The templates whose file is broken now, by id, including those still
        serving an earlier good version."""
        for template_id in self.ids():
            try:
                self.get(template_id)
            except (TemplateError, NotFound):
                continue
        return {tid: e.error for tid, e in sorted(self._entries.items()) if e.error is not None}

    def _maybe_scan(self) -> None:
        now = self._clock()
        if now - self._listed_at >= self._interval:
            self._scan(now)

    def _scan(self, now: float) -> None:
        self._listed_at = now
        try:
            paths = sorted(self.directory.glob(f"*{FILE_SUFFIX}"))
        except OSError as err:
            log.warning("cannot list templates in %s: %s", self.directory, err)
            return
        found = {template_id_for(path): path for path in paths if path.is_file()}
        for template_id in self._entries.keys() - found.keys():
            del self._entries[template_id]
        for template_id, path in found.items():
            if template_id not in self._entries:
                entry = _Entry(path)
                self._entries[template_id] = entry
                self._refresh(entry, now)

    def _refresh(self, entry: _Entry, now: float) -> None:
        entry.checked_at = now
        try:
            stat = os.stat(entry.path)
        except OSError:
            # Gone: the next listing drops it; until then serve what we have.
            return
        signature = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if signature == entry.signature:
            return
        try:
            source = entry.path.read_bytes()
        except OSError as err:
            log.warning("cannot read template %s: %s", entry.path, err)
            return
        entry.signature = signature
        version = content_version(source)
        if version == entry.version:
            return
        entry.version = version
        try:
            entry.template = parse_template(entry.path, source, dialect=self._dialect)
            entry.error = None
            log.info("template %s loaded, version %s", entry.template.id, version)
        except TemplateError as err:
            entry.error = err
            if entry.template is not None:
                log.error(
                    "template %s is broken, still serving version %s: %s",
                    entry.path,
                    entry.template.version,
                    err,
                )
            else:
                log.error("template %s is broken: %s", entry.path, err)
