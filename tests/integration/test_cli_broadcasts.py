"""``sendtime segment`` and ``sendtime broadcast`` run as processes against a
real server relaying to an outbox folder, and the status page's running
broadcasts with their progress bar."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from sendtime.server.app import Sendtime
from tests.conftest import SettingsFactory
from tests.integration.server_process import Result, run_sendtime
from tests.integration.test_cli_delivery import outbox_config

pytestmark = pytest.mark.slow


@pytest.fixture
async def server(make_settings: SettingsFactory, tmp_path: Path) -> AsyncIterator[Sendtime]:
    async with Sendtime(make_settings(outbox_config(tmp_path / "outbox"))) as app:
        yield app


async def cli(server: Sendtime, *args: str) -> Result:
    return await run_sendtime(*args, env={"SENDTIME_TARGET": f"127.0.0.1:{server.grpc_port}"}, timeout=60)


async def test_segments_and_a_broadcast_from_the_command_line(server: Sendtime, tmp_path: Path) -> None:
    for user, locale, zone in (
        ("lena", "de-DE", "Europe/Berlin"),
        ("max", "de-DE", ""),
        ("kenji", "ja-JP", "Asia/Tokyo"),
    ):
        made = await cli(
            server,
            "identify",
            "--user",
            user,
            "--email",
            f"{user}@example.com",
            "--locale",
            locale,
            *(["--timezone", zone] if zone else []),
            "--consent",
            "marketing=true",
        )
        assert made.code == 0, made.stderr
    created = await cli(server, "segment", "create", "germany", 'traits.locale == "de-DE"', "--json")
    assert created.json()["segment"] == {
        "name": "germany",
        "expression": 'traits.locale == "de-DE"',
        "description": "",
        "source": "api",
    }
    counted = await cli(server, "segment", "count", "germany")
    assert counted.stdout.startswith("2 of 3 profiles are in segment germany"), counted.stdout
    by_expression = await cli(server, "segment", "count", 'traits.locale == "ja-JP"', "--json")
    assert by_expression.json()["count"] == 1
    sample = await cli(server, "segment", "sample", "germany", "--limit", "10", "--json")
    assert sorted(m["user_id"] for m in sample.json()["members"]) == ["lena", "max"]
    bad = await cli(server, "segment", "count", "contry == 'DE'")
    assert bad.code == 1
    assert "unknown name 'contry' at column 1" in bad.stderr

    local = await cli(
        server,
        "broadcast",
        "create",
        "post_purchase",
        "--segment",
        "germany",
        "--key",
        "evening",
        "--local-time",
        "2030-12-05T19:00",
        "--fallback-zone",
        "Europe/Berlin",
        "--json",
    )
    assert local.code == 0, local.stderr
    evening = local.json()["broadcast"]
    assert (evening["state"], evening["local_time"]) == ("scheduled", "2030-12-05T19:00:00")
    again = await cli(
        server, "broadcast", "create", "abandoned_cart", "--segment", "germany", "--key", "evening", "--json"
    )
    assert again.json()["broadcast"]["id"] == evening["id"]
    assert again.json()["broadcast"]["template_id"] == "post_purchase"  # the first one

    now = await cli(
        server, "broadcast", "create", "post_purchase", "--segment", "germany", "--key", "now", "--json"
    )
    broadcast_id = now.json()["broadcast"]["id"]
    watched = await cli(server, "broadcast", "show", broadcast_id, "--watch")
    assert watched.code == 0, watched.stderr
    last = watched.stdout.split("\n\n")[-1]
    assert f"broadcast {broadcast_id} (now): done" in last
    assert "[##############################] 100%  2 of 2 done" in last
    assert "sent 2," in last
    assert len(list((tmp_path / "outbox").glob("*.eml"))) == 2

    listed = await cli(server, "broadcast", "list", "--active", "--json")
    assert [b["id"] for b in listed.json()["broadcasts"]] == [evening["id"]]
    cancelled = await cli(server, "broadcast", "cancel", evening["id"])
    assert f"broadcast {evening['id']} (evening): cancelled" in cancelled.stdout
    resumed = await cli(server, "broadcast", "resume", evening["id"])
    assert resumed.code == 1
    assert "cannot be resumed" in resumed.stderr


async def test_the_status_page_shows_running_broadcasts_with_a_progress_bar(server: Sendtime) -> None:
    for user in ("ada", "bob"):
        await cli(
            server,
            "identify",
            "--user",
            user,
            "--email",
            f"{user}@example.com",
            "--consent",
            "marketing=true",
        )
    made = await cli(
        server,
        "broadcast",
        "create",
        "post_purchase",
        "--expression",
        "has(traits.email)",
        "--key",
        "slow",
        "--rate",
        "0.001",
        "--json",  # one now, the next in 1,000 s
    )
    broadcast_id = made.json()["broadcast"]["id"]
    shown = await cli(server, "broadcast", "show", broadcast_id, "--json")
    for _ in range(500):
        if shown.json()["broadcast"]["progress"]["sent"] == 1:
            break
        shown = await cli(server, "broadcast", "show", broadcast_id, "--json")
    assert shown.json()["broadcast"]["progress"]["sent"] == 1
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"http://127.0.0.1:{server.http_port}/", headers={"Authorization": "Bearer dev-key"}
        ) as page,
    ):
        text = await page.text()
    assert "<table id=broadcasts>" in text
    assert f"<small>{broadcast_id}</small>" in text
    assert "<progress value=1 max=2></progress> 1 of 2" in text
    assert "broadcast:" not in text.split("<table id=flows>")[1].split("</table>")[0]
