"""Benchmark: does the server keep answering while a /v1/batch flood comes in?

What it measures, in one invocation: ``sendtime serve`` (own process, pinned to
CPU 0 when taskset exists, data in a temporary folder, free ports) under a
flood of Segment ``POST /v1/batch`` bodies (--batch events each, about 450 KB
at the default, fresh message ids) from --connections concurrent connections
in a generator process of its own (pinned to CPU 1), while this process probes
what others see meanwhile:

- GET /healthz every 50 ms: its latency p50/p99;
- GetContent over gRPC with a 100 ms deadline every 100 ms: the share that
  missed it (DEADLINE_EXCEEDED or later than 100 ms).

It does that twice: with the shipped intake admission
(http.max_ingest_bytes_in_flight at its default), and as the baseline with
admission out of the way (1 GiB: every flood request is read and decoded before
the store's queue refuses it, as before issue 16; the store-backlog check
before reading still applies). With --baseline-src DIR the baseline runs
the server code in DIR (e.g. an export of an older commit's server/) instead.

    python -m benchmarks.flood [--json] [--duration S] [--connections N]

With --json the last stdout line is one JSON object: per run, the flood's
answers by status, healthz p50/p99 ms, GetContent misses of 100 ms, and the
ratios bounded/baseline. The machine is small and shared: compare the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import grpc.aio

from benchmarks.servers import REPO, sendtime_server
from sendtime.v1 import content_service_pb2, content_service_pb2_grpc

AUTH = (("authorization", "Bearer dev-key"),)


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _pinned(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if shutil.which("taskset") else []


# -- the flood generator (its own process) ------------------------------------------


def _batch(size: int) -> bytes:
    events = [
        {
            "type": "track",
            "messageId": str(uuid.uuid4()),
            "userId": f"u{n % 5000}",
            "event": "Product Viewed",
            "properties": {"product_id": f"p{n % 300}", "name": "A product of some kind", "price": 19.99},
            "timestamp": "2026-01-01T00:00:00Z",
        }
        for n in range(size)
    ]
    return json.dumps({"batch": events}).encode()


async def _flood(url: str, connections: int, size: int, duration_s: float) -> dict[str, int]:
    statuses: Counter[str] = Counter()
    stop_at = time.monotonic() + duration_s
    headers = {"Authorization": "Bearer dev-key", "Content-Type": "application/json"}

    async def one(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < stop_at:
            try:
                async with session.post(f"{url}/v1/batch", data=_batch(size), headers=headers) as response:
                    await response.read()
                    statuses[str(response.status)] += 1
            except aiohttp.ClientError as error:
                statuses[type(error).__name__] += 1

    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        await asyncio.gather(*(one(session) for _ in range(connections)))
    return dict(statuses)


# -- the probes (this process) ----------------------------------------------------------


async def _probe(http_url: str, grpc_target: str, duration_s: float) -> dict[str, Any]:
    health_ms: list[float] = []
    content_missed = content_calls = 0
    stop_at = time.monotonic() + duration_s

    async def health(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            async with session.get(f"{http_url}/healthz") as response:
                await response.read()
            health_ms.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.05)

    async def content(channel: grpc.aio.Channel) -> None:
        nonlocal content_missed, content_calls
        stub = content_service_pb2_grpc.ContentServiceStub(channel)
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            content_calls += 1
            try:
                await stub.GetContent(
                    content_service_pb2.GetContentRequest(user_id="u1", blocks=["cart"]),
                    metadata=AUTH,
                    timeout=0.1,
                )
                if time.perf_counter() - started > 0.1:
                    content_missed += 1
            except grpc.aio.AioRpcError:
                content_missed += 1
            await asyncio.sleep(0.1)

    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
        grpc.aio.insecure_channel(grpc_target) as channel,
    ):
        await asyncio.gather(health(session), content(channel))
    return {
        "healthz_p50_ms": round(statistics.median(health_ms), 2),
        "healthz_p99_ms": round(statistics.quantiles(health_ms, n=100)[98], 2) if len(health_ms) > 1 else 0.0,
        "healthz_probes": len(health_ms),
        "content_calls": content_calls,
        "content_missed_100ms": content_missed,
    }


def _run(label: str, args: argparse.Namespace, overrides: dict[str, str], src: Path | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sendtime-flood-") as tmp:
        env = {**overrides, **({"PYTHONPATH": str(src)} if src is not None else {})}
        with sendtime_server(Path(tmp) / "data", Path(tmp), env) as server:
            assert server.match is not None
            if shutil.which("taskset"):  # the server on CPU 0, all its threads
                subprocess.run(
                    ["taskset", "-a", "-p", "-c", "0", str(server.pid)], capture_output=True, check=False
                )
            http_url = server.match["http"]
            grpc_target = f"{server.match['grpc']}:{server.match['grpc_port']}"
            progress(
                f"{label}: {args.connections} connections x {args.batch} events for {args.duration:.0f} s"
            )
            generator = subprocess.Popen(
                [
                    *_pinned(1),
                    sys.executable,
                    "-m",
                    "benchmarks.flood",
                    "--generate",
                    http_url,
                    "--connections",
                    str(args.connections),
                    "--batch",
                    str(args.batch),
                    "--duration",
                    str(args.duration),
                ],
                stdout=subprocess.PIPE,
                text=True,
                cwd=REPO,
            )
            time.sleep(1.0)  # let the flood build up
            probes = asyncio.run(_probe(http_url, grpc_target, args.duration - 2.0))
            out, _ = generator.communicate(timeout=args.duration + 120)
    result = {"label": label, "flood_statuses": json.loads(out.strip().splitlines()[-1]), **probes}
    progress(f"{label}: {result}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--duration", type=float, default=12.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--baseline-src", type=Path, default=None)
    parser.add_argument(
        "--bytes-in-flight", type=int, default=0, help="http.max_ingest_bytes_in_flight of the bounded run"
    )
    parser.add_argument("--generate", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        print(json.dumps(asyncio.run(_flood(args.generate, args.connections, args.batch, args.duration))))
        return
    baseline_overrides = (
        {} if args.baseline_src else {"SENDTIME_HTTP__MAX_INGEST_BYTES_IN_FLIGHT": str(2**30)}
    )
    baseline = _run("baseline", args, baseline_overrides, args.baseline_src)
    bounded_overrides = (
        {"SENDTIME_HTTP__MAX_INGEST_BYTES_IN_FLIGHT": str(args.bytes_in_flight)}
        if args.bytes_in_flight
        else {}
    )
    bounded = _run("bounded", args, bounded_overrides, None)

    def ratio(key: str) -> float | None:
        return round(bounded[key] / baseline[key], 3) if baseline[key] else None

    summary = {
        "baseline": baseline,
        "bounded": bounded,
        "healthz_p50_ratio": ratio("healthz_p50_ms"),
        "healthz_p99_ratio": ratio("healthz_p99_ms"),
        "content_missed_ratio": ratio("content_missed_100ms"),
        "connections": args.connections,
        "batch_events": args.batch,
        "duration_s": args.duration,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
