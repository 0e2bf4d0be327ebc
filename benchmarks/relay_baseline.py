"""The relay benchmark's baseline: how many emails per second this machine's
SMTP path takes with no sendtime in it. An aiosmtplib client (the library
sendtime's relay uses) in a process of its own sends one finished message (a
real one, saved by benchmarks.relay_smtp from sendtime's run) over
--connections kept-open connections, one transaction after the other on each,
for --duration seconds, to the benchmark's SMTP server. So the benchmark can
tell a slow sendtime from a slow SMTP server or a busy machine.

    python -m benchmarks.relay_baseline --port PORT --message FILE [--connections 8] [--duration 3]

prints one JSON line: emails_per_s, transactions, p50/p99 per transaction in
ms, errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiosmtplib
import uvloop


async def run(args: argparse.Namespace, message: bytes) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[str] = []

    async def worker(k: int, end: float) -> None:
        client = aiosmtplib.SMTP(hostname=args.host, port=args.port, start_tls=False, timeout=10)
        await client.connect()
        try:
            n = 0
            while time.perf_counter() < end:
                started = time.perf_counter()
                await client.mail(f"bench-{k}@bench.example")
                await client.rcpt(f"baseline-{k}-{n}@bench.example")
                await client.data(message)
                latencies.append(time.perf_counter() - started)
                n += 1
        except aiosmtplib.SMTPException as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            client.close()

    started = time.perf_counter()
    end = started + args.duration
    await asyncio.gather(*(worker(k, end) for k in range(args.connections)))
    elapsed = time.perf_counter() - started
    latencies.sort()

    def pick(fraction: float) -> float | None:
        if not latencies:
            return None
        return round(latencies[min(len(latencies) - 1, round(fraction * (len(latencies) - 1)))] * 1000, 2)

    return {
        "emails_per_s": round(len(latencies) / elapsed, 1),
        "transactions": len(latencies),
        "connections": args.connections,
        "message_bytes": len(message),
        "p50_ms": pick(0.5),
        "p99_ms": pick(0.99),
        "errors": errors[:5],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--message", required=True, help="a whole message (RFC 5322 bytes) to send")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--duration", type=float, default=3.0)
    args = parser.parse_args()
    message = Path(args.message).read_bytes()
    print(json.dumps(uvloop.run(run(args, message))), flush=True)


if __name__ == "__main__":
    main()
