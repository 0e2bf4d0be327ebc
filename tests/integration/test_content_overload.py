"""No late answers: content calls that cannot be answered in time are shed at
admission (blocks from cache or fallback at once, or a whole email refused
with 429 / RESOURCE_EXHAUSTED and retry advice), the answer says so, and the
server counts shed calls and answers that left after their deadline
(``sendtime_content_shed_total``, ``sendtime_content_late_answers_total``).

The server runs in the test's own event loop, so a test makes it run late the
way overload does: it holds the loop (time.sleep) for a while. Timing tests,
so marked slow: what they check is told by the server's own counters (shed,
late answers), never by how long the test waited."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import grpc
import grpc.aio
import pytest

from sendtime.server.app import Sendtime
from sendtime.v1 import content_service_pb2, content_service_pb2_grpc
from tests.conftest import DEV_AUTH, SettingsFactory
from tests.integration.conftest import Upstream, eventually
from tests.integration.observing import scrape, value
from tests.integration.test_content import config_for

AUTH = {"Authorization": "Bearer dev-key"}

pytestmark = pytest.mark.slow


@pytest.fixture
async def app(make_settings: SettingsFactory) -> AsyncIterator[Sendtime]:
    async with Sendtime(make_settings()) as server:
        yield server


async def add_to_cart(http: aiohttp.ClientSession, base: str, user: str) -> None:
    event = {
        "type": "track",
        "messageId": f"add-{user}",
        "userId": user,
        "event": "Product Added",
        "properties": {"cart_id": "c", "product_id": "mug-ceramic", "price": 14},
    }
    async with http.post(f"{base}/v1/batch", json={"batch": [event]}, headers=AUTH) as response:
        assert response.status == 200, await response.text()


async def on_time(app: Sendtime) -> None:
    """Until the server's event loop runs on time again (its recent lateness,
    a decaying peak, under 10 ms): a call asked then is judged on its own."""

    async def lateness() -> float:
        return app._loop_lag.recent_peak_s

    await eventually(lateness, until=lambda late: late < 0.01)


async def run_late(seconds: float) -> None:
    """Hold the event loop, as a burst of work would, and let the server see it."""
    time.sleep(seconds)
    await asyncio.sleep(0.01)  # the loop-lag sampler runs and records it


async def test_blocks_are_shed_to_cache_or_fallback_when_the_server_runs_late(app: Sendtime) -> None:
    base = f"http://127.0.0.1:{app.http_port}"
    async with aiohttp.ClientSession() as http:
        await add_to_cart(http, base, "ada")
        await add_to_cart(http, base, "bob")
        async with http.get(f"{base}/v1/content/ada?blocks=cart", headers=AUTH) as response:
            assert (await response.json())["blocks"]["cart"]["source"] == "fresh"  # cached now

        await run_late(0.4)
        headers = {**AUTH, "Sendtime-Deadline-Ms": "200"}
        async with http.get(f"{base}/v1/content/ada?blocks=cart,recommendations", headers=headers) as r:
            ada = await r.json()
        async with http.get(f"{base}/v1/content/bob?blocks=cart", headers=headers) as r:
            bob = await r.json()

        # ada's cart was cached: served from the cache; what was not is a
        # fallback that says why; bob has nothing cached at all
        assert ada["blocks"]["cart"]["source"] == "cached"
        assert ada["blocks"]["cart"]["data"]["lines"][0]["product"]["id"] == "mug-ceramic"
        assert (ada["blocks"]["recommendations"]["source"], ada["blocks"]["recommendations"]["reason"]) == (
            "fallback",
            "overloaded",
        )
        assert (bob["blocks"]["cart"]["source"], bob["blocks"]["cart"]["reason"]) == (
            "fallback",
            "overloaded",
        )

        # shed at admission, and in time: the server counts no late answer
        families = await scrape(app.http_port)
        assert value(families, "sendtime_content_shed_total", call="content") == 2
        assert value(families, "sendtime_content_late_answers_total") == 0

        # once the loop keeps time again, the same call is answered in full
        async def bobs_cart() -> str:
            async with http.get(f"{base}/v1/content/bob?blocks=cart", headers=headers) as r:
                return str((await r.json())["blocks"]["cart"]["source"])

        assert await eventually(bobs_cart, until=lambda source: source != "fallback") == "fresh"


async def test_a_whole_email_that_cannot_be_made_in_time_is_refused_at_once(app: Sendtime) -> None:
    base = f"http://127.0.0.1:{app.http_port}"
    async with (
        aiohttp.ClientSession() as http,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel,
    ):
        await add_to_cart(http, base, "ada")
        families = await scrape(app.http_port)
        assert value(families, "sendtime_content_shed_total", call="email") == 0  # shown before any

        await run_late(0.4)
        headers = {**AUTH, "Sendtime-Deadline-Ms": "200"}
        async with http.get(f"{base}/v1/content/ada?template=abandoned_cart", headers=headers) as response:
            body = await response.json()
        assert response.status == 429
        assert response.headers["Retry-After"] == "1"
        assert body["error"]["reason"] == "RESOURCE_EXHAUSTED"
        assert "cannot be made in time" in body["error"]["message"]

        stub = content_service_pb2_grpc.ContentServiceStub(channel)
        await run_late(0.4)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.RenderEmail(
                content_service_pb2.RenderEmailRequest(template_id="abandoned_cart", user_id="ada"),
                metadata=DEV_AUTH,
                timeout=0.2,
            )
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED

        families = await scrape(app.http_port)
        assert value(families, "sendtime_content_shed_total", call="email") == 2

        # in time again: the email is made
        async def email() -> tuple[int, str]:
            async with http.get(
                f"{base}/v1/content/ada?template=abandoned_cart", headers=headers
            ) as response:
                return response.status, await response.text()

        status, text = await eventually(email, until=lambda answer: answer[0] != 429)
        assert status == 200
        assert "Stoneware Mug" in text


async def test_an_answer_that_leaves_after_its_deadline_is_counted(
    make_settings: SettingsFactory,
    upstream: Upstream,
) -> None:
    # The call waits on a slow upstream; meanwhile the loop is held past the
    # call's whole deadline, so its answer can only leave late: counted.
    upstream.delay_s = 1.0
    async with Sendtime(make_settings(config_for(upstream))) as app, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{app.http_port}"
        identify = [
            {"type": "identify", "messageId": f"id-{u}", "userId": u, "traits": {"email": f"{u}@example.com"}}
            for u in ("ada", "carl")
        ]
        async with http.post(f"{base}/v1/batch", json={"batch": identify}, headers=AUTH) as response:
            assert response.status == 200
        headers = {**AUTH, "Sendtime-Deadline-Ms": "100"}
        await on_time(app)  # not shed for a stall the start or a collection left behind
        async with http.get(f"{base}/v1/content/ada?blocks=loyalty", headers=headers) as response:
            assert (await response.json())["blocks"]["loyalty"]["reason"] == "timeout"  # in time
        families = await scrape(app.http_port)
        assert value(families, "sendtime_content_late_answers_total") == 0

        async def ask_for_carl() -> int:
            async with http.get(f"{base}/v1/content/carl?blocks=loyalty", headers=headers) as response:
                return response.status

        await on_time(app)
        asking = asyncio.ensure_future(ask_for_carl())

        async def fetched_for_carl() -> bool:
            return any("carl" in path for path in upstream.paths)

        # the call is in its handler, waiting on the upstream: hold the loop
        await eventually(fetched_for_carl, until=lambda fetched: fetched or asking.done())
        assert not asking.done(), asking.result()
        time.sleep(0.3)
        assert await asking == 200
        families = await scrape(app.http_port)
        assert value(families, "sendtime_content_late_answers_total", call="content") == 1
        assert value(families, "sendtime_content_late_answers_total", call="email") == 0


async def _answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 answer's status and body (by its Content-Length)."""
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, field = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(field)
    return status, await reader.readexactly(length)


async def test_the_deadline_runs_from_when_the_request_came_not_from_its_handler(app: Sendtime) -> None:
    # A request whose head comes in two parts 250 ms apart, with a 200 ms
    # deadline: by the time its handler runs, its caller's deadline has passed
    # (as when it waits behind a long loop iteration), so the email is refused
    # at once rather than made and sent late. The next request on the same
    # connection is timed from its own bytes.
    base = f"http://127.0.0.1:{app.http_port}"
    async with aiohttp.ClientSession() as http:
        await add_to_cart(http, base, "ada")
    reader, writer = await asyncio.open_connection("127.0.0.1", app.http_port)
    try:
        start = b"GET /v1/content/ada?template=abandoned_cart HTTP/1.1\r\nHost: sendtime\r\n"
        rest = b"Authorization: Bearer dev-key\r\nSendtime-Deadline-Ms: 200\r\n\r\n"
        writer.write(start)
        await writer.drain()
        await asyncio.sleep(0.25)
        writer.write(rest)
        status, body = await _answer(reader)
        assert status == 429, body
        assert b"cannot be made in time" in body

        await asyncio.sleep(0.3)  # idle on the connection: not counted against the next call
        await on_time(app)
        writer.write(start + rest)
        status, body = await _answer(reader)
        assert status == 200, body
        assert b"Stoneware Mug" in body

        # blocks asked for after their deadline: no fetch, and the answer counted late
        writer.write(b"GET /v1/content/ada?blocks=recently_viewed HTTP/1.1\r\nHost: sendtime\r\n")
        await writer.drain()
        await asyncio.sleep(0.25)
        writer.write(rest)
        status, body = await _answer(reader)
        assert status == 200, body
        assert b'"reason":"deadline_too_short"' in body
    finally:
        writer.close()
        await writer.wait_closed()
    families = await scrape(app.http_port)
    assert value(families, "sendtime_content_shed_total", call="email") == 1
    # both answers left after their callers' deadlines, the refusal too
    assert value(families, "sendtime_content_late_answers_total", call="content") == 1
    assert value(families, "sendtime_content_late_answers_total", call="email") == 1
