"""The benchmarks' SMTP server: a lean SMTP sink on loopback, under uvloop, in a
process of its own, that accepts every message and writes one line per message
to a file as it arrives:

    <arrival time.time()>\t<Message-ID>\t<envelope recipient>\t<To header>\t<bytes>

(tab-separated, flushed per message so a benchmark can count arrivals while
the load runs). With --sample FILE the first message is also saved whole, to
look at.

    python -m benchmarks.relay_smtp --out FILE [--port 0] [--sample FILE]

prints "relay smtp sink serving on HOST:PORT" when ready; SIGTERM stops it.

Why not aiosmtpd (the tests' SMTP server): it reads DATA a line at a time,
about 7 us a line in Python, so a 27 kB email of 400 quoted-printable lines
cost it 4 ms of CPU, about what sendtime's event loop spends making and
relaying it. On two cores the sink then set the benchmark's pace (243
emails/s with aiosmtplib alone as the client). This one looks for the end of the data with one search
over the bytes received (a few microseconds an email) and speaks the part of
RFC 5321 a relay uses: EHLO/HELO (PIPELINING, 8BITMIME, SMTPUTF8, SIZE), MAIL,
RCPT, DATA with dot-unstuffing, RSET, NOOP, QUIT; anything else is refused
with 502, a command out of order with 503. tests/integration/test_relay_sink.py
holds it to that.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import time
from typing import IO, Final, cast

import uvloop

MAX_MESSAGE_BYTES: Final = 32 * 1024 * 1024
MAX_COMMAND_BYTES: Final = 4096
_HEADER_END: Final = b"\r\n\r\n"
_END_OF_DATA: Final = b"\r\n.\r\n"
_MESSAGE_ID: Final = re.compile(rb"^Message-ID:[ \t]*(.*?)\r?$", re.IGNORECASE | re.MULTILINE)
_TO: Final = re.compile(rb"^To:[ \t]*(.*?)\r?$", re.IGNORECASE | re.MULTILINE)
_PATH: Final = re.compile(rb"^(?:FROM|TO):\s*<([^>]*)>", re.IGNORECASE)
_EHLO: Final = (
    b"250-sink.local\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE %d\r\n" % MAX_MESSAGE_BYTES
)


def _header(pattern: re.Pattern[bytes], head: bytes) -> str:
    match = pattern.search(head)
    if match is None:
        return ""
    return match.group(1).decode("ascii", "replace").replace("\t", " ")


class Recorder:
    """Every message accepted is written down, one line each."""

    def __init__(self, out: IO[str], sample: str | None = None) -> None:
        self._out = out
        self._sample = sample
        self.count = 0

    def record(self, arrived: float, recipient: str, content: bytes) -> None:
        """One line, written through at once (a small local write: cheap enough on the loop)."""
        end = content.find(_HEADER_END)
        head = content if end < 0 else content[:end]
        message_id, to = _header(_MESSAGE_ID, head), _header(_TO, head)
        self._out.write(f"{arrived:.6f}\t{message_id}\t{recipient}\t{to}\t{len(content)}\n")
        self._out.flush()
        self.count += 1
        if self.count == 1 and self._sample:
            with open(self._sample, "wb") as sample:
                sample.write(content)


def unstuffed(data: bytes) -> bytes:
    """The message as sent (RFC 5321 4.5.2): the leading dot of each line that
    starts with one removed."""
    data = data.replace(b"\r\n..", b"\r\n.")
    return data[1:] if data.startswith(b"..") else data


class SinkSession(asyncio.Protocol):
    """One SMTP connection. Commands may come pipelined: every complete line in
    what arrived is answered, the replies written together."""

    def __init__(self, recorder: Recorder) -> None:
        self._recorder = recorder
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._in_data = False
        self._searched = 0  # how far the data was searched for its end already
        self._sender: bytes | None = None
        self._recipients: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but are ones
        self._transport = cast(asyncio.Transport, transport)
        self._transport.write(b"220 sink.local ESMTP relay-bench-sink\r\n")

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        replies: list[bytes] = []
        closing = False
        while not closing:
            if self._in_data:
                answer = self._data_part()
                if answer is None:
                    break
                reply, closing = answer
                replies.append(reply)
                continue
            end = self._buffer.find(b"\r\n")
            if end < 0:
                if len(self._buffer) > MAX_COMMAND_BYTES:
                    replies.append(b"500 5.5.2 line too long\r\n")
                    closing = True
                break
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 2]
            reply, closing = self._command(line)
            replies.append(reply)
        if self._transport is not None:
            self._transport.write(b"".join(replies))
            if closing:
                self._transport.close()

    def _data_part(self) -> tuple[bytes, bool] | None:
        """The reply to a message whose end has arrived, and whether to close
        after it; None while more is to come."""
        if self._buffer.startswith(b".\r\n"):
            cut, content = 3, b""  # an empty message: the end-of-data line at once
        else:
            end = self._buffer.find(_END_OF_DATA, max(0, self._searched - len(_END_OF_DATA)))
            if end < 0:
                self._searched = len(self._buffer)
                if len(self._buffer) > MAX_MESSAGE_BYTES + len(_END_OF_DATA):
                    return b"552 5.3.4 Error: message too big\r\n", True
                return None
            cut, content = end + len(_END_OF_DATA), unstuffed(bytes(self._buffer[: end + 2]))
        del self._buffer[:cut]
        self._in_data, self._searched = False, 0
        recipient = self._recipients[0].decode("utf-8", "replace")
        self._sender, self._recipients = None, []
        self._recorder.record(time.time(), recipient, content)
        return b"250 2.0.0 Ok: queued as Q%08d\r\n" % self._recorder.count, False

    def _command(self, line: bytes) -> tuple[bytes, bool]:
        """The reply to one command line, and whether to close after it."""
        verb, _, argument = line.partition(b" ")
        verb = verb.upper()
        if verb == b"EHLO":
            self._sender, self._recipients = None, []
            return _EHLO, False
        if verb == b"HELO":
            self._sender, self._recipients = None, []
            return b"250 sink.local\r\n", False
        if verb == b"MAIL":
            path = _PATH.match(argument)
            if path is None:
                return b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n", False
            if self._sender is not None:
                return b"503 5.5.1 Error: nested MAIL command\r\n", False
            self._sender = path.group(1)
            return b"250 2.1.0 Ok\r\n", False
        if verb == b"RCPT":
            path = _PATH.match(argument)
            if self._sender is None:
                return b"503 5.5.1 Error: need MAIL command\r\n", False
            if path is None or not path.group(1):
                return b"501 5.5.4 Syntax: RCPT TO:<address>\r\n", False
            self._recipients.append(path.group(1))
            return b"250 2.1.5 Ok\r\n", False
        if verb == b"DATA":
            if not self._recipients:
                return b"503 5.5.1 Error: need RCPT command\r\n", False
            self._in_data = True
            return b"354 End data with <CR><LF>.<CR><LF>\r\n", False
        if verb == b"RSET":
            self._sender, self._recipients = None, []
            return b"250 2.0.0 Ok\r\n", False
        if verb == b"NOOP":
            return b"250 2.0.0 Ok\r\n", False
        if verb == b"QUIT":
            return b"221 2.0.0 Bye\r\n", True
        return b"502 5.5.2 Error: command not recognized\r\n", False


async def _serve(host: str, port: int, recorder: Recorder) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SinkSession(recorder), host, port)
    bound = server.sockets[0].getsockname()[1]
    print(f"relay smtp sink serving on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--out", required=True, help="file to write one line per received message to")
    parser.add_argument("--sample", help="file to save the first received message to, whole")
    args = parser.parse_args()
    with open(args.out, "w", encoding="utf-8") as out:
        uvloop.run(_serve(args.host, args.port, Recorder(out, args.sample)))


if __name__ == "__main__":
    main()
