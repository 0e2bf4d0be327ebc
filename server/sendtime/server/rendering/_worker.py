"""A render worker process: ``python -m sendtime.server.rendering._worker``.

Reads requests on stdin and answers on stdout, one at a time, in order, after
a first message that says it is ready. Each message is a 4-byte big-endian
length, then a pickle: a request is (template
file, template version, context); an answer is (the RenderedEmail, the log
records the render wrote). The email is None when this process cannot render
that version (the file changed since the server parsed it, or it is not a
file at all) or rendering failed here: the server then renders in its own
process, and so reports the failure itself. Log records go back to the server
as (logger name, level, message), so they come out of its own log handlers.

The worker keeps its own parsed copy of each template file, by version, so a
request carries only data. It ends at end of input (the server closed the
pipe) or when the server goes away, not on SIGINT or SIGTERM: those reach the
whole process group (Ctrl+C, a group-wide stop), and the server must keep its
workers while it drains; it closes their input at the end (and kills a worker
that does not stop).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import sys
from pathlib import Path
from typing import IO, Any, Final

from ._errors import TemplateError
from ._pool import LENGTH_BYTES
from ._template import Dialect, RenderedEmail, Template, load_template

log = logging.getLogger(__name__)

#: Parsed versions kept per process; an edited template leaves its old version behind.
MAX_TEMPLATES: Final = 64


class TemplateRenderer:
    """Templates by (file, version), parsed on first use."""

    def __init__(self) -> None:
        self._dialect = Dialect()
        self._templates: dict[tuple[str, str], Template] = {}
        #: Versions this process could not load, with the file's (mtime, size)
        #: then: not read and parsed again for every request while the file
        #: stays as it was.
        self._failed: dict[tuple[str, str], tuple[int, int] | None] = {}

    def render(self, path: str, version: str, context: dict[str, Any]) -> RenderedEmail | None:
        template = self._template(path, version)
        if template is None:
            return None
        return template.render(context)

    def _template(self, path: str, version: str) -> Template | None:
        key = (path, version)
        template = self._templates.get(key)
        if template is not None:
            return template
        if key in self._failed and self._failed[key] == _file_state(path):
            return None
        try:
            template = load_template(Path(path), dialect=self._dialect)
        except TemplateError:
            template = None
        if template is None or template.version != version:
            # unreadable, or changed since the server parsed it: the server renders its version
            if len(self._failed) >= MAX_TEMPLATES:
                self._failed.clear()
            self._failed[key] = _file_state(path)
            return None
        self._failed.pop(key, None)
        if len(self._templates) >= MAX_TEMPLATES:
            self._templates.clear()
        self._templates[key] = template
        return template


def _file_state(path: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


class _Collected(logging.Handler):
    """Keeps what this process logs, to send back with the answer."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
        self.records.append((record.name, record.levelno, message))


def serve(requests: IO[bytes], answers: IO[bytes]) -> None:
    renderer = TemplateRenderer()
    collected = _Collected()
    root = logging.getLogger()
    root.addHandler(collected)
    root.setLevel(logging.INFO)
    _send(answers, b"ready")  # imports done: the first message
    while True:
        header = requests.read(LENGTH_BYTES)
        if len(header) < LENGTH_BYTES:
            return
        size = int.from_bytes(header, "big")
        body = requests.read(size)
        if len(body) < size:
            return
        try:
            path, version, context = pickle.loads(body)  # noqa: S301 (our own server's pipe)
            email = renderer.render(path, version, context)
        except Exception:
            # A request that does not unpickle, or a render that fails: the
            # server renders it itself and reports the failure, so it is not
            # logged here too, nor is what this attempt logged on the way.
            email = None
            collected.records = []
        _send(answers, pickle.dumps((email, collected.records), protocol=pickle.HIGHEST_PROTOCOL))
        collected.records = []


def _send(answers: IO[bytes], message: bytes) -> None:
    answers.write(len(message).to_bytes(LENGTH_BYTES, "big") + message)
    answers.flush()


def main() -> None:
    # Only end of input ends a worker (see the module's docstring).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The answers go out on a copy of fd 1; fd 1 itself becomes stderr, so
    # that whatever else writes to it (print, a C extension's printf) cannot
    # corrupt the answers' framing.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    with contextlib.suppress(BrokenPipeError):
        serve(sys.stdin.buffer, answers)


if __name__ == "__main__":
    main()
