"""The ``sendtime`` client commands, run as a subprocess against a real
sendtime on the test's event loop (so the test awaits the process)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from sendtime.server.app import Sendtime
from tests.integration.server_process import Result, run_sendtime

# slow: each command runs the CLI as a process of its own (make test-fast leaves them out)
pytestmark = pytest.mark.slow


RunCli = Callable[..., Awaitable[Result]]


@pytest.fixture
def cli(server: Sendtime) -> RunCli:
    target = {"SENDTIME_TARGET": f"127.0.0.1:{server.grpc_port}"}  # the API key defaults to dev-key

    async def run(*args: str, stdin: str | None = None) -> Result:
        return await run_sendtime(*args, env=target, stdin=stdin, timeout=60)

    return run


async def test_track_identify_and_profile_as_json(cli: RunCli) -> None:
    added = await cli(
        "track",
        "Product Added",
        "--user",
        "u1",
        "--properties",
        '{"product_id": "p1", "cart_id": "c1", "name": "Socks", "price": 9.5, "quantity": 2}',
        "--message-id",
        "add-1",
        "--json",
    )
    assert (added.code, added.json()) == (0, {"message_id": "add-1", "outcome": "accepted"}), added.stderr

    identified = await cli(
        "identify",
        "--user",
        "u1",
        "--email",
        "ada@example.com",
        "--first-name",
        "Ada",
        "--locale",
        "en-GB",
        "--timezone",
        "Europe/London",
        "--consent",
        "marketing=true",
        "--consent",
        "sms=false",
        "--trait",
        "plan=pro",
        "--trait",
        "seats=3",
        "--json",
    )
    assert identified.code == 0, identified.stderr
    assert identified.json()["outcome"] == "accepted"

    shown = await cli("profile", "u1", "--json")
    assert shown.code == 0, shown.stderr
    profile = shown.json()
    assert profile["user_id"] == "u1"
    assert profile["traits"] == {
        "email": "ada@example.com",
        "first_name": "Ada",
        "locale": "en-GB",
        "timezone": "Europe/London",
        "consent": {"marketing": "CONSENT_STATE_OPTED_IN", "sms": "CONSENT_STATE_OPTED_OUT"},
    }
    assert profile["extra_traits"] == {"plan": "pro", "seats": 3}
    assert profile["event_count"] == 2
    (cart,) = profile["carts"]
    assert cart["lines"][0] | {"product_id": "p1", "quantity": 2, "price": 9.5} == cart["lines"][0]


async def test_readable_output(cli: RunCli) -> None:
    first = await cli("track", "Signed Up", "--user", "u2", "--message-id", "s-1")
    assert (first.code, first.stdout.strip()) == (0, "accepted: message id s-1")
    again = await cli("track", "Signed Up", "--user", "u2", "--message-id", "s-1")
    assert again.code == 0
    assert again.stdout.startswith("duplicate: message id s-1")
    await cli("identify", "--user", "u2", "--email", "bo@example.com", "--consent", "news=no")
    shown = await cli("profile", "u2")
    assert shown.code == 0, shown.stderr
    assert shown.stdout.splitlines()[0] == "user u2"
    assert "email: bo@example.com" in shown.stdout
    assert "consent: news opted out" in shown.stdout


async def test_a_whole_event_from_json_and_properties_from_a_file(cli: RunCli, tmp_path: Path) -> None:
    event = {
        "userId": "u3",
        "event": "Product Viewed",
        "properties": {"product_id": "p7"},
        "messageId": "view-7",
        "timestamp": "2024-05-01T10:00:00Z",
    }
    whole = await cli("track", "--event", json.dumps(event), "--json")
    assert (whole.code, whole.json()) == (0, {"message_id": "view-7", "outcome": "accepted"}), whole.stderr

    properties = tmp_path / "props.json"
    properties.write_text(json.dumps({"product_id": "p8"}))
    from_file = await cli("track", "Product Viewed", "--user", "u3", "--json-file", str(properties))
    assert from_file.code == 0, from_file.stderr
    from_stdin = await cli(
        "track", "Product Viewed", "--user", "u3", "--json-file", "-", stdin='{"product_id": "p9"}'
    )
    assert from_stdin.code == 0, from_stdin.stderr

    profile = (await cli("profile", "u3", "--json")).json()
    assert [v["product_id"] for v in profile["recently_viewed"]] == ["p9", "p8", "p7"]
    assert profile["recently_viewed"][2]["view_time"] == "2024-05-01T10:00:00Z"


async def test_an_anonymous_profile(cli: RunCli) -> None:
    await cli("track", "Product Viewed", "--anonymous-id", "anon-9", "--properties", '{"product_id": "p1"}')
    shown = await cli("profile", "--anonymous-id", "anon-9", "--json")
    assert shown.code == 0, shown.stderr
    assert shown.json()["anonymous_id"] == "anon-9"


async def test_a_profile_shows_the_ids_linked_to_it(cli: RunCli) -> None:
    await cli("track", "Product Viewed", "--anonymous-id", "anon-7", "--properties", '{"product_id": "p1"}')
    linked = await cli("identify", "--user", "u7", "--anonymous-id", "anon-7", "--email", "u7@example.com")
    assert linked.code == 0, linked.stderr
    as_json = (await cli("profile", "u7", "--json")).json()
    assert as_json["linked_anonymous_ids"] == ["anon-7"]
    assert [v["product_id"] for v in as_json["recently_viewed"]] == ["p1"]
    shown = await cli("profile", "--anonymous-id", "anon-7")
    assert shown.code == 0, shown.stderr
    assert "  linked: user u7" in shown.stdout
    assert "u7@example.com" in shown.stdout


async def test_a_rejected_event_names_the_field_and_fails(cli: RunCli) -> None:
    rejected = await cli("track", "Product Added", "--user", "u1", "--properties", '{"price": -1}')
    assert rejected.code == 1
    assert rejected.stdout == ""
    assert "invalid argument" in rejected.stderr
    assert "event.track.properties_json.price" in rejected.stderr
    reason = "Expected `float` >= 0"
    assert rejected.stderr.count(reason) == 1, rejected.stderr  # said once, not again per field

    as_json = await cli("track", "Product Added", "--user", "u1", "--properties", '{"price": -1}', "--json")
    assert as_json.code == 1
    error = as_json.error()["error"]
    assert error["code"] == "INVALID_ARGUMENT"
    assert [v["field"] for v in error["field_violations"]] == ["event.track.properties_json.price"]


async def test_server_refusals_fail_with_a_clear_message(cli: RunCli, server: Sendtime) -> None:
    missing = await cli("profile", "nobody")
    assert missing.code == 1
    assert "not found" in missing.stderr
    assert "nobody" in missing.stderr

    stranger = await cli("profile", "u1", "--api-key", "wrong-key", "--json")
    assert stranger.code == 1
    assert stranger.error()["error"]["code"] == "UNAUTHENTICATED"
    assert "unknown API key" in stranger.stderr


async def test_bad_arguments_exit_2_naming_the_flag(cli: RunCli) -> None:
    bad_json = await cli("track", "Signed Up", "--user", "u1", "--properties", "{nope")
    assert bad_json.code == 2
    assert "--properties: not valid JSON" in bad_json.stderr
    not_object = await cli("track", "Signed Up", "--user", "u1", "--properties", "[1]")
    assert (not_object.code, "--properties: must be a JSON object" in not_object.stderr) == (2, True)
    no_name = await cli("track", "--user", "u1")
    assert (no_name.code, "NAME" in no_name.stderr) == (2, True)
    consent = await cli("identify", "--user", "u1", "--consent", "marketing=maybe")
    assert (consent.code, "--consent marketing" in consent.stderr) == (2, True)
    naive = await cli("track", "Signed Up", "--user", "u1", "--timestamp", "2024-01-01T00:00:00")
    assert (naive.code, "UTC offset" in naive.stderr) == (2, True)
    both = await cli("profile", "u1", "--anonymous-id", "a1")
    assert (both.code, "exactly one" in both.stderr) == (2, True)


async def test_serve_refuses_the_dev_key_on_an_edge_beyond_loopback(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SENDTIME_")}
    env["SENDTIME_GRPC__HOST"] = "0.0.0.0"  # noqa: S104  (refused before anything binds)
    env["SENDTIME_STORAGE__DATA_DIR"] = str(tmp_path / "data")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sendtime.server", "serve", env=env, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2
    assert "auth.dev_key is on while grpc.host = '0.0.0.0' listens beyond loopback" in err.decode()
    assert not (tmp_path / "data").exists()  # refused before it made anything
