"""Structured logs: the stdlib's logging, one JSON object a line.

- ``configure_logging`` (called by ``sendtime serve``) puts a queue between the
  loggers and stderr: the event loop only hands records over, and a thread
  formats and writes them, so a slow terminal or pipe never stalls requests.
  JSON lines unless stderr is a terminal (then readable lines), or as the
  logging.format setting says.
- ``JsonFormatter`` is our own, not python-json-logger: forty lines on msgspec
  (already a dependency, and several times faster than the json module), and
  in one place the rule that a field named like a secret is never written.
- ``AccessLog`` writes the line per gRPC call and HTTP request (logger
  ``sendtime.access``); ``DeliveryLog`` the line per delivery attempt
  (``sendtime.delivery``). Each carries a request id: the caller's
  x-request-id, else one made here. User ids are hashed unless
  logging.hash_user_ids is off. No line holds a header, a body or a key.
"""

from __future__ import annotations

import contextvars
import hashlib
import itertools
import logging
import logging.handlers
import os
import queue
import re
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final, TextIO

import msgspec
from opentelemetry import trace

from sendtime.server.settings import LoggingSettings

ACCESS_LOGGER: Final = "sendtime.access"
DELIVERY_LOGGER: Final = "sendtime.delivery"
REQUEST_ID_HEADER: Final = "x-request-id"
#: The request id of the call being served, for every line logged while it is.
request_id: Final[contextvars.ContextVar[str]] = contextvars.ContextVar("sendtime_request_id", default="")

#: What a LogRecord has of its own; anything else on it came in ``extra``.
_RECORD_FIELDS: Final = frozenset(
    {
        *logging.LogRecord("", 0, "", 0, "", None, None).__dict__,
        "message",
        "asctime",
        "taskName",
    }
)
_SECRET_NAMES: Final = re.compile(r"(?i)authorization|api_?key|password|secret|token|cookie|signature")
_REDACTED: Final = "[redacted]"
_MAX_REQUEST_ID: Final = 128


def hash_user_id(user_id: str) -> str:
    """The first 16 hex digits of the id's SHA-256: the same user, the same
    value, in every line, without the id itself."""
    return hashlib.sha256(user_id.encode()).hexdigest()[:16]


class UserIds:
    """How user ids appear in logs."""

    def __init__(self, *, hashed: bool) -> None:
        self.hashed = hashed

    def __call__(self, user_id: str) -> str:
        if not user_id:
            return ""
        return hash_user_id(user_id) if self.hashed else user_id


class RequestIds:
    """Unique enough request ids, cheaply: a random prefix per process and a
    counter (a random id each costs about 1 us here; this costs 0.2)."""

    def __init__(self) -> None:
        self._prefix = os.urandom(4).hex()
        self._next = itertools.count(1)

    def new(self) -> str:
        return f"{self._prefix}{next(self._next):08x}"

    def take(self, given: str | None) -> str:
        """The caller's id if it sent a usable one, else a new one."""
        if given and len(given) <= _MAX_REQUEST_ID and given.isprintable():
            return given
        return self.new()


class AccessLog:
    def __init__(self, users: UserIds, logger: logging.Logger | None = None) -> None:
        self._users = users
        self.logger = logger or logging.getLogger(ACCESS_LOGGER)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def request(
        self,
        *,
        transport: str,
        method: str,
        route: str,
        outcome: str,
        seconds: float,
        request_id: str,
        user_id: str = "",
        peer: str = "",
    ) -> None:
        """``method``: the RPC or the HTTP verb; ``route``: the HTTP route's
        pattern (never the path: it may hold a user id); ``outcome``: the gRPC
        status name or the HTTP status."""
        duration_ms = round(seconds * 1000, 3)
        name = f"{method} {route}" if route else method
        fields: dict[str, Any] = {
            "request_id": request_id,
            "transport": transport,
            "method": method,
            "outcome": outcome,
            "duration_ms": duration_ms,
        }
        if route:
            fields["route"] = route
        if user_id:
            fields["user"] = self._users(user_id)
        if peer:
            fields["peer"] = peer
        self.logger.info("%s %s %s %.1f ms", transport, name, outcome, duration_ms, extra=fields)


_EMAIL: Final = re.compile(r"[^\s<>\"'@]+@[^\s<>\"'@]+")


class DeliveryLog:
    def __init__(self, users: UserIds, logger: logging.Logger | None = None) -> None:
        self._users = users
        self.logger = logger or logging.getLogger(DELIVERY_LOGGER)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def attempt(self, fields: dict[str, Any], user_id: str, detail: str) -> None:
        """One line per delivery attempt. ``detail`` (an ESP's or renderer's
        words) loses any email address; the email itself is never logged."""
        if user_id:
            fields["user"] = self._users(user_id)
        if detail:
            fields["detail"] = _EMAIL.sub("[email]", detail)[:300]
        level = logging.WARNING if fields.get("outcome") == "failed" else logging.INFO
        self.logger.log(
            level,
            "send %s %s%s",
            fields.get("send_id"),
            fields.get("outcome"),
            f" ({fields['reason']})" if fields.get("reason") else "",
            extra=fields,
        )


# -- formatting ------------------------------------------------------------------


def _extra(record: logging.LogRecord) -> dict[str, Any]:
    fields = {}
    for key, value in record.__dict__.items():
        if key in _RECORD_FIELDS or key.startswith("_"):
            continue
        fields[key] = _REDACTED if _SECRET_NAMES.search(key) else value
    return fields


def _timestamp(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, the record's
    ``extra`` fields (a field named like a secret is written as
    "[redacted]"), and exc for a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(_extra(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return _json.encode(line).decode()


def _encode_default(value: object) -> str:
    return str(value)


_json = msgspec.json.Encoder(enc_hook=_encode_default)


class TextFormatter(logging.Formatter):
    """For a person at a terminal: time, level, logger, message, then the extra fields as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        local = time.localtime(record.created)
        return time.strftime("%H:%M:%S", local) + f".{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = _extra(record)
        if extra:
            head, sep, tail = text.partition("\n")  # keep a traceback below the fields
            fields = " ".join(f"{key}={value}" for key, value in extra.items())
            text = f"{head}  {fields}{sep}{tail}"
        return text


class _StampContext(logging.Filter):
    """Runs in the thread that logs: the request id and the trace the record
    belongs to, before the record crosses to the writer thread."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "request_id" not in record.__dict__:
            current = request_id.get()
            if current:
                record.request_id = current
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            record.trace_id = format(span.trace_id, "032x")
            record.span_id = format(span.span_id, "016x")
        return True


class _HandOver(logging.handlers.QueueHandler):
    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # The message is made here (its arguments may change later); the
        # rest, the JSON and any traceback, is formatted in the writer thread.
        record.msg = record.getMessage()
        record.args = None
        return record


def formatter_for(settings: LoggingSettings, stream: TextIO) -> logging.Formatter:
    if settings.format == "json" or (settings.format == "auto" and not _is_terminal(stream)):
        return JsonFormatter()
    return TextFormatter()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def configure_logging(
    level: str, settings: LoggingSettings, stream: TextIO | None = None
) -> Callable[[], None]:
    """Route the root logger through a queue to ``stream`` (stderr). Returns
    the function that flushes and stops the writer thread."""
    stream = stream if stream is not None else sys.stderr
    writer = logging.StreamHandler(stream)
    writer.setFormatter(formatter_for(settings, stream))
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    handler = _HandOver(records)
    handler.addFilter(_StampContext())
    listener = logging.handlers.QueueListener(records, writer, respect_handler_level=False)
    root = logging.getLogger()
    replaced = list(root.handlers)
    previous_level = root.level
    for old in replaced:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    listener.start()

    def stop() -> None:
        root.removeHandler(handler)
        listener.stop()
        for old in replaced:
            root.addHandler(old)
        root.setLevel(previous_level)

    return stop
