"""Benchmark: durable event intake, sendtime beside a plain FastAPI + pydantic
+ SQLite intake, in one invocation.

What it measures:

1. sendtime HTTP: Segment ``POST /v1/batch`` bodies of 100 events (Product
   Viewed / Product Added / Checkout Started / Order Completed from 10,000
   users; benchmarks.workload), each event with its own fresh message id, sent
   by Debian's wrk (one thread, --connections connections, a Lua script that
   builds each body; benchmarks.harness) on core 1 to ``sendtime serve`` on
   core 0 (own process, uvloop, data in a temporary folder, free ports). A
   batch is answered once its events are committed to SQLite (WAL, group
   commit, synchronous=full by default).
2. baseline: the same requests from the same wrk script to
   benchmarks.baseline_ingest on core 0: FastAPI + pydantic + SQLite (WAL,
   synchronous=FULL, one transaction per request, answered after commit, the
   message id unique), one process.
3. sendtime gRPC: bidirectional StreamEvents streams from the project's Python
   generator (benchmarks.load, on core 1), messages of 100 events with at most
   --window events un-acked per stream: what a Python client pushes through.

For each: events acknowledged per second, request (or ack) latency p50/p99,
and the server's CPU per event. It checks that no request failed and, after a
graceful stop, that each store holds every event of every answered batch (and
none beyond what was sent).

    python -m benchmarks.ingest [--json] [--quick] [--duration S] [--connections N] [--py-spy DIR]

Progress goes to stderr. With --json the last stdout line is one JSON object:
http_batch_events_per_s_wrk, baseline_batch_events_per_s, http_batch_vs_baseline
(target >= 2), server CPU per event (server_cpu_us_per_event, baseline's
beside it), latencies, events_per_s (gRPC StreamEvents), the checks, targets,
meets_targets and every run's details. The machine is small and shared:
compare the ratio, not absolute rates, across runs (GUIDE.md section 5).
"""

from __future__ import annotations

import argparse
import re
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Final

import msgspec

from benchmarks.harness import (
    LOAD_CORES,
    SERVER_CORES,
    WRK_DONE,
    WrkResult,
    checks_line,
    lua_string,
    machine,
    ms,
    pinned,
    progress,
    py_spy,
    ratio,
    report,
    require_wrk,
    run_wrk,
    version,
    work_dir,
)
from benchmarks.load import LoadResult
from benchmarks.servers import REPO, ServerProcess, sendtime_server
from benchmarks.workload import make_events, segment_templates

TARGETS: Final = {"http_batch_vs_baseline": 2.0}
EVENTS_PER_BATCH: Final = 100
_BASELINE_READY: Final = re.compile(r"baseline ingest serving HTTP on (?P<http>http://\S+:\d+)")
#: Basic auth with the write key "dev-key" as the user name, as Segment's clients send it
_BASIC_DEV_KEY: Final = "Basic ZGV2LWtleTo="


def batch_script(templates: int, users: int, seed: int = 1) -> str:
    """wrk's script: each request a /v1/batch body of EVENTS_PER_BATCH events
    cycling through ``templates`` Segment track messages, each with a message
    id never sent before (a run prefix, the request's number, the event's)."""
    cut = segment_templates(make_events(templates, users=users, seed=seed))
    heads = ",\n".join(lua_string(t.head.decode()) for t in cut)
    tails = ",\n".join(lua_string(t.tail.decode()) for t in cut)
    prefix = uuid.uuid4().hex[:16]
    return f"""\
local heads = {{
{heads}
}}
local tails = {{
{tails}
}}
local count, per, prefix = #heads, {EVENTS_PER_BATCH}, {lua_string(prefix)}
local cursor, n = 0, 0
used, wraps = 0, 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = {lua_string(_BASIC_DEV_KEY)}

function request()
  n = n + 1
  used = used + 1
  local parts = {{}}
  for k = 1, per do
    cursor = cursor % count + 1
    parts[k] = heads[cursor] .. prefix .. string.format("-%08x-%03d", n, k) .. tails[cursor]
  end
  return wrk.format(nil, "/v1/batch", nil, '{{"batch":[' .. table.concat(parts, ",") .. ']}}')
end
{WRK_DONE}"""


def count_rows(db: Path, table: str = "events") -> int | None:
    if not db.exists():
        return None
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()  # noqa: S608 (a fixed table name)
    return int(row[0])


def grpc_run(args: argparse.Namespace, server: ServerProcess) -> LoadResult:
    """benchmarks.load's StreamEvents streams against ``server``, on the load core."""
    assert server.match is not None
    argv = [
        sys.executable,
        "-m",
        "benchmarks.load",
        "grpc",
        "--target",
        f"{server.match['grpc']}:{server.match['grpc_port']}",
        "--window",
        str(args.window),
        "--label",
        "sendtime-grpc",
        "--duration",
        str(args.duration),
        "--warmup",
        str(args.warmup),
        "--concurrency",
        str(args.streams),
        "--events-per-message",
        str(EVENTS_PER_BATCH),
        "--server-pid",
        str(server.pid),
    ]
    with py_spy(args.py_spy, "sendtime-grpc", server.pid, args.warmup + args.duration):
        done = subprocess.run(
            pinned(argv, LOAD_CORES),
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            timeout=args.warmup + args.duration + 120,
            check=False,
        )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the gRPC load generator failed (exit {done.returncode})")
    result = msgspec.json.decode(lines[-1], type=LoadResult)
    progress(f"sendtime-grpc: {result.events_per_s:,.0f} events/s, p99 ack {ms(result.p99_ack_ms)}")
    return result


def _stored_ok(stored: int | None, run: WrkResult) -> bool:
    """Every event of every answered batch is stored, and none beyond those sent
    (a batch in flight when wrk stopped may or may not have been committed)."""
    return stored is not None and run.ok * EVENTS_PER_BATCH <= stored <= run.used * EVENTS_PER_BATCH


def run(args: argparse.Namespace) -> dict[str, Any]:
    require_wrk()
    started = time.monotonic()
    about = machine()
    script = batch_script(args.templates, args.users)
    with work_dir(args.keep, "sendtime-ingest-bench-") as tmp:

        def wrk(label: str, url: str, pid: int) -> WrkResult:
            with py_spy(args.py_spy, label, pid, args.duration):
                return run_wrk(
                    label,
                    url,
                    script,
                    work_dir=tmp,
                    duration_s=args.duration,
                    connections=args.connections,
                    server_pid=pid,
                )

        data_dir = tmp / "data"
        (tmp / "sendtime").mkdir()
        server = sendtime_server(data_dir, tmp / "sendtime", cores=SERVER_CORES)
        with server:
            assert server.match is not None
            progress(
                f"sendtime (pid {server.pid}, core {SERVER_CORES}): /v1/batch of {EVENTS_PER_BATCH} events,"
                f" wrk with {args.connections} connections on core {LOAD_CORES}"
            )
            http = wrk("sendtime-http-wrk", server.match["http"], server.pid)
            grpc = grpc_run(args, server) if not args.quick else None
            progress("stopping sendtime gracefully (SIGTERM)")
        sendtime_exit = server.exit_code
        stored = count_rows(data_dir / "sendtime.sqlite3")

        baseline_db = tmp / "baseline.sqlite3"
        baseline = ServerProcess(
            "baseline ingest",
            [sys.executable, "-m", "benchmarks.baseline_ingest", "--db", str(baseline_db), "--port", "0"],
            ready=_BASELINE_READY,
            log_path=tmp / "baseline.log",
            cores=SERVER_CORES,
        )
        with baseline:
            assert baseline.match is not None
            progress(
                f"baseline: FastAPI + pydantic + SQLite (pid {baseline.pid}, core {SERVER_CORES}), same wrk load"
            )
            base = wrk("baseline-http-wrk", baseline.match["http"], baseline.pid)
        baseline_exit = baseline.exit_code
        baseline_stored = count_rows(baseline_db)

    http_events = round(http.rps * EVENTS_PER_BATCH, 1)
    base_events = round(base.rps * EVENTS_PER_BATCH, 1)
    vs = ratio(http_events, base_events)
    grpc_accepted = grpc.accepted if grpc else 0
    checks = {
        "http_no_errors": not http.errors and http.ok > 0,
        "baseline_no_errors": not base.errors and base.ok > 0,
        "grpc_acked_exactly_once_all_accepted": grpc is None or grpc.correct,
        "sendtime_stored_every_answered_event": _stored_ok(
            None if stored is None else stored - grpc_accepted, http
        ),
        "baseline_stored_every_answered_event": _stored_ok(baseline_stored, base),
        # uvicorn exits by re-raising the SIGTERM it was stopped with
        "servers_stopped_cleanly": sendtime_exit == 0 and baseline_exit in (0, -signal.SIGTERM),
    }

    def per_event(us_per_request: float | None) -> float | None:
        return None if us_per_request is None else round(us_per_request / EVENTS_PER_BATCH, 2)

    return {
        "http_batch_events_per_s_wrk": http_events,
        "baseline_batch_events_per_s": base_events,
        "http_batch_vs_baseline": vs,
        "server_cpu_us_per_event": per_event(http.server_cpu_us_per_request),
        "baseline_cpu_us_per_event": per_event(base.server_cpu_us_per_request),
        "http_p50_batch_ms": http.p50_ms,
        "http_p99_batch_ms": http.p99_ms,
        "baseline_p50_batch_ms": base.p50_ms,
        "baseline_p99_batch_ms": base.p99_ms,
        "server_cpu_pct": http.server_cpu_pct,
        "baseline_cpu_pct": base.server_cpu_pct,
        "events_per_s": grpc.events_per_s if grpc else None,
        "p50_ack_ms": grpc.p50_ack_ms if grpc else None,
        "p99_ack_ms": grpc.p99_ack_ms if grpc else None,
        "events_per_batch": EVENTS_PER_BATCH,
        "connections": args.connections,
        "streams": args.streams,
        "window_events_per_stream": args.window,
        "duration_s": args.duration,
        "users": args.users,
        "templates": args.templates,
        "storage_synchronous": "full (sendtime's default; the baseline's too)",
        "pinning": {"server_cores": SERVER_CORES, "load_cores": LOAD_CORES},
        "quick": args.quick,
        "stored_events": stored,
        "baseline_stored_events": baseline_stored,
        "correct": all(checks.values()),
        "checks": checks,
        "targets": TARGETS,
        "meets_targets": {"http_batch_vs_baseline": vs >= TARGETS["http_batch_vs_baseline"]},
        "machine": about,
        "python": about["python"],
        "cpu_count": about["cpu_count"],
        "platform": about["platform"],
        "fastapi": version("fastapi"),
        "wall_s": round(time.monotonic() - started, 1),
        "runs": {
            "sendtime_http_wrk": msgspec.to_builtins(http),
            "baseline_http_wrk": msgspec.to_builtins(base),
            "sendtime_grpc": msgspec.to_builtins(grpc) if grpc else None,
        },
    }


def summary(result: dict[str, Any]) -> str:
    mark = "meets" if result["meets_targets"]["http_batch_vs_baseline"] else "MISSES"
    lines = [
        f"sendtime ingest benchmark (/v1/batch of {result['events_per_batch']} events, wrk with"
        f" {result['connections']} connections on core {result['pinning']['load_cores']}, servers on core"
        f" {result['pinning']['server_cores']}, {result['duration_s']:g} s each)",
        f"  sendtime /v1/batch : {result['http_batch_events_per_s_wrk']:>10,.0f} events/s"
        f"  p50 {ms(result['http_p50_batch_ms'])}  p99 {ms(result['http_p99_batch_ms'])}"
        f"  CPU {result['server_cpu_us_per_event']} us/event",
        f"  baseline           : {result['baseline_batch_events_per_s']:>10,.0f} events/s"
        f"  p50 {ms(result['baseline_p50_batch_ms'])}  p99 {ms(result['baseline_p99_batch_ms'])}"
        f"  CPU {result['baseline_cpu_us_per_event']} us/event",
        f"  vs baseline        : {result['http_batch_vs_baseline']:>10.3f}  ({mark} target"
        f" {TARGETS['http_batch_vs_baseline']:g})",
        f"  gRPC StreamEvents  : {result['events_per_s'] or 0:>10,.0f} events/s (Python generator)"
        f"  p99 ack {ms(result['p99_ack_ms'])}",
        checks_line(result, "  checks             "),
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ingest",
        description="Durable /v1/batch intake: sendtime vs a plain FastAPI + pydantic + SQLite service.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 1 s runs, no gRPC run")
    parser.add_argument("--duration", type=float, default=None, help="measured seconds per run (default 10)")
    parser.add_argument("--warmup", type=float, default=1.0, help="the gRPC run's unmeasured seconds")
    parser.add_argument("--connections", type=int, default=16, help="wrk's connections (default 16)")
    parser.add_argument("--streams", type=int, default=4, help="concurrent StreamEvents streams (gRPC run)")
    parser.add_argument("--window", type=int, default=1000, help="un-acked events allowed per stream")
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument(
        "--templates", type=int, default=2000, help="distinct events the bodies cycle through"
    )
    parser.add_argument("--py-spy", metavar="DIR", help="sample the servers with py-spy into DIR")
    parser.add_argument("--keep", metavar="DIR", help="keep server logs and data in DIR (emptied first)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.duration is None:
        args.duration = 1.0 if args.quick else 10.0
    result = run(args)
    return report(result, summary, as_json=args.json, passed=result["correct"])


if __name__ == "__main__":
    sys.exit(main())
