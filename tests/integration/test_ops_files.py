"""The operations files in ops/ name only metrics sendtime exports: every
metric in the alert rules and the Grafana dashboard is in the catalogue and on
a real server's /metrics, and promtool accepts the rules file."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from sendtime.server.app import Sendtime
from sendtime.server.observe.metrics import BY_NAME, Kind
from tests.integration.observing import scrape

OPS = Path(__file__).parents[2] / "ops"
RULES = OPS / "prometheus" / "alerts.yml"
DASHBOARD = OPS / "grafana" / "sendtime.json"

# An identifier starting sendtime_ (label values and template variables never do)
_METRIC = re.compile(r"(?<![A-Za-z0-9_:])(sendtime_[A-Za-z0-9_:]*)")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def _rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [t["expr"] for p in _panels(dashboard["panels"]) for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            expressions.append(query["query"])
    return expressions


def _family(name: str) -> str:
    """The catalogued family a sample name belongs to (prometheus_client's
    conventions: counters are catalogued with their _total, histograms
    without their _bucket/_sum/_count)."""
    if name in BY_NAME:
        return name
    for suffix in _HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and base in BY_NAME and BY_NAME[base].kind is Kind.HISTOGRAM:
            return base
    raise AssertionError(f"{name} is not a metric sendtime exports (see observe.metrics.CATALOGUE)")


def _names(expressions: list[str]) -> set[str]:
    return {name for expression in expressions for name in _METRIC.findall(expression)}


def test_the_rules_cover_what_operators_watch() -> None:
    rules = _rules()
    assert len(rules) >= 5
    for rule in rules:
        assert rule["alert"].startswith("Sendtime"), rule
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]
        assert "for" in rule, rule["alert"]
    used = {_family(name) for name in _names([r["expr"] for r in _rules()])}
    for watched in (
        "sendtime_content_budget_used_ratio",
        "sendtime_grpc_request_duration_seconds",
        "sendtime_content_blocks_total",
        "sendtime_relay_attempts_total",
        "sendtime_send_latency_seconds",
        "sendtime_ingest_events_total",
    ):
        assert watched in used, watched


def test_the_dashboard_is_a_grafana_dashboard_over_a_prometheus_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in _panels(dashboard["panels"]) if p["type"] != "row"]
    ids = [p["id"] for p in _panels(dashboard["panels"])]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
    used = {_family(name) for name in _names(_dashboard_expressions())}
    # the families the issue asks a dashboard to show
    for shown in (
        "sendtime_grpc_requests_total",
        "sendtime_http_request_duration_seconds",
        "sendtime_content_blocks_total",
        "sendtime_cache_lookups_total",
        "sendtime_cache_size_bytes",
        "sendtime_upstream_request_duration_seconds",
        "sendtime_upstream_circuit_state",
        "sendtime_ingest_events_total",
        "sendtime_ingest_ack_lag_seconds",
        "sendtime_sends_scheduled_total",
        "sendtime_sends_sent_total",
        "sendtime_sends_cancelled_total",
        "sendtime_sends_skipped_total",
        "sendtime_sends_failed_total",
        "sendtime_send_latency_seconds",
    ):
        assert shown in used, shown


@pytest.mark.parametrize("source", ["rules", "dashboard"])
async def test_every_metric_named_is_on_a_real_servers_metrics(server: Sendtime, source: str) -> None:
    expressions = [r["expr"] for r in _rules()] if source == "rules" else _dashboard_expressions()
    names = _names(expressions)
    assert names
    # a few calls first, so that labelled children exist as well as families
    url = f"http://127.0.0.1:{server.http_port}"
    headers = {"Authorization": "Bearer dev-key"}
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{url}/v1/track", json={"userId": "u1", "event": "Viewed"}, headers=headers
        ) as response:
            assert response.status == 200, await response.text()
        async with http.get(f"{url}/v1/content/u1", headers=headers) as response:
            assert response.status == 200, await response.text()
    families = await scrape(server.http_port)
    # the parser names a counter's family without its _total
    exported: dict[str, str] = {family.name: family.type for family in families.values()}
    for name in sorted(names):
        family = _family(name)
        info = BY_NAME[family]
        exposed = family.removesuffix("_total") if info.kind is Kind.COUNTER else family
        assert exposed in exported, f"{name} ({source}) is catalogued but not on /metrics"
        assert exported[exposed] == info.kind.value, name
        if name.endswith(_HISTOGRAM_SUFFIXES) and name != family:
            assert info.kind is Kind.HISTOGRAM, name


@pytest.mark.slow
def test_promtool_accepts_the_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus): rules syntax not checked")
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
