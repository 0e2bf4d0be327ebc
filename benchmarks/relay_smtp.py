"""The relay benchmark's SMTP server: aiosmtpd on loopback, under uvloop, in a
process of its own, that accepts every message and writes one line per message
to a file as it arrives:

    <arrival time.time()>\t<Message-ID>\t<envelope recipient>\t<To header>\t<bytes>

(tab-separated, flushed per message so the benchmark can count arrivals while
the load runs). It parses nothing but the header block, so its own cost stays
small next to the server under test. With --sample FILE the first message is
also saved whole, to look at.

    python -m benchmarks.relay_smtp --out FILE [--port 0] [--sample FILE]

prints "relay smtp sink serving on HOST:PORT" when ready; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import time
from typing import IO, Any, Final

import uvloop
from aiosmtpd.smtp import SMTP

_HEADER_END: Final = b"\r\n\r\n"
_MESSAGE_ID: Final = re.compile(rb"^Message-ID:[ \t]*(.*?)\r?$", re.IGNORECASE | re.MULTILINE)
_TO: Final = re.compile(rb"^To:[ \t]*(.*?)\r?$", re.IGNORECASE | re.MULTILINE)


def _header(pattern: re.Pattern[bytes], head: bytes) -> str:
    match = pattern.search(head)
    if match is None:
        return ""
    return match.group(1).decode("ascii", "replace").replace("\t", " ")


class Recorder:
    """aiosmtpd handler: every message is accepted and written down."""

    def __init__(self, out: IO[str], sample: str | None = None) -> None:
        self._out = out
        self._sample = sample
        self.count = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        arrived = time.time()
        content: bytes = envelope.content if isinstance(envelope.content, bytes) else b""
        self.record(arrived, envelope.rcpt_tos[0] if envelope.rcpt_tos else "", content)
        return f"250 2.0.0 Ok: queued as Q{self.count:08d}"

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


async def _serve(host: str, port: int, recorder: Recorder) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(recorder, hostname="sink.local", ident="relay-bench-sink"), host, port
    )
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
