"""The benchmarks' SMTP sink (benchmarks.relay_smtp) speaks the SMTP a relay
uses, over real sockets: sendtime's own SMTP relay delivers through it byte for
byte, pipelined commands are each answered, and what is out of order or
unknown is refused. Benchmarks count emails and duplicates by its lines."""

from __future__ import annotations

import asyncio
import io
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest

from benchmarks.relay_smtp import Recorder, SinkSession, unstuffed
from sendtime.server.relay import OutgoingEmail, SmtpConfig, build_relay
from sendtime.server.relay.message import build
from tests.integration.test_relays import make_email


@asynccontextmanager
async def sink(out: io.StringIO, sample: Path | None = None) -> AsyncIterator[int]:
    recorder = Recorder(out, str(sample) if sample else None)
    server = await asyncio.get_running_loop().create_server(lambda: SinkSession(recorder), "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def talk(port: int, *chunks: bytes) -> bytes:
    """Each chunk written whole (pipelined commands in one), then everything
    read up to the server's close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for chunk in chunks:
            writer.write(chunk)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()


def reply_codes(replies: bytes) -> list[bytes]:
    """The code of each reply line that ends a reply ("250 ..." and not "250-...")."""
    return re.findall(rb"^(\d{3}) ", replies, re.MULTILINE)


async def deliver(port: int, *emails: OutgoingEmail) -> None:
    """Each email through sendtime's own SMTP relay, on one connection."""
    relay = build_relay(SmtpConfig(host="127.0.0.1", port=port, tls="off", timeout_s=30.0))
    try:
        for email in emails:
            await relay.attempt(email)
    finally:
        await relay.close()


def dotted_email(key: str) -> OutgoingEmail:
    """An email whose text lines start with dots, so delivery must stuff and unstuff them."""
    return build(
        send_key=key,
        message_id_domain="sendtime.test",
        sender="Shop <shop@shop.example>",
        recipient_email="ada@example.com",
        recipient_name="Ada",
        reply_to="",
        subject="Dots",
        html="<p>.hidden</p>\n" + "<p>x</p>\n" * 2000,
        text=".one leading dot\n..two\n.\nlast",
        date=datetime(2026, 12, 4, 19, 0, tzinfo=UTC),
        list_id="",
    )


async def test_the_relay_delivers_through_the_sink_byte_for_byte(tmp_path: Path) -> None:
    out = io.StringIO()
    sample = tmp_path / "first.eml"
    email = dotted_email("k1")
    async with sink(out, sample) as port:
        await deliver(port, email, dotted_email("k2"))
    assert sample.read_bytes() == email.mime
    lines = [line.split("\t") for line in out.getvalue().splitlines()]
    assert len(lines) == 2
    arrived, message_id, recipient, to, size = lines[0]
    assert float(arrived) > 0
    assert message_id == "<k1@sendtime.test>"
    assert (recipient, to, int(size)) == ("ada@example.com", "Ada <ada@example.com>", len(email.mime))
    assert lines[1][1] == "<k2@sendtime.test>"


async def test_pipelined_commands_are_each_answered_in_order() -> None:
    out = io.StringIO()
    async with sink(out) as port:
        replies = await talk(
            port,
            b"EHLO client\r\nMAIL FROM:<a@example.com> SIZE=10\r\nRCPT TO:<b@example.com>\r\nDATA\r\n",
            b"Message-ID: <m1>\r\nTo: b@example.com\r\n\r\nhi\r\n.\r\nQUIT\r\n",
        )
    codes = reply_codes(replies)
    assert codes == [b"220", b"250", b"250", b"250", b"354", b"250", b"221"]
    assert b"250-PIPELINING" in replies
    assert out.getvalue().split("\t")[1:4] == ["<m1>", "b@example.com", "b@example.com"]


async def test_out_of_order_and_unknown_commands_are_refused_and_nothing_is_recorded() -> None:
    out = io.StringIO()
    async with sink(out) as port:
        replies = await talk(
            port,
            b"HELO client\r\nRCPT TO:<b@example.com>\r\nDATA\r\nMAIL FROM:<a@example.com>\r\n"
            b"MAIL FROM:<a@example.com>\r\nMAIL nonsense\r\nRSET\r\nDATA\r\nVRFY x\r\nNOOP\r\nQUIT\r\n",
        )
    codes = reply_codes(replies)
    assert codes == [
        b"220",
        b"250",
        b"503",
        b"503",
        b"250",
        b"503",
        b"501",
        b"250",
        b"503",
        b"502",
        b"250",
        b"221",
    ]
    assert out.getvalue() == ""


async def test_an_empty_message_and_a_message_split_across_writes() -> None:
    out = io.StringIO()
    async with sink(out) as port:
        # the end-of-data line split over two writes, and a message with no lines at all
        replies = await talk(
            port,
            b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<b@example.com>\r\nDATA\r\nMessage-ID: <split>\r\n\r\nbody\r",
            b"\n.",
            b"\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n.\r\nQUIT\r\n",
        )
    assert reply_codes(replies).count(b"250") == 7
    lines = [line.split("\t") for line in out.getvalue().splitlines()]
    assert [(line[1], line[2], line[4]) for line in lines] == [
        ("<split>", "b@example.com", str(len(b"Message-ID: <split>\r\n\r\nbody\r\n"))),
        ("", "c@example.com", "0"),
    ]


def test_unstuffing_removes_one_leading_dot_a_line() -> None:
    assert unstuffed(b"..a\r\n...b\r\n.\r\nc\r\n") == b".a\r\n..b\r\n.\r\nc\r\n"


@pytest.mark.slow
def test_the_sink_process_says_where_it_serves_and_writes_its_file(tmp_path: Path) -> None:
    out = tmp_path / "arrivals.tsv"
    with subprocess.Popen(
        [sys.executable, "-m", "benchmarks.relay_smtp", "--out", str(out)], stdout=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stdout is not None
            ready = re.match(r"relay smtp sink serving on 127\.0\.0\.1:(\d+)", process.stdout.readline())
            assert ready is not None
            asyncio.run(deliver(int(ready[1]), make_email()))
            assert out.read_text().split("\t")[2] == "ada@example.com"
        finally:
            process.terminate()
            assert process.wait(10) == 0
