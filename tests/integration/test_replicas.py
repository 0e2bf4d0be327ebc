"""Several sendtime processes on one PostgreSQL database: de-duplication across
replicas, each seeing the others' events, folding one user's concurrent
events to the serial result, `serve --workers 3` relaying 500 emails
exactly once to a real SMTP server with one worker killed -9 mid-dispatch,
and one replica planning a broadcast, the other taking the planning over
when it is killed -9.
Each test works in a schema of its own, dropped after; skipped, saying why,
when no PostgreSQL answers."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import grpc.aio
import msgspec
import pytest

from sendtime.server.domain.events import EventKind, IncomingEvent, validate
from sendtime.server.domain.profile import Profile, fold, view
from sendtime.v1 import event_pb2
from tests.contract.conftest import postgres_schema
from tests.integration.smtp_server import SmtpServer

pytestmark = pytest.mark.slow

WRITE_KEY = {"Authorization": "Basic " + base64.b64encode(b"dev-key:").decode()}
READ_KEY = {"Authorization": "Bearer dev-key"}
READY = re.compile(
    r"sendtime serving gRPC on [\d.]+:(?P<grpc>\d+), HTTP on https?://[\d.]+:(?P<http>\d+)"
    r"(, (?P<workers>\d+) workers \(pids (?P<pids>[\d,]+)\))?"
)
SECRET = "replicas-share-this-secret-0123456789"


@dataclass
class Replica:
    process: asyncio.subprocess.Process
    http_port: int
    pids: list[int]
    grpc_port: int = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        await asyncio.wait_for(self.process.communicate(), 30)
        assert self.process.returncode is not None
        return self.process.returncode

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.communicate(), 60)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


async def start(dsn: str, data_dir: Path, *args: str, config: Path | None = None, **env: str) -> Replica:
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SENDTIME_")},
        "SENDTIME_GRPC__PORT": "0",
        "SENDTIME_HTTP__PORT": "0",
        "SENDTIME_STORAGE__DATA_DIR": str(data_dir),
        "SENDTIME_STORAGE__BACKEND": "postgres",
        "SENDTIME_STORAGE__POSTGRES_DSN": dsn,
        "SENDTIME_DELIVERY__UNSUBSCRIBE_SECRET": SECRET,
        "SENDTIME_SHUTDOWN_GRACE_S": "5",
        "SENDTIME_LOG_LEVEL": "WARNING",
        **{f"SENDTIME_{k.upper()}": v for k, v in env.items()},
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sendtime.server",
        "serve",
        *(["--config", str(config)] if config is not None else []),
        *args,
        env=environ,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
    match = READY.search(line)
    if match is None:
        process.kill()
        raise RuntimeError(f"sendtime did not start: {line!r}")
    pids = [int(p) for p in match["pids"].split(",")] if match["pids"] else [process.pid]
    return Replica(process, int(match["http"]), pids, int(match["grpc"]))


@pytest.fixture
async def dsn() -> AsyncIterator[str]:
    async with postgres_schema() as schema_dsn:
        yield schema_dsn


def track(
    message_id: str, user: str, name: str, properties: dict[str, Any], at: datetime | None = None
) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": "track",
        "messageId": message_id,
        "userId": user,
        "event": name,
        "properties": properties,
    }
    if at is not None:
        event["timestamp"] = at.isoformat()
    return event


async def batch(session: aiohttp.ClientSession, replica: Replica, events: list[dict[str, Any]]) -> list[str]:
    async with session.post(f"{replica.url}/v1/batch", json={"batch": events}, headers=WRITE_KEY) as r:
        assert r.status == 200, await r.text()
        body = await r.json()
    return [result["outcome"] for result in body["results"]] if "results" in body else []


async def test_workers_are_refused_on_sqlite(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sendtime.server",
        "serve",
        "--workers",
        "2",
        env={**os.environ, "SENDTIME_STORAGE__DATA_DIR": str(tmp_path)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2
    assert "--workers 2 needs storage.backend = 'postgres'" in stderr.decode()


async def test_two_replicas_accept_each_message_id_once_and_see_each_others_events(
    dsn: str, tmp_path: Path
) -> None:
    a = await start(dsn, tmp_path / "a")
    b = await start(dsn, tmp_path / "b")
    try:
        async with aiohttp.ClientSession() as session:
            events = [
                track(f"m{n}", f"user{n % 50}", "Product Viewed", {"product_id": f"p{n}"}) for n in range(300)
            ]
            # the same 300 ids to both at once, in batches of 50
            sent = [batch(session, r, events[i : i + 50]) for i in range(0, 300, 50) for r in (a, b)]
            await asyncio.gather(*sent)
            pool = await asyncpg.connect(dsn)
            try:
                assert await pool.fetchval("SELECT count(*) FROM events") == 300
                assert await pool.fetchval("SELECT count(*) FROM message_ids") == 300
            finally:
                await pool.close()
            # b reads user1's profile and content (and caches them); a takes an
            # event of hers; b shows it in both, within the NOTIFY's delay
            content_url = f"{b.url}/v1/content/user1?blocks=recently_viewed"
            async with session.get(f"{b.url}/v1/profiles/user1", headers=READ_KEY) as r:
                before = (await r.json())["event_count"]
            async with session.get(content_url, headers=READ_KEY) as r:
                assert r.status == 200, await r.text()
                assert "mug-ceramic" not in await r.text()
            await batch(session, a, [track("late", "user1", "Product Viewed", {"product_id": "mug-ceramic"})])
            acked = time.monotonic()
            while True:
                async with session.get(f"{b.url}/v1/profiles/user1", headers=READ_KEY) as r:
                    profile_seen = (await r.json())["event_count"] == before + 1
                async with session.get(content_url, headers=READ_KEY) as r:
                    content_seen = "mug-ceramic" in await r.text()
                if profile_seen and content_seen:
                    break
                assert time.monotonic() - acked < 2.0, "replica b never saw replica a's event"
                await asyncio.sleep(0.01)
    finally:
        await asyncio.gather(a.stop(), b.stop())


async def test_one_users_concurrent_events_on_two_replicas_fold_to_the_serial_result(
    dsn: str, tmp_path: Path
) -> None:
    a = await start(dsn, tmp_path / "a")
    b = await start(dsn, tmp_path / "b")
    start_at = datetime.now(UTC) - timedelta(hours=1)
    events = [
        track(
            f"e{n}",
            "ada",
            "Product Added" if n % 3 else "Product Removed",
            {"cart_id": "c1", "product_id": f"p{n % 7}", "name": "Mug", "price": 10, "quantity": 1},
            at=start_at + timedelta(seconds=n),
        )
        for n in range(120)
    ]
    try:
        async with aiohttp.ClientSession() as session:
            # shuffled between the replicas, ten at a time, all at once
            await asyncio.gather(
                *(batch(session, (a, b)[i % 2], events[i * 10 : (i + 1) * 10][::-1]) for i in range(12))
            )
    finally:
        await asyncio.gather(a.stop(), b.stop())
    serial = Profile()
    now = datetime.now(UTC)
    for event in events:
        fold(
            serial,
            validate(
                IncomingEvent(
                    message_id=event["messageId"],
                    kind=EventKind.TRACK,
                    user_id="ada",
                    name=event["event"],
                    timestamp=datetime.fromisoformat(event["timestamp"]),
                    properties=msgspec.json.encode(event["properties"]),
                ),
                now,
            ),
        )
    conn = await asyncpg.connect(dsn)
    try:
        doc = await conn.fetchval("SELECT doc FROM profiles WHERE profile_key = 'u:ada'")
    finally:
        await conn.close()
    stored = msgspec.msgpack.decode(doc, type=Profile)
    assert stored.event_count == serial.event_count == 120
    # as a reader sees it (a cart keeps its operations in arrival order, and
    # replays them by event time)
    assert view(stored) == view(serial)


#: Relaying to the test's SMTP server, no frequency cap.
DELIVERY = """
[delivery]
public_base_url = "https://mail.example.com"
frequency_cap_count = 0
poll_interval_ms = 100
max_concurrent_sends = 16
[delivery.relay]
kind = "smtp"
host = "127.0.0.1"
port = {port}
tls = "off"
"""
FLOW = (
    DELIVERY
    + """
[[flows]]
id = "abandoned_cart"
template = "abandoned_cart"
entry_event = "Product Added"
entry_key = "cart_id"
delay_s = {delay_s}
exit_events = ["Order Completed"]
require_blocks = ["cart"]
"""
)


async def test_three_workers_relay_500_sends_exactly_once_with_one_killed(dsn: str, tmp_path: Path) -> None:
    smtp = SmtpServer()
    smtp.start()
    config = tmp_path / "sendtime.toml"
    config.write_text(FLOW.format(port=smtp.port, delay_s=3.0))
    workers = await start(dsn, tmp_path / "data", "--workers", "3", config=config, storage__claim_lease_s="4")
    users = 500
    try:
        assert len(workers.pids) == 3
        async with aiohttp.ClientSession() as session:
            for first in range(0, users, 100):
                events: list[dict[str, Any]] = []
                for n in range(first, first + 100):
                    events.append(
                        {
                            "type": "identify",
                            "messageId": f"i{n}",
                            "userId": f"user{n}",
                            "traits": {"email": f"user{n}@example.com", "consent": {"marketing": "opted_in"}},
                        }
                    )
                    events.append(
                        track(
                            f"a{n}",
                            f"user{n}",
                            "Product Added",
                            {
                                "cart_id": f"c{n}",
                                "product_id": "kettle-steel",
                                "name": "Kettle",
                                "price": 70,
                                "quantity": 1,
                            },
                        )
                    )
                await batch(session, workers, events)
        # mid-dispatch: some emails out, most not
        await asyncio.to_thread(smtp.inbox.wait_for, 40, 60.0)
        os.kill(workers.pids[1], signal.SIGKILL)
        conn = await asyncpg.connect(dsn)
        try:
            deadline = time.monotonic() + 90
            while True:
                settled = await conn.fetchval(
                    "SELECT count(*) FROM sends WHERE status IN ('sent', 'uncertain', 'failed', 'skipped')"
                )
                if settled == users or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            statuses = dict(await conn.fetch("SELECT status, count(*) FROM sends GROUP BY 1"))
            sent_to = {row[0] for row in await conn.fetch("SELECT user_id FROM sends WHERE status = 'sent'")}
            unsure = {
                row[0] for row in await conn.fetch("SELECT user_id FROM sends WHERE status = 'uncertain'")
            }
        finally:
            await conn.close()
    finally:
        await workers.stop()
        smtp.stop()
    recipients = [rcpt for _, rcpts in smtp.inbox.envelopes for rcpt in rcpts]
    received = {r.split("@")[0] for r in recipients}
    assert len(recipients) == len(received), "an email went out twice"
    assert statuses.get("sent", 0) + statuses.get("uncertain", 0) == users, statuses
    assert sent_to <= received  # every send marked sent reached the SMTP server
    assert received <= sent_to | unsure  # and nothing reached it that the ledger does not own
    assert len(received | unsure) == users  # nothing lost


async def test_kill_9_of_a_replica_mid_stream_loses_no_acked_event(dsn: str, tmp_path: Path) -> None:
    from tests.integration.test_durability import resend, stream_until_broken, user_of

    doomed = await start(dsn, tmp_path / "a")
    other = await start(dsn, tmp_path / "b")
    try:
        acked: set[str] = set()
        sent: list[str] = []
        stream = asyncio.create_task(stream_until_broken(doomed, acked, sent))  # type: ignore[arg-type]
        while len(acked) < 3000:  # well into the stream, with commits in flight
            await asyncio.sleep(0.01)
            assert not stream.done(), "the stream ended before the kill"
        doomed.kill()
        await asyncio.wait_for(stream, 30)
        assert await doomed.wait() == -9
        assert len(sent) > len(acked), "some events were in flight, unacked, at the kill"
        # the other replica knows every acked id already
        outcomes = await resend(other, sorted(acked))  # type: ignore[arg-type]
    finally:
        await other.stop()
    lost = [m for m in acked if outcomes[m] != event_pb2.EVENT_OUTCOME_DUPLICATE]
    assert lost == [], f"{len(lost)} acked events were lost"
    # each stored event folded exactly once, in its own transaction
    conn = await asyncpg.connect(dsn)
    try:
        stored = [row[0] for row in await conn.fetch("SELECT message_id FROM events")]
        docs = dict(await conn.fetch("SELECT profile_key, doc FROM profiles WHERE doc != ''::bytea"))
    finally:
        await conn.close()
    per_user: dict[str, int] = {}
    for message_id in stored:
        per_user[f"u:{user_of(message_id)}"] = per_user.get(f"u:{user_of(message_id)}", 0) + 1
    assert {k: msgspec.msgpack.decode(v, type=Profile).event_count for k, v in docs.items()} == per_user


BROADCAST = (
    DELIVERY
    + """
[broadcasts]
segment_processes = 0
segment_batch = 100
progress_interval_s = 0.2
plan_hold_s = 2
"""
)


async def test_one_replica_plans_a_broadcast_and_another_takes_over_when_it_dies(
    dsn: str, tmp_path: Path
) -> None:
    from sendtime.v1 import broadcast_service_pb2 as B
    from sendtime.v1 import broadcast_service_pb2_grpc, event_service_pb2
    from tests.conftest import DEV_AUTH, event_stub

    smtp = SmtpServer()
    smtp.start()
    config = tmp_path / "sendtime.toml"
    config.write_text(BROADCAST.format(port=smtp.port))
    replicas = [
        await start(dsn, tmp_path / name, config=config, storage__claim_lease_s="4") for name in ("a", "b")
    ]
    audience = 3000
    conn = await asyncpg.connect(dsn)
    try:
        async with grpc.aio.insecure_channel(replicas[0].target) as channel:
            for first in range(0, audience, 500):
                people = [
                    event_pb2.Event(
                        message_id=f"who-{n}",
                        user_id=f"user{n}",
                        identify=event_pb2.IdentifyPayload(
                            traits=event_pb2.Traits(email=f"user{n}@example.com")
                        ),
                    )
                    for n in range(first, first + 500)
                ]
                await event_stub(channel).IngestEvents(
                    event_service_pb2.IngestEventsRequest(events=people), metadata=DEV_AUTH
                )
            made = await broadcast_service_pb2_grpc.BroadcastServiceStub(channel).CreateBroadcast(
                B.CreateBroadcastRequest(
                    broadcast=B.Broadcast(
                        idempotency_key="held",
                        template_id="post_purchase",
                        expression='email.endsWith("@example.com")',
                        transactional=True,
                    )
                ),
                metadata=DEV_AUTH,
            )

        async def stored() -> dict[str, Any]:
            doc = await conn.fetchval("SELECT doc FROM broadcasts WHERE id = $1", made.broadcast.id)
            decoded: dict[str, Any] = msgspec.json.decode(doc)
            return decoded

        deadline = time.monotonic() + 60
        while (now := await stored())["state"] != "planning" or not now["planner"]:
            assert now["state"] in ("scheduled", "planning"), f"planned before it could be caught: {now}"
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        planner_pid = int(now["planner"].split(":")[1])
        doomed = next(r for r in replicas if r.process.pid == planner_pid)
        survivor = next(r for r in replicas if r is not doomed)
        doomed.kill()
        await doomed.wait()
        assert (await stored())["planned_at"] is None, "planning ended before the kill"

        deadline = time.monotonic() + 120
        while (now := await stored())["state"] != "done":
            assert time.monotonic() < deadline, now
            await asyncio.sleep(0.2)
        statuses = dict(
            await conn.fetch(
                "SELECT status, count(*) FROM sends WHERE flow_id = $1 GROUP BY 1", f"broadcast:{now['id']}"
            )
        )
    finally:
        await conn.close()
        await asyncio.gather(*(r.stop() for r in replicas))
        smtp.stop()
    assert int(now["planner"].split(":")[1]) == survivor.process.pid  # taken over
    assert now["audience"] == audience
    recipients = [rcpt for _, rcpts in smtp.inbox.envelopes for rcpt in rcpts]
    assert len(recipients) == len(set(recipients)), "an email went out twice"
    assert statuses.get("sent", 0) + statuses.get("uncertain", 0) == audience, statuses
    assert audience - statuses.get("uncertain", 0) <= len(recipients) <= audience
