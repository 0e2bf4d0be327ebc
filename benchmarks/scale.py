"""Benchmark: one host, one process on SQLite against one and two processes on PostgreSQL.

What it measures, in one invocation, for three servers started in turn
(``sendtime serve``, own processes, free ports, data in a temporary folder or
a PostgreSQL schema of their own on 127.0.0.1:5432, dropped after):

- sqlite: one process on the embedded SQLite backend;
- pg1: one process on the PostgreSQL backend;
- pg2: ``sendtime serve --workers 2`` on the PostgreSQL backend (two
  processes sharing the ports through SO_REUSEPORT).

For each, in this order:

1. Segment batch API: wrk (native, so the generator is not the bottleneck)
   with benchmarks/lua/batch.lua: POST /v1/batch of 100 e-commerce events,
   every message id new, 50,000 users (SCALE_USERS in the environment
   changes it), --connections in flight; events acked per second (every 200
   answer acks its 100 events after their commit), and the CPU that wrk, the
   sendtime processes, PostgreSQL and the whole machine used meanwhile.
2. StreamEvents: benchmarks.load (grpc.aio, own process; Python, so it can be
   the bottleneck: reported, not a target), --streams streams.
3. First-touch content: wrk with benchmarks/lua/content.lua: GET
   /v1/content/{user} for cart, recommendations, recently_viewed and offers,
   every call a user not asked for before (nothing cached for them), 500 ms
   deadline; calls answered 200 per second.

Then, on pg2 only, dispatch: 500 users each enter the abandoned-cart flow
(delay 2 s); the two workers relay to a real SMTP server (aiosmtpd, in this
process); dispatch_lost counts sends that never reached it, and
dispatch_duplicates emails that reached it twice.

PostgreSQL, the server processes and the load generators share this
machine's cores: compare ratios (pg2_over_pg1, pg2_over_sqlite), not absolute
figures, across machines.

    python -m benchmarks.scale [--json] [--duration S] [--dsn URL]

Progress goes to stderr. With --json the last stdout line is one JSON object
with sqlite_events_per_s, pg1_events_per_s, pg2_events_per_s (batch API),
pg2_over_pg1, pg2_over_sqlite, the same for StreamEvents (*_stream_events_per_s)
and content (*_content_calls_per_s), dispatch_lost, dispatch_duplicates, CPU
use, and the targets.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import msgspec

from benchmarks.load import LoadResult
from benchmarks.servers import REPO, ServerProcess

TARGETS: Final = {"pg2_over_pg1": 1.3, "pg2_over_sqlite": 0.7, "dispatch_lost": 0, "dispatch_duplicates": 0}
DSN: Final = "postgresql://postgres@127.0.0.1:5432/test"
LUA: Final = Path(__file__).resolve().parent / "lua"
_READY: Final = re.compile(
    r"sendtime serving gRPC on (?P<grpc>\S+):(?P<grpc_port>\d+), HTTP on (?P<http>https?://\S+:\d+)"
)
_SECRET: Final = "scale-benchmark-unsubscribe-secret-0123456789"  # noqa: S105 (a benchmark's own)
_DISPATCH_USERS: Final = 500


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


@contextmanager
def schema(dsn: str) -> Iterator[str]:
    """A schema of its own on ``dsn``, dropped after; yields a DSN that works in it."""
    import asyncpg

    name = f"scale_{uuid.uuid4().hex[:12]}"

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run(f"CREATE SCHEMA {name}"))
    try:
        yield f"{dsn}?search_path={name}"
    finally:
        asyncio.run(run(f"DROP SCHEMA {name} CASCADE"))


def start(label: str, data_dir: Path, log_dir: Path, env: dict[str, str], workers: int = 1) -> ServerProcess:
    server = ServerProcess(
        label,
        [
            sys.executable,
            "-m",
            "sendtime.server",
            "serve",
            *(["--workers", str(workers)] if workers > 1 else []),
        ],
        ready=_READY,
        log_path=log_dir / f"{label}.log",
        env={
            "SENDTIME_GRPC__HOST": "127.0.0.1",
            "SENDTIME_GRPC__PORT": "0",
            "SENDTIME_HTTP__HOST": "127.0.0.1",
            "SENDTIME_HTTP__PORT": "0",
            "SENDTIME_STORAGE__DATA_DIR": str(data_dir),
            "SENDTIME_LOG_LEVEL": "WARNING",
            "SENDTIME_DELIVERY__UNSUBSCRIBE_SECRET": _SECRET,
            **env,
        },
        start_timeout_s=60.0,
    )
    server.start()
    return server


_TICK: Final = os.sysconf("SC_CLK_TCK")


def _cpu_by_group(server_pid: int) -> dict[str, float]:
    """CPU seconds so far of the live processes, grouped: ``server`` (the
    sendtime process and its workers), ``postgres`` (every backend and the
    WAL writer, checkpointer...), and ``machine`` (every core's busy time,
    other engineers' processes included: a busy machine shows here)."""
    parents: dict[int, int] = {}
    ticks: dict[int, tuple[str, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        parents[int(entry)] = int(fields[1])
        ticks[int(entry)] = (comm, int(fields[11]) + int(fields[12]))
    groups = {"server": 0.0, "postgres": 0.0}
    for pid, (comm, used) in ticks.items():
        ancestor = pid
        while ancestor not in (0, 1, server_pid) and ancestor in parents:
            ancestor = parents[ancestor]
        if ancestor == server_pid:
            groups["server"] += used / _TICK
        elif comm.startswith("postgres"):
            groups["postgres"] += used / _TICK
    cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    groups["machine"] = (sum(int(v) for v in cpu) - int(cpu[3]) - int(cpu[4])) / _TICK
    return groups


def wrk(script: str, url: str, args: argparse.Namespace, server_pid: int) -> dict[str, float]:
    """wrk's requests/s and non-2xx count for ``script`` against ``url``, and
    the cores (CPU seconds per second) that wrk, the sendtime processes,
    PostgreSQL and the whole machine used meanwhile."""
    before = _cpu_by_group(server_pid)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    done = subprocess.run(
        [
            "wrk",
            f"-t{args.wrk_threads}",
            f"-c{args.connections}",
            f"-d{args.duration:.0f}s",
            "--timeout",
            "10s",
            "-s",
            str(LUA / script),
            url,
        ],
        capture_output=True,
        text=True,
        timeout=args.duration + 60,
        check=True,
    )
    wall = time.monotonic() - started
    after = _cpu_by_group(server_pid)
    finished = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = finished.ru_utime + finished.ru_stime - children.ru_utime - children.ru_stime
    cores = {f"{group}_cores": round((after[group] - before[group]) / wall, 2) for group in after}
    out = done.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    if rps is None:
        raise RuntimeError(f"wrk printed no rate:\n{out}\n{done.stderr}")
    return {
        "rps": float(rps.group(1)),
        "requests": float(total.group(1)) if total else 0.0,
        "non_2xx": float(non_2xx.group(1)) if non_2xx else 0.0,
        "socket_errors": 1.0 if errors else 0.0,
        "wrk_cores": round(used / wall, 2),
        **cores,
    }


def _cores(figures: dict[str, float]) -> str:
    return ", ".join(f"{k.removesuffix('_cores')} {v}" for k, v in figures.items() if k.endswith("_cores"))


def stream_load(server: ServerProcess, args: argparse.Namespace, label: str) -> LoadResult:
    assert server.match is not None
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.load",
            "grpc",
            "--target",
            f"{server.match['grpc']}:{server.match['grpc_port']}",
            "--label",
            label,
            "--duration",
            str(args.duration),
            "--concurrency",
            str(args.streams),
            "--server-pid",
            str(server.pid),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        timeout=args.duration + 120,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the stream load generator for {label} failed (exit {done.returncode})")
    return msgspec.json.decode(lines[-1], type=LoadResult)


def stored_events(dsn: str) -> int:
    """Message ids stored in ``dsn``'s schema: every acked event is new, so
    about wrk's requests x 100 (a few rounds more: in flight when wrk stopped).
    Far fewer would mean the generator sent ids twice, and events/s counted
    duplicates."""
    import asyncpg

    async def count() -> int:
        conn = await asyncpg.connect(dsn)
        try:
            return int(await conn.fetchval("SELECT count(*) FROM message_ids"))
        finally:
            await conn.close()

    return asyncio.run(count())


def measure(label: str, server: ServerProcess, args: argparse.Namespace, dsn: str | None) -> dict[str, Any]:
    assert server.match is not None
    http = server.match["http"]
    progress(f"{label}: batch API (wrk)")
    batch = wrk("batch.lua", http, args, server.pid)
    progress(f"{label}: {batch['rps'] * 100:,.0f} events/s; cores: {_cores(batch)}")
    figures = {
        "events_per_s": round(batch["rps"] * 100, 1),
        "batch_events_acked": batch["requests"] * 100,
        **({"batch_events_stored": stored_events(dsn)} if dsn else {}),
        "batch_non_2xx": batch["non_2xx"],
        # CPU per event of each process group, in microseconds (cores / events per second)
        **{
            f"batch_{key.removesuffix('_cores')}_us_per_event": round(value / (batch["rps"] * 100) * 1e6, 1)
            for key, value in batch.items()
            if key.endswith("_cores") and batch["rps"]
        },
        **{f"batch_{key}": value for key, value in batch.items() if key.endswith("_cores")},
    }
    if args.batch_only:
        return figures
    progress(f"{label}: StreamEvents (benchmarks.load)")
    stream = stream_load(server, args, label)
    progress(f"{label}: {stream.events_per_s:,.0f} events/s")
    progress(f"{label}: first-touch content (wrk)")
    content = wrk("content.lua", http, args, server.pid)
    progress(f"{label}: {content['rps']:,.0f} calls/s")
    return {
        **figures,
        "stream_events_per_s": stream.events_per_s,
        "stream_unacked": stream.unacked,
        "stream_errors": stream.errors,
        "content_calls_per_s": content["rps"],
        "content_non_2xx": content["non_2xx"],
    }


def dispatch(dsn: str, data_dir: Path, log_dir: Path, args: argparse.Namespace) -> dict[str, int]:
    """500 abandoned carts relayed by two workers to aiosmtpd: lost and duplicates."""
    import aiohttp
    import asyncpg

    from tests.integration.smtp_server import SmtpServer

    smtp = SmtpServer()
    smtp.start()
    config = data_dir / "dispatch.toml"
    data_dir.mkdir(parents=True, exist_ok=True)
    config.write_text(
        f"""
[delivery]
public_base_url = "https://mail.example.com"
frequency_cap_count = 0
poll_interval_ms = 100
max_concurrent_sends = 32
[delivery.relay]
kind = "smtp"
host = "127.0.0.1"
port = {smtp.port}
tls = "off"

[[flows]]
id = "abandoned_cart"
template = "abandoned_cart"
entry_event = "Product Added"
entry_key = "cart_id"
delay_s = 2.0
exit_events = ["Order Completed"]
require_blocks = ["cart"]
"""
    )
    env = {"SENDTIME_STORAGE__BACKEND": "postgres", "SENDTIME_STORAGE__POSTGRES_DSN": dsn}
    server = ServerProcess(
        "dispatch",
        [sys.executable, "-m", "sendtime.server", "serve", "--workers", "2", "--config", str(config)],
        ready=_READY,
        log_path=log_dir / "dispatch.log",
        env={
            "SENDTIME_GRPC__PORT": "0",
            "SENDTIME_HTTP__PORT": "0",
            "SENDTIME_STORAGE__DATA_DIR": str(data_dir),
            "SENDTIME_LOG_LEVEL": "WARNING",
            "SENDTIME_DELIVERY__UNSUBSCRIBE_SECRET": _SECRET,
            **env,
        },
        start_timeout_s=60.0,
    )
    server.start()

    async def run() -> dict[str, int]:
        assert server.match is not None
        async with aiohttp.ClientSession() as session:
            for first in range(0, _DISPATCH_USERS, 100):
                events: list[dict[str, Any]] = []
                for n in range(first, first + 100):
                    events.append(
                        {
                            "type": "identify",
                            "messageId": f"di{n}",
                            "userId": f"d{n}",
                            "traits": {"email": f"d{n}@example.com", "consent": {"marketing": "opted_in"}},
                        }
                    )
                    events.append(
                        {
                            "type": "track",
                            "messageId": f"da{n}",
                            "userId": f"d{n}",
                            "event": "Product Added",
                            "properties": {
                                "cart_id": f"c{n}",
                                "product_id": "kettle-steel",
                                "name": "Kettle",
                                "price": 70,
                                "quantity": 1,
                            },
                        }
                    )
                async with session.post(
                    f"{server.match['http']}/v1/batch",
                    json={"batch": events},
                    headers={"Authorization": "Basic ZGV2LWtleTo="},
                ) as response:
                    assert response.status == 200, await response.text()
        conn = await asyncpg.connect(dsn)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                done = await conn.fetchval(
                    "SELECT count(*) FROM sends WHERE status IN ('sent', 'failed', 'skipped', 'uncertain')"
                )
                if done >= _DISPATCH_USERS:
                    break
                await asyncio.sleep(0.2)
        finally:
            await conn.close()
        await asyncio.to_thread(time.sleep, 1.0)
        recipients = [r for _, rcpts in smtp.inbox.envelopes for r in rcpts]
        return {
            "dispatch_sends": _DISPATCH_USERS,
            "dispatch_received": len(set(recipients)),
            "dispatch_lost": _DISPATCH_USERS - len(set(recipients)),
            "dispatch_duplicates": len(recipients) - len(set(recipients)),
        }

    try:
        return asyncio.run(run())
    finally:
        server.stop()
        smtp.stop()


def _ratio(result: dict[str, Any], a: str, b: str) -> float | None:
    return (
        round(result[f"{a}_events_per_s"] / result[f"{b}_events_per_s"], 3)
        if result[f"{b}_events_per_s"]
        else None
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument(
        "--batch-only", action="store_true", help="only the batch API (for quick experiments; no targets)"
    )
    parser.add_argument("--dsn", default=os.environ.get("SENDTIME_TEST_POSTGRES_DSN", DSN))
    args = parser.parse_args()
    started = time.monotonic()
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sendtime-scale-") as tmp:
        root = Path(tmp)
        postgres = {"SENDTIME_STORAGE__BACKEND": "postgres"}
        runs: list[tuple[str, dict[str, str], int]] = [
            ("sqlite", {}, 1),
            ("pg1", postgres, 1),
            ("pg2", postgres, 2),
        ]
        for label, env, workers in runs:
            with schema(args.dsn) as dsn:
                full = {**env, "SENDTIME_STORAGE__POSTGRES_DSN": dsn} if env else env
                server = start(label, root / label, root, full, workers)
                try:
                    figures = measure(label, server, args, dsn if env else None)
                finally:
                    server.stop()
            result.update({f"{label}_{key}": value for key, value in figures.items()})
        if args.batch_only:
            result.update(
                pg2_over_pg1=_ratio(result, "pg2", "pg1"), pg2_over_sqlite=_ratio(result, "pg2", "sqlite")
            )
            print(msgspec.json.encode(result).decode())
            return
        with schema(args.dsn) as dsn:
            progress("pg2: dispatch of 500 sends to aiosmtpd")
            result.update(dispatch(dsn, root / "dispatch", root, args))
    for kind in ("events_per_s", "stream_events_per_s", "content_calls_per_s"):
        pg1, pg2, sqlite = (result[f"{label}_{kind}"] for label in ("pg1", "pg2", "sqlite"))
        suffix = "" if kind == "events_per_s" else "_" + kind.removesuffix("_per_s")
        result[f"pg2_over_pg1{suffix}"] = round(pg2 / pg1, 3) if pg1 else None
        result[f"pg2_over_sqlite{suffix}"] = round(pg2 / sqlite, 3) if sqlite else None
    result["targets"] = TARGETS
    result["meets_targets"] = (
        (result["pg2_over_pg1"] or 0) >= TARGETS["pg2_over_pg1"]
        and (result["pg2_over_sqlite"] or 0) >= TARGETS["pg2_over_sqlite"]
        and result["dispatch_lost"] == 0
        and result["dispatch_duplicates"] == 0
    )
    result["duration_s"] = args.duration
    result["cpu_count"] = os.cpu_count()
    result["wall_s"] = round(time.monotonic() - started, 1)
    if args.json:
        print(msgspec.json.encode(result).decode())
    else:
        for key, value in result.items():
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
