"""The observe package's pieces on their own: the loop-only instruments as
Prometheus reads them, the JSON and text formatters, request and user ids."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import sys

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from sendtime.server.observe import CATALOGUE, Kind, Metrics
from sendtime.server.observe._instruments import CounterFamily, Histogram, HistogramFamily
from sendtime.server.observe.logs import (
    DeliveryLog,
    JsonFormatter,
    RequestIds,
    TextFormatter,
    UserIds,
    configure_logging,
    hash_user_id,
    request_id,
)
from sendtime.server.settings import LoggingSettings


class _Fixed(Collector):
    def __init__(self, *families: CounterFamily | HistogramFamily) -> None:
        self._families = families

    def collect(self):  # type: ignore[no-untyped-def]
        return [family.family() for family in self._families]


def _exposed(*families: CounterFamily | HistogramFamily) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(*families))
    return generate_latest(registry).decode()


def test_histogram_buckets_are_less_or_equal() -> None:
    histogram = Histogram((0.005, 0.01, 1.0))
    for value in (0.001, 0.005, 0.0051, 0.01, 2.0, 100.0):
        histogram.observe(value)
    assert histogram.counts == [2, 2, 0, 2]
    assert histogram.cumulative() == [2, 4, 4, 6]
    assert histogram.sum == pytest.approx(102.0211)


def test_families_read_back_as_prometheus_wrote_them() -> None:
    requests = CounterFamily("t_requests_total", "Requests.", ("route", "status"))
    requests.labels("/a", "200").inc()
    requests.labels("/a", "200").inc(2)
    requests.labels("/a", "500").inc()
    latency = HistogramFamily("t_latency_seconds", "Latency.", ("route",), (0.1, 1.0))
    latency.labels("/a").observe(0.05)
    latency.labels("/a").observe(0.5)
    text = _exposed(requests, latency)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples
    }
    assert samples[("t_requests_total", (("route", "/a"), ("status", "200")))] == 3
    assert samples[("t_requests_total", (("route", "/a"), ("status", "500")))] == 1
    assert samples[("t_latency_seconds_bucket", (("le", "0.1"), ("route", "/a")))] == 1
    assert samples[("t_latency_seconds_bucket", (("le", "1.0"), ("route", "/a")))] == 2
    assert samples[("t_latency_seconds_bucket", (("le", "+Inf"), ("route", "/a")))] == 2
    assert samples[("t_latency_seconds_count", (("route", "/a"),))] == 2
    assert families["t_latency_seconds"].type == "histogram"


def test_counter_family_adds_counts_kept_elsewhere() -> None:
    cancelled = CounterFamily("t_cancelled_total", "Cancelled.", ("flow",))
    cancelled.labels("cart").inc()
    family = cancelled.family(extra={("cart",): 2.0, ("browse",): 1.0})
    assert {tuple(s.labels.values()): s.value for s in family.samples} == {("cart",): 3.0, ("browse",): 1.0}


def test_wrong_label_count_is_refused() -> None:
    family = CounterFamily("t_total", "T.", ("a", "b"))
    with pytest.raises(ValueError, match="takes labels"):
        family.labels("only-one")


def test_the_catalogue_builds_and_renders_without_a_server() -> None:
    metrics = Metrics("test")
    body, content_type = metrics.render(None)
    assert content_type.startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    instrumented = {
        i.name.removesuffix("_total") if i.kind is Kind.COUNTER else i.name
        for i in CATALOGUE
        if not i.name.startswith(("sendtime_cache_", "sendtime_upstream_circuit", "sendtime_store_"))
        and i.kind is not Kind.GAUGE
    }
    assert instrumented <= names
    assert len({i.name for i in CATALOGUE}) == len(CATALOGUE)


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("sendtime.test", logging.WARNING, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_json_lines_carry_extra_fields_and_redact_secret_names() -> None:
    record = _record(
        "hello %s",
        "world",
        request_id="r-1",
        duration_ms=1.5,
        api_key="st_secret",
        authorization="Bearer x",
        password="p",
        where=object(),
    )
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "hello world"
    assert (line["level"], line["logger"]) == ("WARNING", "sendtime.test")
    assert (line["request_id"], line["duration_ms"]) == ("r-1", 1.5)
    assert line["api_key"] == line["authorization"] == line["password"] == "[redacted]"
    assert line["where"].startswith("<object")
    assert line["ts"].endswith("Z")


def test_json_lines_hold_the_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = json.loads(JsonFormatter().format(record))
    assert "ValueError: boom" in line["exc"]
    assert "\n" not in JsonFormatter().format(record)


def test_text_lines_for_people() -> None:
    text = TextFormatter().format(_record("send %s", 7, outcome="sent"))
    assert "WARNING" in text
    assert "sendtime.test: send 7" in text
    assert text.endswith("outcome=sent")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("setting", "stream", "is_json"),
    [
        ("auto", io.StringIO(), True),
        ("auto", _Terminal(), False),
        ("json", _Terminal(), True),
        ("text", io.StringIO(), False),
    ],
)
def test_configure_logging_picks_the_format(setting: str, stream: io.StringIO, is_json: bool) -> None:
    stop = configure_logging("INFO", LoggingSettings(format=setting), stream)
    token = request_id.set("req-5")
    try:
        logging.getLogger("sendtime.test").info("ready on %d", 8080, extra={"port": 8080})
    finally:
        request_id.reset(token)
        stop()
    (line,) = stream.getvalue().splitlines()
    if is_json:
        parsed = json.loads(line)
        assert (parsed["msg"], parsed["port"], parsed["request_id"]) == ("ready on 8080", 8080, "req-5")
    else:
        assert "ready on 8080" in line
        assert "request_id=req-5" in line


def test_configure_logging_gives_the_handlers_back() -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    stop = configure_logging("DEBUG", LoggingSettings(), io.StringIO())
    assert root.handlers != before
    stop()
    assert root.handlers == before


def test_request_ids() -> None:
    ids = RequestIds()
    first, second = ids.new(), ids.new()
    assert first != second
    assert len(first) == 16
    assert ids.take("from-caller") == "from-caller"
    assert ids.take("x" * 129) != "x" * 129
    assert ids.take("bad\nid") != "bad\nid"
    assert ids.take("") != ""
    assert ids.take(None)


def test_user_ids_hashed_or_not() -> None:
    assert hash_user_id("ada") == hashlib.sha256(b"ada").hexdigest()[:16]
    assert UserIds(hashed=True)("ada") == hash_user_id("ada") != "ada"
    assert UserIds(hashed=False)("ada") == "ada"
    assert UserIds(hashed=True)("") == ""


def test_delivery_lines_lose_email_addresses(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sendtime.delivery")
    DeliveryLog(UserIds(hashed=True)).attempt(
        {"send_id": 3, "outcome": "failed", "reason": "refused"},
        "ada",
        "550 5.1.1 <ada@example.com>: recipient address rejected",
    )
    (record,) = caplog.records
    line = JsonFormatter().format(record)
    assert "ada@example.com" not in line
    assert "[email]" in line
    assert record.levelno == logging.WARNING
    assert json.loads(line)["user"] == hash_user_id("ada")
