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
pipe) or when the server goes away.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
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

    def render(self, path: str, version: str, context: dict[str, Any]) -> RenderedEmail | None:
        template = self._template(path, version)
        if template is None:
            return None
        return template.render(context)

    def _template(self, path: str, version: str) -> Template | None:
        template = self._templates.get((path, version))
        if template is not None:
            return template
        try:
            template = load_template(Path(path), dialect=self._dialect)
        except TemplateError:
            return None
        if template.version != version:
            return None  # the file changed after the server parsed it: the server renders its version
        if len(self._templates) >= MAX_TEMPLATES:
            self._templates.clear()
        self._templates[(path, version)] = template
        return template


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
        path, version, context = pickle.loads(requests.read(size))  # noqa: S301 (our own server's pipe)
        try:
            email = renderer.render(path, version, context)
        except Exception:  # the server renders it again and reports the error itself
            log.exception("render worker: %s failed; the server renders it instead", path)
            email = None
        _send(answers, pickle.dumps((email, collected.records), protocol=pickle.HIGHEST_PROTOCOL))
        collected.records = []


def _send(answers: IO[bytes], message: bytes) -> None:
    answers.write(len(message).to_bytes(LENGTH_BYTES, "big") + message)
    answers.flush()


def main() -> None:
    # stdout is the answer channel: nothing else may write to it
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout = sys.stderr
    with contextlib.suppress(BrokenPipeError, KeyboardInterrupt):
        serve(sys.stdin.buffer, answers)


if __name__ == "__main__":
    main()
