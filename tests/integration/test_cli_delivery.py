"""Sends and the delivery ledger from the outside: the Python client's
send_email, get_delivery, list_deliveries and list_flows, and the ``sendtime
send | deliveries | flows`` commands run as subprocesses, against a real
sendtime on 127.0.0.1 that relays to an outbox folder of .eml files in
tmp_path (the shipped templates and demo catalog come from the repository
root, where the tests run)."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from email import message_from_bytes, policy
from pathlib import Path

import pytest

from sendtime.client import (
    AsyncClient,
    Client,
    Delivery,
    DeliveryStatus,
    FlowSummary,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    track_event,
)
from sendtime.server.app import Sendtime
from sendtime.server.settings import hash_key
from tests.conftest import SettingsFactory
from tests.integration.server_process import Result, run_sendtime

# slow: each command runs the CLI as a process of its own (make test-fast leaves them out)
pytestmark = pytest.mark.slow

#: A cart line of the demo catalog, so the abandoned-cart template has a cart to show.
CART_LINE = {"cart_id": "c1", "product_id": "kettle-steel", "name": "Kettle", "price": 70, "quantity": 1}
DEFAULT_FLOWS = {
    # id: (entry event, delay, exit events)
    "abandoned_cart": ("Product Added", dt.timedelta(minutes=30), ("Order Completed",)),
    "browse_abandonment": ("Product Viewed", dt.timedelta(hours=1), ("Product Added", "Order Completed")),
    "post_purchase": ("Order Completed", dt.timedelta(days=3), ("Order Refunded",)),
}


def outbox_config(outbox: Path, extra: str = "") -> str:
    """The default flows, relayed to ``outbox``; no frequency cap, so a test
    may send one user several emails."""
    return (
        "[delivery]\nfrequency_cap_count = 0\npoll_interval_ms = 100\n"
        f'{extra}[delivery.relay]\nkind = "outbox"\ndirectory = "{outbox}"\n'
    )


RunCli = Callable[..., Awaitable[Result]]


async def run_cli(*args: str, cwd: Path) -> Result:
    return await run_sendtime(*args, cwd=cwd)


def target(app: Sendtime) -> str:
    return f"127.0.0.1:{app.grpc_port}"


def cli_for(app: Sendtime, cwd: Path) -> RunCli:
    async def run(command: str, *args: str) -> Result:
        return await run_cli(command, *args, "--target", target(app), cwd=cwd)

    return run


@pytest.fixture
def outbox(tmp_path: Path) -> Path:
    return tmp_path / "outbox"


@pytest.fixture
async def app(make_settings: SettingsFactory, outbox: Path) -> AsyncIterator[Sendtime]:
    async with Sendtime(make_settings(outbox_config(outbox))) as app:
        yield app


@pytest.fixture
async def client(app: Sendtime) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(target(app), "dev-key") as client:
        yield client


@pytest.fixture
async def ada(client: AsyncClient) -> str:
    """A shopper with an email, marketing consent and an open cart (which
    also enters her into the abandoned-cart flow, due in 30 minutes)."""
    await client.identify("ada", email="ada@example.com", first_name="Ada", consent={"marketing": True})
    await client.track("Product Added", CART_LINE, user_id="ada")
    return "ada"


@pytest.fixture
def cli(app: Sendtime, tmp_path: Path) -> RunCli:
    work = tmp_path / "work"
    work.mkdir()
    return cli_for(app, work)


def emails(outbox: Path) -> list[Path]:
    return sorted(outbox.glob("*.eml")) if outbox.is_dir() else []


def recipients(outbox: Path) -> list[str]:
    return [
        str(message_from_bytes(path.read_bytes(), policy=policy.default)["To"]) for path in emails(outbox)
    ]


async def wait_final(client: AsyncClient, delivery_id: int, timeout: float = 10.0) -> Delivery:
    deadline = time.monotonic() + timeout
    delivery = await client.get_delivery(delivery_id)
    while not delivery.final:
        assert time.monotonic() < deadline, f"still {delivery.status}: {delivery}"
        await asyncio.sleep(0.02)
        delivery = await client.get_delivery(delivery_id)
    return delivery


# ------------------------------------------------------------------------ send


async def test_send_wait_ends_sent_and_the_email_is_in_the_outbox(
    cli: RunCli, ada: str, outbox: Path
) -> None:
    sent = await cli("send", "abandoned_cart", "--user", ada, "--idempotency-key", "k1", "--wait", "--json")
    assert sent.code == 0, sent.stderr
    result = sent.json()
    assert result["idempotency_key"] == "k1"
    assert result["generated_key"] is False
    assert sent.stderr == ""  # no key was made, so nothing to say about one
    delivery = result["delivery"]
    assert delivery["status"] == "sent"
    assert delivery["template_id"] == "abandoned_cart"
    assert (delivery["user_id"], delivery["flow_id"], delivery["relay"]) == ("ada", "", "outbox")
    assert delivery["esp_message_id"]
    assert delivery["template_version"]
    assert delivery["attempts"] == 1
    assert delivery["latency_ms"] > 0
    assert delivery["accept_time"].endswith("Z")
    assert recipients(outbox) == ["Ada <ada@example.com>"]
    assert "Gooseneck Kettle" in emails(outbox)[0].read_text()  # the live cart, rendered

    again = await cli("send", "abandoned_cart", "--user", ada, "--idempotency-key", "k1", "--wait", "--json")
    assert again.code == 0, again.stderr
    assert again.json()["delivery"]["id"] == delivery["id"]
    assert again.json()["delivery"]["status"] == "sent"
    await asyncio.sleep(0.5)  # several scheduler polls: nothing more goes out
    assert len(emails(outbox)) == 1

    readable = await cli("send", "abandoned_cart", "--user", ada, "--idempotency-key", "k1")
    assert readable.code == 0, readable.stderr
    assert readable.stdout.startswith(f"delivery {delivery['id']}: sent\n")
    assert "idempotency key: k1" in readable.stdout
    assert delivery["esp_message_id"] in readable.stdout


async def test_send_without_a_key_prints_one_that_is_safe_to_run_again(
    cli: RunCli, ada: str, outbox: Path
) -> None:
    first = await cli("send", "post_purchase", "--user", ada, "--transactional")
    assert first.code == 0, first.stderr
    match = re.search(r"idempotency key (\S+) \(made for this send; running again with", first.stderr)
    assert match, first.stderr
    key = match.group(1)
    assert f"--idempotency-key {key} is safe" in first.stderr
    assert f"idempotency key: {key} (made for this send" in first.stdout
    assert "scheduled now; add --wait" in first.stdout
    delivery_id = int(first.stdout.split(":")[0].removeprefix("delivery "))

    again = await cli(
        "send",
        "post_purchase",
        "--user",
        ada,
        "--transactional",
        "--idempotency-key",
        key,
        "--wait",
        "--json",
    )
    assert again.code == 0, again.stderr
    assert (again.json()["delivery"]["id"], again.json()["delivery"]["status"]) == (delivery_id, "sent")
    assert again.json()["delivery"]["entry_key"] == key
    await asyncio.sleep(0.5)
    assert recipients(outbox) == ["Ada <ada@example.com>"]

    fresh = await cli("send", "post_purchase", "--user", ada, "--transactional", "--json")
    assert fresh.code == 0, fresh.stderr
    assert fresh.json()["generated_key"] is True
    assert fresh.json()["idempotency_key"] != key
    assert fresh.json()["delivery"]["id"] != delivery_id
    assert fresh.json()["idempotency_key"] in fresh.stderr  # stdout stays one JSON object


async def test_send_wait_that_ends_unsent_shows_why_and_exits_1(
    cli: RunCli, client: AsyncClient, outbox: Path
) -> None:
    await client.identify("grace", first_name="Grace")  # no email address
    result = await cli("send", "post_purchase", "--user", "grace", "--transactional", "--key", "g1", "--wait")
    assert result.code == 1
    assert result.stdout.splitlines()[0].endswith(": skipped (the profile has no email address)")
    assert "not sent: skipped" in result.stdout
    assert emails(outbox) == []


async def test_send_wait_gives_up_after_wait_timeout_and_says_how_to_go_on(
    make_settings: SettingsFactory, outbox: Path, tmp_path: Path
) -> None:
    # quiet hours from an hour ago to an hour from now (UTC): a marketing send is held
    now = dt.datetime.now(dt.UTC)
    start, end = ((now + dt.timedelta(hours=h)).strftime("%H:%M") for h in (-1, 1))
    quiet = f'[delivery.quiet_hours]\nstart = "{start}"\nend = "{end}"\nmode = "hold"\n'
    async with (
        Sendtime(make_settings(outbox_config(outbox, quiet))) as app,
        AsyncClient(target(app), "dev-key") as client,
    ):
        await client.identify("ada", email="ada@example.com", consent={"marketing": True})
        cli = cli_for(app, tmp_path)
        result = await cli(
            "send", "post_purchase", "--user", "ada", "--key", "q1", "--wait", "--wait-timeout", "1"
        )
        held = await client.get_delivery(idempotency_key="q1")
    assert result.code == 1
    assert "is still scheduled (held for quiet hours until" in result.stderr
    assert "after 1 s; run again with --idempotency-key q1 --wait to keep waiting" in result.stderr
    assert held.status is DeliveryStatus.SCHEDULED
    assert held.due_time is not None
    assert held.due_time > now
    assert emails(outbox) == []


async def test_bad_arguments_exit_2_naming_the_flag(cli: RunCli) -> None:
    cases: list[tuple[tuple[str, ...], str]] = [
        (("send", "post_purchase"), "--user"),
        (("send", "post_purchase", "--user", "u1", "--anonymous-id", "a1"), "--user"),
        (("send", " ", "--user", "u1"), "TEMPLATE"),
        (("send", "post_purchase", "--user", "u1", "--transactional", "--group", "news"), "--group"),
        (("send", "post_purchase", "--user", "u1", "--idempotency-key", ""), "--idempotency-key"),
        (("send", "post_purchase", "--user", "u1", "--wait", "--wait-timeout", "0"), "--wait-timeout"),
        (("deliveries", "--limit", "0"), "--limit"),
        (("deliveries", "--all", "--limit", "3"), "--limit"),
        (("deliveries", "--page-size", "501"), "--page-size"),
        (("send",), "TEMPLATE"),
    ]
    results = await asyncio.gather(*(cli(*args) for args, _ in cases))
    for (args, flag), result in zip(cases, results, strict=True):
        assert result.code == 2, (args, result)
        assert flag in result.stderr, (args, result.stderr)
        assert result.stdout == ""


async def test_server_refusals_exit_1_with_the_reason(cli: RunCli, ada: str, outbox: Path) -> None:
    unknown = await cli("send", "no_such_template", "--user", ada, "--key", "x1")
    assert unknown.code == 1
    assert "not found: no template 'no_such_template'" in unknown.stderr
    as_json = await cli("send", "no_such_template", "--user", ada, "--key", "x1", "--json")
    assert as_json.code == 1
    assert as_json.error()["error"]["reason"] == "TEMPLATE_NOT_FOUND"

    too_long = await cli("send", "post_purchase", "--user", ada, "--key", "k" * 101)
    assert too_long.code == 1
    assert "idempotency_key: is longer than 100 characters" in too_long.stderr

    unreachable = await run_cli("flows", "--target", "127.0.0.1:1", "--timeout", "1", cwd=outbox.parent)
    assert unreachable.code == 1
    assert "cannot reach sendtime at 127.0.0.1:1" in unreachable.stderr
    assert emails(outbox) == []


async def test_a_key_without_the_send_scope_is_refused(
    make_settings: SettingsFactory, outbox: Path, tmp_path: Path
) -> None:
    config = outbox_config(outbox) + (
        f'[[auth.keys]]\nname = "reader"\nhash = "{hash_key("reader-key")}"\nscopes = ["ingest", "content"]\n'
    )
    async with Sendtime(make_settings(config)) as app:
        cli = cli_for(app, tmp_path)
        send = await cli("send", "post_purchase", "--user", "u1", "--key", "k1", "--api-key", "reader-key")
        flows = await cli("flows", "--api-key", "reader-key")
    assert (send.code, flows.code) == (1, 1)
    assert "permission denied" in send.stderr
    assert "send" in send.stderr
    assert "permission denied" in flows.stderr


# ------------------------------------------------------------------ deliveries


async def test_deliveries_lists_the_ledger_newest_first(cli: RunCli, client: AsyncClient, ada: str) -> None:
    ids = []
    for key in ("d1", "d2", "d3"):
        sent = await client.send_email("post_purchase", user_id=ada, idempotency_key=key, transactional=True)
        ids.append((await wait_final(client, sent.id)).id)
    newest_first = ids[::-1]

    listed = await cli("deliveries", "--user", ada, "--json")
    assert listed.code == 0, listed.stderr
    deliveries = listed.json()["deliveries"]
    # the three sends, then the abandoned-cart flow's scheduled send from the fixture
    assert [d["id"] for d in deliveries[:3]] == newest_first
    assert [d["entry_key"] for d in deliveries[:3]] == ["d3", "d2", "d1"]
    assert all(d["status"] == "sent" and d["relay"] == "outbox" for d in deliveries[:3])
    assert all(d["latency_ms"] > 0 and d["esp_message_id"] for d in deliveries[:3])
    flow_send = deliveries[3]
    assert (flow_send["flow_id"], flow_send["status"], flow_send["entry_key"]) == (
        "abandoned_cart",
        "scheduled",
        "c1",
    )
    assert flow_send["latency_ms"] is None
    assert flow_send["accept_time"] is None
    assert listed.json()["next_page_token"] == ""

    everything = await cli("deliveries", "--all", "--page-size", "1", "--json")
    assert everything.code == 0, everything.stderr
    assert [d["id"] for d in everything.json()["deliveries"]] == [d["id"] for d in deliveries]

    limited = await cli("deliveries", "--limit", "2", "--page-size", "1", "--json")
    assert [d["id"] for d in limited.json()["deliveries"]] == newest_first[:2]
    assert limited.json()["next_page_token"]

    by_flow = await cli("deliveries", "--flow", "abandoned_cart", "--json")
    assert [d["id"] for d in by_flow.json()["deliveries"]] == [flow_send["id"]]

    table = await cli("deliveries", "--user", ada)
    assert table.code == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == [
        "ID",
        "FLOW",
        "TEMPLATE",
        "USER",
        "STATUS",
        "WHEN",
        "(UTC)",
        "REASON",
        "ATTEMPTS",
        "RELAY",
        "ESP",
        "MESSAGE",
        "ID",
        "LATENCY",
        "MS",
    ]
    first = rows[0].split()
    # WHEN is "sent DATE TIME": three cells split on spaces
    assert first[:6] == [str(newest_first[0]), "(api)", "post_purchase", "ada", "sent", "sent"]
    assert first[8:11] == ["-", "1", "outbox"]
    assert float(first[12]) > 0
    assert rows[3].split()[:8] == [
        str(flow_send["id"]),
        "abandoned_cart",
        "abandoned_cart",
        "ada",
        "scheduled",
        "due",
        *flow_send["due_time"][:19].split("T"),
    ]
    assert rows[-1] == "4 deliveries for user ada, newest first"

    more = await cli("deliveries", "--limit", "1")
    assert more.stdout.splitlines()[-1] == "1 delivery, newest first; more are older (--limit N or --all)"
    nobody = await cli("deliveries", "--user", "nobody", "--flow", "post_purchase")
    assert (nobody.code, nobody.stdout) == (0, "no deliveries for user nobody and flow post_purchase\n")


# ----------------------------------------------------------------------- flows


async def test_flows_shows_the_default_flows_with_counts(cli: RunCli, ada: str) -> None:
    listed = await cli("flows", "--json")
    assert listed.code == 0, listed.stderr
    flows = {flow["id"]: flow for flow in listed.json()["flows"]}
    assert set(flows) == set(DEFAULT_FLOWS)
    for flow_id, (entry, delay, exits) in DEFAULT_FLOWS.items():
        flow = flows[flow_id]
        assert (flow["template_id"], flow["entry_event"]) == (flow_id, entry)
        assert flow["delay_s"] == delay.total_seconds()
        assert tuple(flow["exit_events"]) == exits
        assert (flow["subscription_group"], flow["transactional"]) == ("marketing", False)
    counts = ("scheduled", "sent", "cancelled", "skipped", "failed", "other")
    assert [flows["abandoned_cart"][c] for c in counts] == [1, 0, 0, 0, 0, 0]
    assert [flows["post_purchase"][c] for c in counts] == [0] * 6

    readable = await cli("flows")
    assert readable.code == 0, readable.stderr
    lines = readable.stdout.splitlines()
    at = lines.index("abandoned_cart: template abandoned_cart, consent group marketing")
    assert lines[at + 1] == '  enters on "Product Added", sends after 30 min, exits on "Order Completed"'
    assert lines[at + 2] == "  scheduled 1, sent 0, cancelled 0, skipped 0, failed 0"
    assert '  enters on "Order Completed", sends after 3 d, exits on "Order Refunded"' in lines
    assert "sends after 1 h" in readable.stdout


async def test_flows_counts_what_a_fast_flow_sent_and_cancelled(
    make_settings: SettingsFactory, outbox: Path, tmp_path: Path
) -> None:
    config = outbox_config(outbox) + (
        '[[flows]]\nid = "cart_nudge"\ntemplate = "abandoned_cart"\nentry_event = "Product Added"\n'
        'entry_key = "cart_id"\ndelay_s = 0.5\nexit_events = ["Order Completed"]\n'
        'require_blocks = ["cart"]\nsubscription_group = ""\n'
    )
    async with (
        Sendtime(make_settings(config)) as app,
        AsyncClient(target(app), "dev-key") as client,
    ):
        await client.identify("ada", email="ada@example.com", consent={"marketing": True})
        await client.track("Product Added", CART_LINE, user_id="ada")
        # a second cart bought at once: its send is cancelled before the delay ends
        await client.ingest(
            [
                track_event("Product Added", {**CART_LINE, "cart_id": "c2"}, user_id="ada"),
                track_event(
                    "Order Completed", {"order_id": "o2", "cart_id": "c2", "total": 70}, user_id="ada"
                ),
            ]
        )
        page = await client.list_deliveries(flow_id="cart_nudge")
        for delivery in page.deliveries:
            await wait_final(client, delivery.id)
        result = await cli_for(app, tmp_path)("flows")
        summaries = await client.list_flows()
    assert result.code == 0, result.stderr
    assert result.stdout.splitlines() == [
        "cart_nudge: template abandoned_cart, transactional",
        '  enters on "Product Added", sends after 0.5 s, exits on "Order Completed"',
        "  scheduled 0, sent 1, cancelled 1, skipped 0, failed 0",
    ]
    (summary,) = summaries
    assert summary.transactional
    assert (summary.sent, summary.cancelled, summary.delay) == (1, 1, dt.timedelta(milliseconds=500))
    assert len(emails(outbox)) == 1


# ---------------------------------------------------------------- the client


async def test_client_send_get_and_list(client: AsyncClient, ada: str) -> None:
    before = dt.datetime.now(dt.UTC)
    scheduled = await client.send_email("abandoned_cart", user_id=ada, idempotency_key="c-1")
    assert isinstance(scheduled, Delivery)
    assert scheduled.status is DeliveryStatus.SCHEDULED
    assert not scheduled.final
    assert (scheduled.template_id, scheduled.user_id, scheduled.entry_key) == ("abandoned_cart", ada, "c-1")
    assert scheduled.accept_time is None
    assert scheduled.latency is None
    assert scheduled.create_time is not None
    assert scheduled.create_time.tzinfo is not None
    assert scheduled.create_time >= before - dt.timedelta(seconds=5)

    sent = await wait_final(client, scheduled.id)
    assert sent.status is DeliveryStatus.SENT
    assert f"{sent.status}" == "sent"  # a str enum
    assert sent.final
    assert sent.latency is not None
    assert dt.timedelta(0) < sent.latency < dt.timedelta(seconds=10)
    assert sent.accept_time is not None
    assert sent.create_time is not None
    assert sent.accept_time >= sent.create_time
    assert (sent.relay, sent.attempts) == ("outbox", 1)
    assert sent.esp_message_id

    assert (await client.get_delivery(idempotency_key="c-1")).id == sent.id
    assert (await client.get_delivery(idempotency_key=sent.idempotency_key)).id == sent.id
    repeat = await client.send_email("abandoned_cart", user_id=ada, idempotency_key="c-1")
    assert (repeat.id, repeat.status) == (sent.id, DeliveryStatus.SENT)

    second = await client.send_email("post_purchase", user_id=ada, idempotency_key="c-2", transactional=True)
    seen: list[int] = []
    token = None
    while True:
        page = await client.list_deliveries(user_id=ada, page_size=1, page_token=token)
        assert len(page.deliveries) <= 1
        seen.extend(d.id for d in page.deliveries)
        if not page.next_page_token:
            break
        token = page.next_page_token
    assert seen[:2] == [second.id, sent.id]  # newest first
    assert seen == sorted(seen, reverse=True)
    assert len(seen) == 3  # and the flow's scheduled send
    whole = await client.list_deliveries(user_id=ada)
    assert [d.id for d in whole.deliveries] == seen
    assert whole.next_page_token == ""

    flows = await client.list_flows()
    assert all(isinstance(flow, FlowSummary) for flow in flows)
    cart = next(flow for flow in flows if flow.id == "abandoned_cart")
    assert cart.delay == dt.timedelta(minutes=30)
    assert cart.exit_events == ("Order Completed",)
    assert (cart.scheduled, cart.transactional) == (1, False)


async def test_client_errors_name_the_field(client: AsyncClient) -> None:
    with pytest.raises(NotFound):
        await client.get_delivery(987654)
    with pytest.raises(NotFound):
        await client.get_delivery(idempotency_key="never-used")
    with pytest.raises(InvalidArgument) as missing:
        await client.get_delivery()
    assert [v.field for v in missing.value.field_violations] == ["id"]
    with pytest.raises(InvalidArgument) as no_key:
        await client.send_email("post_purchase", user_id="u1", idempotency_key="")
    assert [v.field for v in no_key.value.field_violations] == ["idempotency_key"]
    with pytest.raises(InvalidArgument) as no_user:
        await client.send_email("post_purchase", idempotency_key="k")
    assert [v.field for v in no_user.value.field_violations] == ["user_id"]
    with pytest.raises(NotFound) as template:
        await client.send_email("nope", user_id="u1", idempotency_key="k")
    assert template.value.reason == "TEMPLATE_NOT_FOUND"
    with pytest.raises(InvalidArgument) as token:
        await client.list_deliveries(page_token="garbage")
    assert [v.field for v in token.value.field_violations] == ["page_token"]


async def test_the_sync_client_has_the_same_calls(app: Sendtime, ada: str) -> None:
    def use() -> tuple[Delivery, Delivery, list[FlowSummary], list[int]]:
        with Client(target(app), "dev-key") as client:
            first = client.send_email("post_purchase", user_id=ada, idempotency_key="s-1", transactional=True)
            deadline = time.monotonic() + 10
            delivery = client.get_delivery(first.id)
            while not delivery.final and time.monotonic() < deadline:
                time.sleep(0.02)
                delivery = client.get_delivery(idempotency_key="s-1")
            page = client.list_deliveries(user_id=ada, page_size=10)
            return first, delivery, client.list_flows(), [d.id for d in page.deliveries]

    first, final, flows, listed = await asyncio.to_thread(use)
    assert first.status is DeliveryStatus.SCHEDULED
    assert (final.id, final.status) == (first.id, DeliveryStatus.SENT)
    assert listed[0] == first.id
    assert {flow.id for flow in flows} == set(DEFAULT_FLOWS)

    def refused() -> None:
        with Client(target(app), "dev-key") as client:
            client.send_email("nope", user_id=ada, idempotency_key="s-2")

    with pytest.raises(NotFound):
        await asyncio.to_thread(refused)


async def test_a_key_without_the_send_scope_is_refused_to_the_client(
    make_settings: SettingsFactory, outbox: Path
) -> None:
    config = f'[[auth.keys]]\nname = "reader"\nhash = "{hash_key("reader-key")}"\nscopes = ["ingest"]\n'
    async with (
        Sendtime(make_settings(outbox_config(outbox) + config)) as app,
        AsyncClient(target(app), "reader-key") as client,
    ):
        with pytest.raises(PermissionDenied):
            await client.send_email("post_purchase", user_id="u1", idempotency_key="k")
        with pytest.raises(PermissionDenied):
            await client.list_flows()
