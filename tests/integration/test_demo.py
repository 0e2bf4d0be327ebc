"""The README's order as a new user follows it: ``make run`` and the demo data
first, then ``make demo`` and the demo data again, which must end with the
abandoned-cart email in the demo's outbox; and ``sendtime flows`` saying when
what is scheduled is due, not only what the configured delay is. Real server
processes and real CLI processes."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import time
from pathlib import Path

import pytest

from sendtime.server.app import Sendtime
from sendtime.server.settings import load_settings
from tests.conftest import SettingsFactory
from tests.integration.server_process import run_sendtime, start_server

# slow: servers run as processes, and the demo's flows wait their delays (make test-fast leaves them out)
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "demo" / "sendtime.toml"


def cart_emails(outbox: Path) -> list[str]:
    """The abandoned-cart emails to the demo shopper (the buyer's thank-you comes at once)."""
    texts = [path.read_text() for path in outbox.glob("*.eml")] if outbox.exists() else []
    return [text for text in texts if "To: Ada Lovelace <demo-shopper@example.com>" in text]


async def test_make_demo_after_make_run_puts_the_email_in_the_demo_outbox(tmp_path: Path) -> None:
    # tmp_path stands for a checkout: make run keeps its data in ./.sendtime,
    # the demo config (in ./demo) names its own folder; templates and catalog
    # are the ones shipped with sendtime
    (tmp_path / "demo").mkdir()
    demo_config = tmp_path / "demo" / "sendtime.toml"
    demo_config.write_text(DEMO_CONFIG.read_text())
    run = await start_server(None, cwd=tmp_path)  # make run
    try:
        code, out, err = await run_sendtime("demo-data", "--json", "--target", run.target, cwd=tmp_path)
        assert code == 0, err
        assert json.loads(out)["accepted"] == 10
    finally:
        run.terminate()
        await run.wait()

    demo = await start_server(None, config=demo_config, cwd=tmp_path)  # make demo
    try:
        code, out, err = await run_sendtime("demo-data", "--json", "--target", demo.target, cwd=tmp_path)
        assert code == 0, err
        assert json.loads(out)["duplicate"] == 0  # the demo's own data: nothing seen before
        code, out, err = await run_sendtime("flows", "--json", "--target", demo.target, cwd=tmp_path)
        assert code == 0, err
        cart = {f["id"]: f for f in json.loads(out)["flows"]}["abandoned_cart"]
        assert cart["delay_s"] == 20.0
        due = dt.datetime.fromisoformat(cart["next_due_time"])
        assert due - dt.datetime.now(dt.UTC) < dt.timedelta(seconds=21)

        outbox = tmp_path / ".sendtime-demo" / "outbox"
        deadline = time.monotonic() + 60
        while not (carts := cart_emails(outbox)) and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        (email,) = carts
        assert "Subject: Ada, you left something in your cart" in email, email[:400]
    finally:
        demo.terminate()
        await demo.wait()
    assert (tmp_path / ".sendtime" / "sendtime.sqlite3").exists()  # make run's data, left alone


def test_the_demo_config_keeps_its_data_apart_from_make_run() -> None:
    # the demo's folder is named relative to demo/sendtime.toml; make run's, to the checkout
    assert load_settings(DEMO_CONFIG, environ={}).storage.data_dir == REPO / ".sendtime-demo"
    assert load_settings(None, environ={}).storage.data_dir == Path(".sendtime")


async def test_flows_says_when_a_send_planned_under_another_delay_is_due(
    make_settings: SettingsFactory, tmp_path: Path
) -> None:
    """A send keeps the due time it was planned with: after a restart with a
    shorter delay, ``flows`` shows both the new delay and the real due time."""
    async with Sendtime(make_settings()) as app:  # the default 30-minute abandoned cart
        code, out, err = await run_sendtime(
            "demo-data", "--target", f"127.0.0.1:{app.grpc_port}", cwd=tmp_path
        )
        assert code == 0, err
    short = make_settings(DEMO_CONFIG.read_text())  # the same data folder (the test's), 20 s flows
    async with Sendtime(short) as app:
        target = f"127.0.0.1:{app.grpc_port}"
        code, out, err = await run_sendtime("flows", "--json", "--target", target, cwd=tmp_path)
        assert code == 0, err
        readable = await run_sendtime("flows", "--target", target, cwd=tmp_path)
    cart = {f["id"]: f for f in json.loads(out)["flows"]}["abandoned_cart"]
    assert (cart["delay_s"], cart["scheduled"]) == (20.0, 1)
    wait = dt.datetime.fromisoformat(cart["next_due_time"]) - dt.datetime.now(dt.UTC)
    assert dt.timedelta(minutes=25) < wait <= dt.timedelta(minutes=30)
    assert re.search(r"next scheduled send due in (29(\.\d+)?|30) min", readable[1]), readable[1]
