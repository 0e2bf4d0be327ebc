"""Benchmark: durable event intake, sendtime against this machine's gRPC baseline.

What it measures, in one invocation and with one load generator
(benchmarks.load, always in a process of its own):

1. echo: a trivial gRPC server (benchmarks.echo_server, own process) with
   sendtime's StreamEvents shape that acks every event without decoding its
   properties or storing it: what grpc.aio and uvloop allow on this machine.
2. sendtime gRPC: ``sendtime serve`` (own process, uvloop, data in a temporary
   folder, free ports) under the same load: several concurrent bidirectional
   StreamEvents streams, each sending messages of N Segment e-commerce events
   (Product Viewed / Product Added / Checkout Started / Order Completed from
   10,000 users, each with a fresh uuid4-shaped message id) with at most W
   events un-acked per stream. An ack comes only once its event is committed
   to SQLite (WAL, group commit, synchronous=full by default).
3. sendtime HTTP: Segment ``POST /v1/batch`` bodies of N events over several
   concurrent aiohttp connections, against the same server.

For each: events acked per second over --duration seconds (after a warm-up),
and per-event ack latency p50/p99 (from just before its message was written to
the receipt of its ack; for HTTP, the batch's response time). It checks, while
at it, that every sent message id was acked exactly once and accepted, and
after a graceful stop that the store holds exactly the accepted events.

    python -m benchmarks.ingest [--json] [--duration S] [--py-spy DIR]

Progress goes to stderr. With --json the last stdout line is one JSON object:
events_per_s, echo_events_per_s, ratio (= events_per_s / echo_events_per_s),
p50_ack_ms, p99_ack_ms, http_batch_events_per_s, events_per_message, streams,
duration_s, the checks, CPU use per process and the full per-run figures.
The machine is small and shared: compare the ratio, not absolute times, across
runs (GUIDE.md section 5).
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import msgspec

from benchmarks.load import LoadResult
from benchmarks.servers import REPO, ServerProcess, echo_server, sendtime_server

TARGETS: Final = {"events_per_s": 20_000.0, "ratio": 0.5, "http_batch_events_per_s": 15_000.0}


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def run_load(args: argparse.Namespace, transport: str, label: str, server: ServerProcess) -> LoadResult:
    """Runs benchmarks.load against ``server`` in a new process; returns its result."""
    assert server.match is not None
    if transport == "grpc":
        where = [
            "--target",
            f"{server.match['grpc']}:{server.match['grpc_port']}",
            "--window",
            str(args.window),
        ]
        concurrency, size = args.streams, args.events_per_message
    else:
        where = ["--url", server.match["http"]]
        concurrency, size = args.http_connections, args.http_batch
    argv = [
        sys.executable,
        "-m",
        "benchmarks.load",
        transport,
        *where,
        "--label",
        label,
        "--duration",
        str(args.duration),
        "--warmup",
        str(args.warmup),
        "--concurrency",
        str(concurrency),
        "--events-per-message",
        str(size),
        "--users",
        str(args.users),
        "--server-pid",
        str(server.pid),
    ]
    with _py_spy(args, label, server.pid):
        done = subprocess.run(
            argv,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            timeout=args.warmup + args.duration + 120,
            check=False,
        )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the load generator for {label} failed (exit {done.returncode})")
    return msgspec.json.decode(lines[-1], type=LoadResult)


@contextmanager
def _py_spy(args: argparse.Namespace, label: str, pid: int) -> Iterator[None]:
    """With --py-spy DIR, samples the server while the load runs (collapsed stacks)."""
    if not args.py_spy:
        yield
        return
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out = Path(args.py_spy) / f"{label}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    seconds = int(args.warmup + args.duration + 1)
    argv = [py_spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "200"]
    argv += ["--format", "raw", "--threads", "--nonblocking", "--output", str(out)]
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        try:
            spy.wait(seconds + 30)
        except subprocess.TimeoutExpired:
            spy.kill()
    if out.exists():
        progress(f"py-spy samples of {label} in {out}")
        for line in summarize_stacks(out.read_text()):
            progress(f"  {line}")


def summarize_stacks(collapsed: str, top: int = 15) -> list[str]:
    """The functions with the most samples on top of the stack (self time), and
    per thread, from py-spy's collapsed output."""
    own: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        total += int(count)
        threads[frames[0]] += int(count)
        own[frames[-1]] += int(count)
    if not total:
        return ["no samples"]
    lines = [f"{n / total:6.1%} thread {name}" for name, n in threads.most_common(5)]
    lines += [f"{n / total:6.1%} self {name}" for name, n in own.most_common(top)]
    return lines


def stored_events(data_dir: Path) -> int | None:
    path = data_dir / "sendtime.sqlite3"
    if not path.exists():
        return None
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        row = conn.execute("SELECT count(*) FROM events").fetchone()
    return int(row[0])


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else 0.0


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sendtime-bench-") as tmp:
        tmp_path = Path(tmp)
        progress(f"echo baseline: {args.streams} streams x {args.events_per_message} events per message")
        with echo_server(tmp_path) as echo:
            echo_run = run_load(args, "grpc", "echo", echo)
        data_dir = tmp_path / "data"
        overrides = {"SENDTIME_STORAGE__SYNCHRONOUS": args.synchronous} if args.synchronous else {}
        server = sendtime_server(data_dir, tmp_path, overrides)
        with server:
            progress(f"sendtime (pid {server.pid}) gRPC stream: same load")
            grpc_run = run_load(args, "grpc", "sendtime-grpc", server)
            progress(
                f"sendtime HTTP /v1/batch: {args.http_connections} connections x {args.http_batch} events"
            )
            http_run = run_load(args, "http", "sendtime-http", server)
            progress("stopping sendtime gracefully (SIGTERM)")
        exit_code = server.exit_code
        stored = stored_events(data_dir)

    accepted = grpc_run.accepted + http_run.accepted
    checks = {
        "echo_acked_exactly_once": echo_run.correct,
        "grpc_acked_exactly_once_all_accepted": grpc_run.correct,
        "http_acked_exactly_once_all_accepted": http_run.correct,
        "stored_events_equal_accepted": stored == accepted,
        "server_stopped_cleanly": exit_code == 0,
    }
    result: dict[str, Any] = {
        "events_per_s": grpc_run.events_per_s,
        "echo_events_per_s": echo_run.events_per_s,
        "ratio": _ratio(grpc_run.events_per_s, echo_run.events_per_s),
        "p50_ack_ms": grpc_run.p50_ack_ms,
        "p99_ack_ms": grpc_run.p99_ack_ms,
        "echo_p50_ack_ms": echo_run.p50_ack_ms,
        "echo_p99_ack_ms": echo_run.p99_ack_ms,
        "http_batch_events_per_s": http_run.events_per_s,
        "http_p50_batch_ms": http_run.p50_ack_ms,
        "http_p99_batch_ms": http_run.p99_ack_ms,
        "events_per_message": args.events_per_message,
        "streams": args.streams,
        "window_events_per_stream": args.window,
        "http_connections": args.http_connections,
        "http_events_per_batch": args.http_batch,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "users": args.users,
        "storage_synchronous": args.synchronous or "full (default)",
        "server_cpu_pct": grpc_run.server_cpu_pct,
        "echo_server_cpu_pct": echo_run.server_cpu_pct,
        "http_server_cpu_pct": http_run.server_cpu_pct,
        "generator_cpu_pct": grpc_run.generator_cpu_pct,
        "machine_busy_pct": grpc_run.machine_busy_pct,
        "correct": all(checks.values()),
        "checks": checks,
        "stored_events": stored,
        "accepted_events": accepted,
        "targets": TARGETS,
        "meets_targets": {
            "events_per_s": grpc_run.events_per_s >= TARGETS["events_per_s"],
            "ratio": _ratio(grpc_run.events_per_s, echo_run.events_per_s) >= TARGETS["ratio"],
            "http_batch_events_per_s": http_run.events_per_s >= TARGETS["http_batch_events_per_s"],
        },
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "grpcio": _version("grpcio"),
        "uvloop": _version("uvloop"),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "wall_s": round(time.monotonic() - started, 1),
        "runs": {
            "echo": msgspec.to_builtins(echo_run),
            "sendtime_grpc": msgspec.to_builtins(grpc_run),
            "sendtime_http": msgspec.to_builtins(http_run),
        },
    }
    if stored is None or stored != accepted:
        progress(f"store holds {stored} events; {accepted} were accepted")
    if exit_code != 0:
        progress(f"sendtime exited with {exit_code}:\n{server.log_tail()}")
    return result


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f} ms"


def summary(result: dict[str, Any]) -> str:
    meets = result["meets_targets"]

    def mark(key: str) -> str:
        return "meets" if meets[key] else "MISSES"

    lines = [
        "sendtime ingest benchmark"
        f" ({result['streams']} streams x {result['events_per_message']} events/message,"
        f" window {result['window_events_per_stream']} events/stream, {result['duration_s']:g} s each)",
        f"  echo baseline gRPC : {result['echo_events_per_s']:>10,.0f} events/s"
        f"  p50 {_ms(result['echo_p50_ack_ms'])}  p99 {_ms(result['echo_p99_ack_ms'])}",
        f"  sendtime gRPC      : {result['events_per_s']:>10,.0f} events/s"
        f"  p50 {_ms(result['p50_ack_ms'])}  p99 {_ms(result['p99_ack_ms'])}"
        f"  ({mark('events_per_s')} target {TARGETS['events_per_s']:,.0f})",
        f"  ratio              : {result['ratio']:>10.3f}  ({mark('ratio')} target {TARGETS['ratio']})",
        f"  sendtime HTTP batch: {result['http_batch_events_per_s']:>10,.0f} events/s"
        f"  p50 {_ms(result['http_p50_batch_ms'])}  p99 {_ms(result['http_p99_batch_ms'])}"
        f"  ({mark('http_batch_events_per_s')} target {TARGETS['http_batch_events_per_s']:,.0f})",
        f"  server CPU         : {result['server_cpu_pct']}% (echo {result['echo_server_cpu_pct']}%)"
        f" of one core; generator {result['generator_cpu_pct']}%; machine busy {result['machine_busy_pct']}%",
        f"  checks             : {'all passed' if result['correct'] else 'FAILED'}"
        + "".join(f"\n    {'ok  ' if ok else 'FAIL'} {name}" for name, ok in result["checks"].items()),
        f"  Python {result['python']}, {result['cpu_count']} CPUs, grpcio {result['grpcio']}",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ingest",
        description="Event intake throughput and ack latency: sendtime vs a trivial gRPC echo server.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per run (default 10)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each run")
    parser.add_argument("--streams", type=int, default=4, help="concurrent StreamEvents streams")
    parser.add_argument("--events-per-message", type=int, default=100, help="events per stream message")
    parser.add_argument("--window", type=int, default=1000, help="un-acked events allowed per stream")
    parser.add_argument("--http-connections", type=int, default=4)
    parser.add_argument("--http-batch", type=int, default=100, help="events per /v1/batch body")
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument(
        "--synchronous", choices=("full", "normal"), default=None, help="sendtime's storage.synchronous"
    )
    parser.add_argument("--py-spy", metavar="DIR", help="sample the servers with py-spy into DIR")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    if args.json:
        print(msgspec.json.encode(result).decode(), flush=True)
    else:
        print(summary(result))
    return 0 if result["correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
