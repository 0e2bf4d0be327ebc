"""Benchmark: send-time content under a deadline, sendtime against this
machine's unary gRPC baseline.

What it measures, in one invocation, with one load generator
(benchmarks.content_load: grpc.aio under uvloop, always in a process of its
own) at the same concurrency (64 calls in flight) for every run:

(c) echo: a trivial unary gRPC server (benchmarks.content_echo, own process)
    with ContentService's shape that answers every GetContent with one fixed
    small response: what grpc.aio and uvloop allow on this machine. It runs
    first and last; echo_rps is the mean of the two (both are reported, so
    drift on this shared machine shows).
(a) warm: ``sendtime serve`` (own process, uvloop, data in a temporary folder,
    free ports) with a few hundred shoppers seeded through IngestEvents
    (identify, product views, carts, past orders over the demo catalog;
    benchmarks.content_workload). GetContent for the built-in blocks cart,
    recommendations, recently_viewed and offers, caller deadline 200 ms, with
    the block cache warmed up first (every user's request once, then the
    warm-up): the same requests as the echo run.
(d) slow upstream: on the same server, GetContent for an upstream block
    ("loyalty", declared in a TOML config file: [[content.upstreams]] with
    timeout_s 2, ttl_s 60, on an allowed 127.0.0.1 host) whose upstream
    (benchmarks.content_upstream, aiohttp, own process) sleeps 1 s before it
    answers, plus the built-in blocks, deadline 200 ms. Every answer must come
    back within the deadline, the loyalty block stale or fallback unless a
    fetch started by an earlier call has brought it in meanwhile (sendtime
    bounds an upstream fetch by the provider's timeout_s, not by the caller's
    budget, and lets it fill the cache after that caller gave up: after about
    1 s a user's loyalty block is cached for ttl_s). deadline_misses counts
    calls that failed with DEADLINE_EXCEEDED or took longer than their
    deadline, over the whole run, warm-up included; the loyalty block's
    sources and reasons are counted over every answer.
(b) cold: ``sendtime serve`` restarted on the same data with
    content.cache_results off (SENDTIME_CONTENT__CACHE_RESULTS=false):
    RenderEmail of abandoned_cart, so every call reads the profile, computes
    cart, recommendations and offers, and renders Liquid and MJML. Its
    deadline (1 s by default) is long enough that no block falls back for lack
    of time: the blocks' sources are checked to be fresh.

For each: successful calls per second over --duration seconds (after a
warm-up), latency p50/p90/p99 at the caller (of every call in the window,
a failed one at the time it failed), the server's own time, every
block's source/reason counts, errors by status code, and CPU use.

    python -m benchmarks.content [--json] [--duration S] [--py-spy DIR] [--render-processes N]

Progress goes to stderr. With --json the last stdout line is one JSON object:
warm_rps, cold_rps, echo_rps, warm_ratio (= warm_rps / echo_rps), cold_ratio
(= cold_rps / echo_rps), warm/cold/echo/slow_upstream p50 and p99 in ms,
deadline_misses, slow_upstream_sources, the checks, meets_targets (warm_ratio
>= 0.7, cold_ratio >= 0.3, warm_p99_ms <= 20, slow_upstream_p99_ms < 200,
deadline_misses == 0) and the per-run details; the exit status is 1 when a
check fails (errors, deadline misses, blocks from the wrong source). The
machine is small and shared: compare ratios, not absolute rates, across runs
(GUIDE.md section 5).

The load generator shares the machine's two cores with the server: a Python
gRPC client costs about as much CPU per call as the echo server does (the
generator_cpu_us_per_call figures), so every rate is bounded by the two
together, and the rate ratios flatter a costlier server (its share of the
machine grows while the generator's stays). warm_cpu_ratio and cold_cpu_ratio
compare what the server itself spends, in CPU per call with its render worker
processes (echo's over sendtime's, so higher is better, 1 at parity), and do
not depend on the generator. With a fixed 64 calls in flight, a call's latency is
about 64 / rate (Little's law), so a p99 under 20 ms needs well over 3,200
calls/s whatever the server does per call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import msgspec

from benchmarks.content_load import ContentLoadResult
from benchmarks.content_workload import BUILT_IN_BLOCKS, load_catalog, seed, seed_events, user_ids
from benchmarks.ingest import summarize_stacks
from benchmarks.servers import REPO, ServerProcess, sendtime_server

TARGETS: Final[dict[str, float]] = {
    "warm_ratio": 0.7,
    "cold_ratio": 0.3,
    "warm_p99_ms": 20.0,
    "slow_upstream_p99_ms": 200.0,
    "deadline_misses": 0,
}
UPSTREAM_NAME: Final = "loyalty"
_ECHO_READY: Final = re.compile(r"content echo serving gRPC on (?P<grpc>\S+):(?P<grpc_port>\d+)")
_UPSTREAM_READY: Final = re.compile(r"upstream serving HTTP on (?P<url>http://\S+:\d+)")


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def config_toml(upstream_url: str) -> str:
    """The server's config: the slow upstream on an allowed host, and an offer rule."""
    return f"""\
[content]
allowed_upstream_hosts = ["127.0.0.1"]

[[content.upstreams]]
name = "{UPSTREAM_NAME}"
url = "{upstream_url}/{UPSTREAM_NAME}/{{user.id}}"
timeout_s = 2.0
ttl_s = 60

[[content.offers]]
id = "cart50"
code = "SAVE10"
text = "10% off carts over EUR 50"
min_cart_total = 50.0
"""


def _target(server: ServerProcess) -> str:
    assert server.match is not None
    return f"{server.match['grpc']}:{server.match['grpc_port']}"


def run_load(
    args: argparse.Namespace,
    label: str,
    server: ServerProcess,
    load_args: list[str],
    *,
    profile: bool = False,
) -> ContentLoadResult:
    """Runs benchmarks.content_load against ``server`` in a new process; returns its result."""
    method, *rest = load_args
    argv = [
        sys.executable,
        "-m",
        "benchmarks.content_load",
        method,
        "--target",
        _target(server),
        "--label",
        label,
        "--duration",
        str(args.duration),
        "--warmup",
        str(args.warmup),
        "--concurrency",
        str(args.concurrency),
        "--users",
        str(args.users),
        "--server-pid",
        str(server.pid),
        *rest,
    ]
    with _py_spy(args if profile else None, label, server.pid):
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
    result = msgspec.json.decode(lines[-1], type=ContentLoadResult)
    progress(
        f"{label}: {result.rps:,.0f} calls/s, p50 {_ms(result.p50_ms)}, p99 {_ms(result.p99_ms)},"
        f" {sum(result.errors_by_code.values())} errors, {result.deadline_misses} deadline misses"
    )
    return result


@contextmanager
def _py_spy(args: argparse.Namespace | None, label: str, pid: int) -> Iterator[None]:
    """With --py-spy DIR, samples the server while the load runs (collapsed stacks)."""
    if args is None or not args.py_spy:
        yield
        return
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out = Path(args.py_spy) / f"{label}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    seconds = max(1, int(args.warmup + args.duration))
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
            spy.wait()
    if out.exists():
        progress(f"py-spy samples of {label} in {out}")
        for line in summarize_stacks(out.read_text()):
            progress(f"  {line}")
    else:
        progress(f"py-spy recorded nothing for {label} (exit {spy.returncode})")


def _upstream_stats(url: str) -> dict[str, int]:
    try:
        with urllib.request.urlopen(f"{url}/stats", timeout=5) as response:  # noqa: S310 (loopback URL we started)
            stats: dict[str, int] = json.load(response)
    except OSError as exc:
        progress(f"could not read the upstream's stats: {exc}")
        return {}
    return stats


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else 0.0


def _count(sources: Mapping[str, int], block: str | None = None, *, keep: tuple[str, ...]) -> int:
    """Blocks (of ``block``, or of any) whose source/reason is not one of ``keep``."""
    return sum(
        n
        for key, n in sources.items()
        if (block is None or key.split(": ", 1)[0] == block) and key.split(": ", 1)[1] not in keep
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    catalog = load_catalog(REPO / "demo" / "catalog.json")
    users = user_ids(args.users)
    events = seed_events(users, catalog)
    warm_blocks = ",".join(BUILT_IN_BLOCKS)
    slow_blocks = ",".join((UPSTREAM_NAME, *BUILT_IN_BLOCKS))
    content_args = ["content", "--blocks", warm_blocks, "--deadline-ms", str(args.deadline_ms)]
    slow_args = ["content", "--blocks", slow_blocks, "--deadline-ms", str(args.deadline_ms)]
    slow_args += ["--degraded", UPSTREAM_NAME]
    render_args = ["render", "--template", args.template, "--deadline-ms", str(args.render_deadline_ms)]

    with _work_dir(args) as tmp_path:
        echo_runs: list[ContentLoadResult] = []

        def echo_run(label: str) -> None:
            progress(f"{label}: trivial unary ContentService echo, {args.concurrency} calls in flight")
            echo = ServerProcess(
                "content echo",
                [sys.executable, "-m", "benchmarks.content_echo", "--port", "0"],
                ready=_ECHO_READY,
                log_path=tmp_path / f"{label}.log",
            )
            with echo:
                echo_runs.append(run_load(args, label, echo, content_args))

        echo_run("echo-1")

        upstream = ServerProcess(
            "slow upstream",
            [
                sys.executable,
                "-m",
                "benchmarks.content_upstream",
                "--port",
                "0",
                "--delay",
                str(args.upstream_delay),
            ],
            ready=_UPSTREAM_READY,
            log_path=tmp_path / "upstream.log",
        )
        with upstream:
            assert upstream.match is not None
            upstream_url = upstream.match["url"]
            config = tmp_path / "sendtime.toml"
            config.write_text(config_toml(upstream_url))
            data_dir = tmp_path / "data"
            overrides = {"SENDTIME_CONFIG": str(config)}
            if args.render_processes is not None:
                overrides["SENDTIME_CONTENT__RENDER_PROCESSES"] = str(args.render_processes)
            if args.metrics == "off":
                overrides["SENDTIME_METRICS__ENABLED"] = "false"
            (tmp_path / "warm").mkdir()
            warm_server = sendtime_server(data_dir, tmp_path / "warm", overrides)
            with warm_server:
                target = _target(warm_server)
                progress(
                    f"sendtime (pid {warm_server.pid}) on {target}: seeding {len(events):,} events"
                    f" for {len(users)} users"
                )
                t0 = time.perf_counter()
                seeded = asyncio.run(seed(target, events))
                progress(f"seeded in {time.perf_counter() - t0:.2f} s: {seeded}")
                progress(f"(a) warm: GetContent [{warm_blocks}], deadline {args.deadline_ms:g} ms")
                warm = run_load(args, "warm", warm_server, [*content_args, "--prime"], profile=True)
                progress(
                    f"(d) slow upstream: GetContent [{slow_blocks}], {UPSTREAM_NAME} sleeps"
                    f" {args.upstream_delay:g} s, deadline {args.deadline_ms:g} ms"
                )
                slow = run_load(args, "slow-upstream", warm_server, slow_args, profile=True)
                upstream_stats = _upstream_stats(upstream_url)
                progress(f"upstream saw {upstream_stats}")
            warm_exit = warm_server.exit_code

            (tmp_path / "cold").mkdir()
            cold_server = sendtime_server(
                data_dir, tmp_path / "cold", {**overrides, "SENDTIME_CONTENT__CACHE_RESULTS": "false"}
            )
            with cold_server:
                progress(
                    f"(b) cold: sendtime restarted (pid {cold_server.pid}) with cache_results off;"
                    f" RenderEmail {args.template}, deadline {args.render_deadline_ms:g} ms"
                )
                cold = run_load(args, "cold", cold_server, render_args, profile=True)
            cold_exit = cold_server.exit_code

        echo_run("echo-2")

    echo_rps = round(sum(r.rps for r in echo_runs) / len(echo_runs), 1)
    echo_p50 = max(r.p50_ms or 0.0 for r in echo_runs)
    echo_p99 = max(r.p99_ms or 0.0 for r in echo_runs)
    deadline_misses = slow.deadline_misses
    warm_ratio = _ratio(warm.rps, echo_rps)
    cold_ratio = _ratio(cold.rps, echo_rps)
    echo_cpu_per_call = _mean([r.server_cpu_us_per_call for r in echo_runs])
    runs = {"echo": echo_runs, "warm": [warm], "cold": [cold], "slow_upstream": [slow]}

    def by_run(figure: str) -> dict[str, Any]:
        """One figure of every run: the echo's repeats as a list, sendtime's runs one each."""
        return {
            name: [getattr(r, figure) for r in rs] if name == "echo" else getattr(rs[0], figure)
            for name, rs in runs.items()
        }

    checks = {
        "seeded_all_accepted": seeded["accepted"] == len(events),
        "no_errors": not any(r.errors_by_code for rs in runs.values() for r in rs),
        # every built-in block of a warm answer comes from the cache (or is
        # a cached "nothing to show", e.g. no offer for a small cart)
        "warm_blocks_cached": _count(warm.window_block_sources, keep=("cached", "fallback/missing_data"))
        == 0,
        "warm_no_deadline_misses": warm.deadline_misses == 0,
        # cache off: every block computed for the call
        "cold_blocks_fresh": _count(cold.block_sources, keep=("fresh", "fallback/missing_data")) == 0,
        "cold_emails_complete": cold.empty_emails == 0 and cold.ok > 0,
        "slow_upstream_block_in_every_answer": slow.missing_block == 0 and slow.ok > 0,
        "slow_upstream_no_deadline_misses": deadline_misses == 0,
        "servers_stopped_cleanly": warm_exit == 0 and cold_exit == 0,
    }
    slow_upstream_sources = {
        key: n for key, n in slow.block_sources.items() if key.split(": ", 1)[0] == UPSTREAM_NAME
    }
    meets = {
        "warm_ratio": warm_ratio >= TARGETS["warm_ratio"],
        "cold_ratio": cold_ratio >= TARGETS["cold_ratio"],
        "warm_p99_ms": warm.p99_ms is not None and warm.p99_ms <= TARGETS["warm_p99_ms"],
        "slow_upstream_p99_ms": slow.p99_ms is not None and slow.p99_ms < TARGETS["slow_upstream_p99_ms"],
        "deadline_misses": deadline_misses == TARGETS["deadline_misses"],
    }
    return {
        "warm_rps": warm.rps,
        "cold_rps": cold.rps,
        "echo_rps": echo_rps,
        "warm_ratio": warm_ratio,
        "cold_ratio": cold_ratio,
        "warm_p50_ms": warm.p50_ms,
        "warm_p99_ms": warm.p99_ms,
        "cold_p50_ms": cold.p50_ms,
        "cold_p99_ms": cold.p99_ms,
        "echo_p50_ms": echo_p50,
        "echo_p99_ms": echo_p99,
        "slow_upstream_rps": slow.rps,
        "slow_upstream_p50_ms": slow.p50_ms,
        "slow_upstream_p99_ms": slow.p99_ms,
        "slow_upstream_max_ms": slow.max_ms,
        "deadline_misses": deadline_misses,
        "deadline_misses_by_second": slow.deadline_misses_by_second,
        "slow_upstream_calls": slow.calls,
        "slow_upstream_sources": slow_upstream_sources,
        # cached or fresh: brought in by a fetch that outlived an earlier call
        "slow_upstream_not_stale_or_fallback": slow.not_degraded,
        "upstream_requests": upstream_stats,
        "echo_rps_runs": [r.rps for r in echo_runs],
        "metrics": args.metrics,
        "render_processes": args.render_processes,
        "concurrency": args.concurrency,
        "duration": args.duration,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "deadline_ms": args.deadline_ms,
        "render_deadline_ms": args.render_deadline_ms,
        "upstream_delay_s": args.upstream_delay,
        "users": args.users,
        "seeded_events": len(events),
        # the same comparisons by the server's CPU per call (its render workers
        # included): what the server costs, whatever the load generator takes
        "warm_cpu_ratio": _ratio(echo_cpu_per_call or 0.0, warm.server_cpu_us_per_call or 0.0),
        "cold_cpu_ratio": _ratio(echo_cpu_per_call or 0.0, cold.server_cpu_us_per_call or 0.0),
        "server_cpu_us_per_call": by_run("server_cpu_us_per_call"),
        "generator_cpu_us_per_call": by_run("generator_cpu_us_per_call"),
        "server_workers_cpu_pct": {"warm": warm.server_workers_cpu_pct, "cold": cold.server_workers_cpu_pct},
        "server_cpu_pct": by_run("server_cpu_pct"),
        "generator_cpu_pct": by_run("generator_cpu_pct"),
        "correct": all(checks.values()),
        "checks": checks,
        "targets": TARGETS,
        "meets_targets": meets,
        "python": platform.python_version(),
        "grpcio": _version("grpcio"),
        "uvloop": _version("uvloop"),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "wall_s": round(time.monotonic() - started, 1),
        "runs": {name: [msgspec.to_builtins(r) for r in rs] for name, rs in runs.items()},
    }


@contextmanager
def _work_dir(args: argparse.Namespace) -> Iterator[Path]:
    if args.keep:
        path = Path(args.keep)
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        yield path
        progress(f"server logs and data kept in {path}")
        return
    with tempfile.TemporaryDirectory(prefix="sendtime-content-bench-") as tmp:
        yield Path(tmp)


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
        return f"{'meets' if meets[key] else 'MISSES'} target {TARGETS[key]:g}"

    lines = [
        f"sendtime content benchmark ({result['concurrency']} calls in flight, {result['duration']:g} s each)",
        f"  echo baseline      : {result['echo_rps']:>8,.0f} calls/s  p50 {_ms(result['echo_p50_ms'])}"
        f"  p99 {_ms(result['echo_p99_ms'])}  (runs {result['echo_rps_runs']})",
        f"  (a) warm content   : {result['warm_rps']:>8,.0f} calls/s  p50 {_ms(result['warm_p50_ms'])}"
        f"  p99 {_ms(result['warm_p99_ms'])} ({mark('warm_p99_ms')})",
        f"      warm_ratio     : {result['warm_ratio']:>8.3f}  ({mark('warm_ratio')})",
        f"  (b) cold render    : {result['cold_rps']:>8,.0f} calls/s  p50 {_ms(result['cold_p50_ms'])}"
        f"  p99 {_ms(result['cold_p99_ms'])}",
        f"      cold_ratio     : {result['cold_ratio']:>8.3f}  ({mark('cold_ratio')})",
        f"  server CPU per call: {result['server_cpu_us_per_call']} us"
        f" (cpu ratios warm {result['warm_cpu_ratio']:.3f}, cold {result['cold_cpu_ratio']:.3f}),"
        f" load generator {result['generator_cpu_us_per_call']} us",
        f"  (d) slow upstream  : {result['slow_upstream_rps']:>8,.0f} calls/s"
        f"  p50 {_ms(result['slow_upstream_p50_ms'])}  p99 {_ms(result['slow_upstream_p99_ms'])}"
        f" ({mark('slow_upstream_p99_ms')})",
        f"      deadline misses: {result['deadline_misses']:>8} of {result['slow_upstream_calls']:,} calls"
        f" ({mark('deadline_misses')})",
        f"      {UPSTREAM_NAME} blocks : {result['slow_upstream_sources']}"
        f" ({result['slow_upstream_not_stale_or_fallback']:,} neither stale nor fallback)",
        f"      upstream saw   : {result['upstream_requests']}",
        f"  checks             : {'all passed' if result['correct'] else 'FAILED'}"
        + "".join(f"\n    {'ok  ' if ok else 'FAIL'} {name}" for name, ok in result["checks"].items()),
        f"  Python {result['python']}, {result['cpu_count']} CPUs, grpcio {result['grpcio']}",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.content",
        description="Send-time content under a deadline: sendtime vs a trivial unary gRPC echo server.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per run (default 8)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each run")
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight (default 64)")
    parser.add_argument("--users", type=int, default=400, help="seeded shoppers (default 400)")
    parser.add_argument("--deadline-ms", type=float, default=200.0, help="GetContent deadline (default 200)")
    parser.add_argument(
        "--render-deadline-ms", type=float, default=1000.0, help="RenderEmail deadline (default 1000)"
    )
    parser.add_argument("--template", default="abandoned_cart", help="the template RenderEmail renders")
    parser.add_argument("--upstream-delay", type=float, default=1.0, help="the slow upstream's sleep, s")
    parser.add_argument("--py-spy", metavar="DIR", help="sample the server during (a), (b) and (d) into DIR")
    parser.add_argument(
        "--metrics",
        choices=("on", "off"),
        default="on",
        help="the server's Prometheus metrics (metrics.enabled); run both to see what they cost",
    )
    parser.add_argument(
        "--render-processes",
        type=int,
        default=None,
        metavar="N",
        help="the server's content.render_processes (default: the server's default); 0 renders on the loop",
    )
    parser.add_argument("--keep", metavar="DIR", help="keep server logs and data in DIR (emptied first)")
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
