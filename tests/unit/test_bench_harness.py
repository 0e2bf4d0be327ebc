"""The benchmarks' shared harness reads the figures right: the server's
Prometheus counters (a counter the server does not expose reads as absent, not
as 0) and the line wrk's scripts print. No timing is asserted: the benchmarks
themselves measure, these only parse."""

from __future__ import annotations

import json

import pytest

from benchmarks.content import Users, content_script
from benchmarks.harness import (
    WRK_DONE,
    checks_line,
    counter_delta,
    lua_string,
    parse_counters,
    parse_wrk,
    report,
)

METRICS = """\
# HELP sendtime_content_shed_total Content calls shed at admission.
# TYPE sendtime_content_shed_total counter
sendtime_content_shed_total{call="email",reason="overloaded"} 7.0
sendtime_content_shed_total{call="content",reason="overloaded"} 5.0
sendtime_content_late_answers_total_created 1.7e9
sendtime_content_blocks_total{source="fresh"} 11.0
"""


def test_counters_sum_their_labels_and_absent_ones_are_none() -> None:
    names = ("sendtime_content_shed_total", "sendtime_content_late_answers_total")
    counters = parse_counters(METRICS, names)
    assert counters == {"sendtime_content_shed_total": 12.0, "sendtime_content_late_answers_total": None}


def test_counter_delta_is_zero_for_a_counter_not_exposed() -> None:
    before = {"a": 3.0, "b": None}
    after = {"a": 10.0, "b": None}
    assert counter_delta(before, after, "a") == 7
    assert counter_delta(before, after, "b") == 0
    # a counter that appears during the run counts from zero
    assert counter_delta({"c": None}, {"c": 4.0}, "c") == 4


def test_wrk_result_line_parses_into_rates_and_errors() -> None:
    raw = {
        "requests": 1000,
        "duration_us": 2_000_000,
        "bytes": 50_000,
        "p50_us": 1500,
        "p90_us": 4000,
        "p99_us": 9000,
        "max_us": 12000,
        "mean_us": 2000.0,
        "connect_errors": 0,
        "read_errors": 0,
        "write_errors": 0,
        "status_errors": 100,
        "timeouts": 2,
        "late_pct": 0.5,
        "used": 1064,
        "wraps": 0,
        "statuses": {"200": 900, "429": 100},
    }
    result = parse_wrk("run", "http://127.0.0.1:1", 64, json.loads(json.dumps(raw)), None)
    # answers with an error status are not counted as served
    assert (result.ok, result.rps) == (900, 450.0)
    assert (result.p50_ms, result.p99_ms, result.max_ms) == (1.5, 9.0, 12.0)
    assert result.errors == {"status": 100, "timeout": 2}
    assert result.statuses == {"200": 900, "429": 100}
    assert result.mean_response_bytes == 50.0
    assert (result.used, result.wraps) == (1064, 0)


def test_first_touch_users_are_handed_out_once() -> None:
    users = Users(5000)
    assert users.take() == (0, 5000)
    users.took(300)
    first, left = users.take()
    assert (first, left, users.exhausted) == (300, 4700, False)
    script = content_script(first, left, "?blocks=cart")
    # the script starts where the last run stopped, over the users left, and
    # ends with the shared done() that reports how many it took
    assert "local first, count, n = 300, 4700, 0" in script
    assert script.endswith(WRK_DONE)
    # run out: the next run starts over, and says so
    users.took(4200)
    assert users.take() == (0, 5000)
    assert users.exhausted


def test_lua_strings_keep_quotes_and_non_ascii_as_they_are() -> None:
    assert lua_string('{"name": "Café"}') == '"{\\"name\\": \\"Café\\"}"'


def test_report_puts_the_json_object_last_on_stdout_and_the_summary_aside(
    capsys: pytest.CaptureFixture[str],
) -> None:
    result = {"correct": False, "checks": {"acked": True, "no duplicates": False}}

    def summary(got: dict[str, object]) -> str:
        return checks_line(got, "  checks")

    assert report(result, summary, as_json=True, passed=bool(result["correct"])) == 1
    out, err = capsys.readouterr()
    assert json.loads(out.splitlines()[-1]) == result
    assert err.splitlines() == ["  checks: FAILED", "    ok   acked", "    FAIL no duplicates"]
    assert report(result, summary, as_json=False) == 0
    assert capsys.readouterr().out.startswith("  checks: FAILED\n")
