"""Benchmark: send-time content at the shape real sends have, sendtime beside
a plain FastAPI + aiocache + python-liquid + mjml-python service over the same
data, in one invocation.

The shape (GUIDE.md section 5): a send asks for each user's content once, so
most calls are **first touches** (nothing cached for that user), and many ask
for the **whole email**. The data: a 1,000-product catalog and --users
shoppers (100,000 by default), each with a 3-line cart, 5 views and for about
a third an earlier order (benchmarks.content_workload), loaded through
``POST /v1/batch`` into sendtime and into the baseline alike; --warm-users
more (1,000) for the warm runs. sendtime's profile cache is sized to hold them
all (storage.profile_cache_size), as a deployment would be for its active users.

Every run has 64 calls in flight. The server runs on core 0 and the load
generator on core 1 (``taskset``), so the rates are the server's; then the
same server is moved to both cores (sched_setaffinity on its threads and its
render workers) and the HTTP and gRPC runs are made once more, unpinned.

HTTP, with Debian's wrk (one thread, 64 connections; a Lua script gives each
request its own user; benchmarks.harness):
- warm: ``GET /v1/content/{user}?blocks=cart,recently_viewed,recommendations``
  cycling through the warm users, each asked once before (cached);
- first touch: the same, each request the next user never asked before (the
  run fails its check if the users run out and one is asked twice);
- email: ``?template=abandoned_cart``, each request a user never asked before;
- overload: the email at twice the rate the email run saturated at, offered
  by many connections each pausing a random time between its requests (about
  open-loop: the offered rate barely drops while answers take up to the
  deadline). ``late_answers`` and ``shed`` are what the server's own counters
  ``sendtime_content_late_answers_total`` and ``sendtime_content_shed_total``
  grew by during it (0 when the server does not expose them;
  ``server_counters_exposed`` says which it did). wrk's share of answers slower
  than the deadline is reported beside them.
No deadline header is sent: the server's default budget (300 ms) applies.
A whole email refused with 429 (the server could not make it in time) is
counted (``http_refused_429``), not served, and its connection waits the
answer's Retry-After before its next call, as an ESP's sender would (not in the
overload run, whose offered rate is the point).

gRPC, with the project's generator (benchmarks.content_load, grpc.aio on core
1): warm GetContent, first-touch GetContent and first-touch RenderEmail,
deadline 300 ms; and the slow upstream run of before: GetContent with an
upstream block ("loyalty", from a TOML [[content.upstreams]]) whose upstream
sleeps 1 s, deadline 200 ms, on the warm users: every answer must come back
in time (``deadline_misses``, ``slow_upstream_p99_ms``). ``warm_cpu_ratio``
is as before: the CPU per call of a trivial unary gRPC server
(benchmarks.content_echo) over sendtime's for warm GetContent, render workers
included (higher is better, 1 at parity).

The baseline (benchmarks.baseline_content, one process, pinned like sendtime)
gets the same warm, first-touch and email runs with wrk, over the same users.

    python -m benchmarks.content [--json] [--quick] [--duration S] [--users N] [--py-spy DIR]

--quick is a smoke test (a few thousand users, 1 s runs, no unpinned runs:
well under a minute); its figures mean little. Progress goes to stderr. With
--json the last stdout line is one JSON object: http_warm_rps,
http_first_touch_rps, http_email_rps with their p50/p99, first_touch_ratio
(= http_first_touch_rps / http_warm_rps), email_ratio (= http_email_rps /
http_first_touch_rps), warm_cpu_ratio, late_answers, shed, slow_upstream_p99_ms,
deadline_misses, server CPU per call, the gRPC and unpinned figures, the
baseline's figures and sendtime's ratios to them, the checks, targets and
meets_targets, and every run's details; the exit status is 1 when a check
fails. The machine is small and shared: compare ratios, not absolute rates
(GUIDE.md section 5).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import msgspec

from benchmarks.content_load import ContentLoadResult
from benchmarks.content_workload import (
    CONTENT_BLOCKS,
    TEMPLATE,
    batch_bodies,
    load_batches,
    make_catalog,
    prime,
    user_id,
    write_catalog,
)
from benchmarks.harness import (
    LOAD_CORES,
    SERVER_CORES,
    WRK_DONE,
    WrkResult,
    checks_line,
    counter_delta,
    lua_string,
    machine,
    ms,
    pinned,
    progress,
    prometheus_counters,
    py_spy,
    ratio,
    report,
    require_wrk,
    run_wrk,
    set_affinity,
    version,
    work_dir,
    wrk_answers,
)
from benchmarks.servers import REPO, ServerProcess, sendtime_server

TARGETS: Final[dict[str, float]] = {
    "first_touch_ratio": 0.6,
    "email_ratio": 0.4,
    "warm_cpu_ratio": 0.6,
    "late_answers": 0,
    "slow_upstream_p99_ms": 200.0,
    "deadline_misses": 0,
}
LATE_COUNTER: Final = "sendtime_content_late_answers_total"
SHED_COUNTER: Final = "sendtime_content_shed_total"
COUNTERS: Final = (LATE_COUNTER, SHED_COUNTER)
UPSTREAM_NAME: Final = "loyalty"
#: The server's budget when the caller sets none (content.default_deadline_ms).
DEFAULT_DEADLINE_MS: Final = 300.0
CONCURRENCY: Final = 64
#: The overload run's connections at most: below the HTTP edge's default bound
#: (512), as in benchmarks.overload.
MAX_OVERLOAD_CONNECTIONS: Final = 400
_ECHO_READY: Final = re.compile(r"content echo serving gRPC on (?P<grpc>\S+):(?P<grpc_port>\d+)")
_UPSTREAM_READY: Final = re.compile(r"upstream serving HTTP on (?P<url>http://\S+:\d+)")
_BASELINE_READY: Final = re.compile(r"baseline content serving HTTP on (?P<http>http://\S+:\d+)")


def config_toml(upstream_url: str, catalog: Path) -> str:
    """The server's config: the benchmark's catalog, the slow upstream on an
    allowed host, and an offer rule (the baseline has the same one)."""
    return f"""\
[content]
catalog_file = "{catalog}"
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


# -- the users each run takes -----------------------------------------------------


class Users:
    """The first-touch users, 0 .. count-1, handed out in order: each run
    starts where the last one stopped, so no user is asked twice. Should they
    run out, the next run starts from user 0 again and ``exhausted`` says so
    (a check fails: those users were asked before)."""

    #: a run starting with fewer users left than this starts over instead
    MIN_LEFT: Final = 1000

    def __init__(self, count: int) -> None:
        self.count = count
        self.next = 0
        self.exhausted = False

    def take(self) -> tuple[int, int]:
        """(first user, users left) for the next run."""
        if self.count - self.next < min(self.MIN_LEFT, self.count):
            self.next = 0
            self.exhausted = True
        return self.next, self.count - self.next

    def took(self, used: int) -> None:
        self.next += used


def content_query(template: str | None) -> str:
    return f"?template={template}" if template else "?blocks=" + ",".join(CONTENT_BLOCKS)


def content_script(
    first: int, count: int, query: str, *, pace_ms: tuple[int, int] | None = None, back_off: bool = True
) -> str:
    """wrk's script: each request the next of users first .. first+count-1
    (then from the first again, counted in ``wraps``), with the API key. Answers
    are counted by status. With ``back_off``, a connection whose call was
    refused (429, or 503) waits the answer's Retry-After (1 s without one)
    before its next call, as an ESP's sender does: without it, refusals that
    cost the server little would come back at once, thousands a second, and
    use up the users. With ``pace_ms``, each connection also pauses a random
    lo..hi ms before each request (the overload run)."""
    return f"""deadline_us = {round(DEFAULT_DEADLINE_MS * 1000)}
used, wraps = 0, 0
local first, count, n = {first}, {count}, 0
local query = {lua_string(query)}
wrk.headers["Authorization"] = "Bearer dev-key"

function request()
  if n >= count then
    n = 0
    wraps = wraps + 1
  end
  local path = string.format("/v1/content/bench-user-%06d%s", first + n, query)
  n = n + 1
  used = used + 1
  return wrk.format("GET", path)
end
{wrk_answers(pace_ms, back_off=back_off)}{WRK_DONE}"""


# -- runs -------------------------------------------------------------------------


class Runner:
    """Runs wrk and the gRPC generator for one invocation's settings."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp

    def wrk(
        self,
        label: str,
        base_url: str,
        script: str,
        pid: int,
        *,
        pinned_run: bool = True,
        connections: int = CONCURRENCY,
        duration_s: float | None = None,
    ) -> WrkResult:
        seconds = duration_s or self.args.duration
        with py_spy(self.args.py_spy, label, pid, seconds):
            return run_wrk(
                label,
                base_url,
                script,
                work_dir=self.tmp,
                duration_s=seconds,
                connections=connections,
                server_pid=pid,
                load_cores=LOAD_CORES if pinned_run else None,
                server_cores=SERVER_CORES if pinned_run else None,
            )

    def grpc(
        self,
        label: str,
        server: ServerProcess,
        load_args: list[str],
        *,
        pinned_run: bool = True,
    ) -> ContentLoadResult:
        """benchmarks.content_load against ``server``, in a process of its own."""
        assert server.match is not None
        method, *rest = load_args
        argv = [
            sys.executable,
            "-m",
            "benchmarks.content_load",
            method,
            "--target",
            f"{server.match['grpc']}:{server.match['grpc_port']}",
            "--label",
            label,
            "--duration",
            str(self.args.duration),
            "--warmup",
            str(self.args.warmup),
            "--concurrency",
            str(CONCURRENCY),
            "--server-pid",
            str(server.pid),
            *rest,
        ]
        with py_spy(self.args.py_spy, label, server.pid, self.args.warmup + self.args.duration):
            done = subprocess_run(pinned(argv, LOAD_CORES if pinned_run else None), self.args)
        lines = done.strip().splitlines()
        if not lines:
            raise RuntimeError(f"the load generator for {label} printed no result")
        result = msgspec.json.decode(lines[-1], type=ContentLoadResult)
        progress(
            f"{label}: {result.rps:,.0f} calls/s, p50 {ms(result.p50_ms)}, p99 {ms(result.p99_ms)},"
            f" {sum(result.errors_by_code.values())} errors, {result.deadline_misses} deadline misses,"
            f" server CPU {result.server_cpu_us_per_call} us/call"
        )
        return result


def subprocess_run(argv: list[str], args: argparse.Namespace) -> str:
    done = subprocess.run(
        argv,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        timeout=args.warmup + args.duration + 180,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])} ... failed (exit {done.returncode})")
    return done.stdout


def _upstream_stats(url: str) -> dict[str, int]:
    try:
        with urllib.request.urlopen(f"{url}/stats", timeout=5) as response:  # noqa: S310 (loopback URL we started)
            stats: dict[str, int] = json.load(response)
    except OSError as exc:
        progress(f"could not read the upstream's stats: {exc}")
        return {}
    return stats


def _only_refusals(run: WrkResult) -> bool:
    """No error but answers 429 (shed), and every answer's status counted."""
    failed = set(run.errors) - {"status"}
    other = {status for status in run.statuses if not (status.startswith("2") or status == "429")}
    return not failed and not other and sum(run.statuses.values()) == run.requests


def _cached(sources: Mapping[str, int]) -> int:
    """Blocks served from the cache (cached or stale)."""
    return sum(n for key, n in sources.items() if key.split(": ", 1)[1].split("/")[0] in ("cached", "stale"))


def _fallbacks(sources: Mapping[str, int]) -> dict[str, int]:
    """Fallback blocks by reason (but missing_data: nothing to show is an answer)."""
    found: dict[str, int] = {}
    for key, n in sources.items():
        source = key.split(": ", 1)[1]
        if source.startswith("fallback/") and source != "fallback/missing_data":
            found[source] = found.get(source, 0) + n
    return found


def _count(sources: Mapping[str, int], *, keep: tuple[str, ...]) -> int:
    """Blocks whose source/reason is not one of ``keep``."""
    return sum(n for key, n in sources.items() if key.split(": ", 1)[1] not in keep)


def _http_passes(
    runner: Runner,
    prefix: str,
    base_url: str,
    pid: int,
    users: Users,
    warm_first: int,
    warm_count: int,
    *,
    pinned_run: bool = True,
) -> dict[str, WrkResult]:
    """warm, first touch and whole email over HTTP with wrk."""
    runs: dict[str, WrkResult] = {}
    query = content_query(None)
    runs["warm"] = runner.wrk(
        f"{prefix}-warm", base_url, content_script(warm_first, warm_count, query), pid, pinned_run=pinned_run
    )
    for name, template in (("first_touch", None), ("email", TEMPLATE)):
        script = content_script(*users.take(), content_query(template))
        runs[name] = runner.wrk(
            f"{prefix}-{name.replace('_', '-')}", base_url, script, pid, pinned_run=pinned_run
        )
        users.took(runs[name].used)
    return runs


def _grpc_passes(
    runner: Runner,
    prefix: str,
    server: ServerProcess,
    users: Users,
    warm_first: int,
    warm_count: int,
    *,
    pinned_run: bool = True,
) -> dict[str, ContentLoadResult]:
    blocks = ",".join(CONTENT_BLOCKS)
    deadline = ["--deadline-ms", str(DEFAULT_DEADLINE_MS)]
    runs: dict[str, ContentLoadResult] = {}
    warm_users = ["--first-user", str(warm_first), "--users", str(warm_count)]
    runs["warm"] = runner.grpc(
        f"{prefix}-warm",
        server,
        ["content", "--blocks", blocks, *deadline, *warm_users, "--prime"],
        pinned_run=pinned_run,
    )
    for name, method in (
        ("first_touch", ["content", "--blocks", blocks]),
        ("email", ["render", "--template", TEMPLATE]),
    ):
        first, left = users.take()
        fresh = ["--fresh", "--first-user", str(first), "--users", str(left)]
        runs[name] = runner.grpc(
            f"{prefix}-{name.replace('_', '-')}", server, [*method, *deadline, *fresh], pinned_run=pinned_run
        )
        users.took(runs[name].users_used or 0)
    return runs


def run(args: argparse.Namespace) -> dict[str, Any]:
    require_wrk()
    started = time.monotonic()
    about = machine()
    catalog = make_catalog()
    warm_first = args.users
    t0 = time.perf_counter()
    bodies, events = batch_bodies(args.users + args.warm_users, catalog)
    progress(
        f"{events:,} events for {args.users + args.warm_users:,} users in {len(bodies):,} batches"
        f" built in {time.perf_counter() - t0:.1f} s"
    )
    warm_paths = [f"/v1/content/{user_id(warm_first + k)}" for k in range(args.warm_users)]
    # the warm runs' call, once per warm user: it is then cached
    warm_prime = [p + content_query(None) for p in warm_paths]

    with work_dir(args.keep, "sendtime-content-bench-") as tmp:
        runner = Runner(args, tmp)
        catalog_path = write_catalog(tmp / "catalog.json", catalog)
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
            log_path=tmp / "upstream.log",
        )
        with upstream:
            assert upstream.match is not None
            upstream_url = upstream.match["url"]
            config = tmp / "sendtime.toml"
            config.write_text(config_toml(upstream_url, catalog_path))
            overrides = {
                "SENDTIME_CONFIG": str(config),
                "SENDTIME_STORAGE__PROFILE_CACHE_SIZE": str(args.users + args.warm_users + 1000),
            }
            (tmp / "sendtime").mkdir()
            server = sendtime_server(
                tmp / "data", tmp / "sendtime", overrides, cores=SERVER_CORES, start_timeout_s=120
            )
            with server:
                assert server.match is not None
                http = server.match["http"]
                progress(
                    f"sendtime (pid {server.pid}, core {SERVER_CORES}) on {http}: loading {events:,} events"
                )
                t0 = time.perf_counter()
                seeded = asyncio.run(load_batches(http, bodies))
                progress(f"loaded through /v1/batch in {time.perf_counter() - t0:.1f} s: {seeded}")
                primed = asyncio.run(prime(http, warm_prime))
                counters_start = prometheus_counters(http, COUNTERS)
                users = Users(args.users)

                http_runs = _http_passes(runner, "http", http, server.pid, users, warm_first, args.warm_users)
                grpc_runs = _grpc_passes(runner, "grpc", server, users, warm_first, args.warm_users)

                slow_blocks = ",".join((UPSTREAM_NAME, *CONTENT_BLOCKS))
                slow = runner.grpc(
                    "slow-upstream",
                    server,
                    [
                        "content",
                        "--blocks",
                        slow_blocks,
                        "--deadline-ms",
                        str(args.deadline_ms),
                        "--first-user",
                        str(warm_first),
                        "--users",
                        str(args.warm_users),
                        "--degraded",
                        UPSTREAM_NAME,
                    ],
                )
                upstream_stats = _upstream_stats(upstream_url)

                # twice the rate whole emails saturated the server at, about
                # open-loop; the better of the HTTP and gRPC runs, since a server
                # that refuses emails it could make would otherwise be offered less
                saturated = max(http_runs["email"].rps, grpc_runs["email"].rps)
                offered = max(2.0 * saturated, 20.0)
                # within the HTTP edge's connection bound (http.max_connections,
                # 512), which would otherwise close idle connections to make room:
                # the run would measure reconnects (wrk's read errors), not shedding
                connections = int(min(MAX_OVERLOAD_CONNECTIONS, max(2 * CONCURRENCY, offered)))
                mean_pause_ms = 1000.0 * connections / offered
                pace = (round(0.5 * mean_pause_ms), round(1.5 * mean_pause_ms))
                progress(
                    f"overload: whole emails offered at {offered:,.0f}/s (twice {saturated:,.0f}/s)"
                    f" by {connections} connections pausing {pace[0]}-{pace[1]} ms"
                )
                before = prometheus_counters(http, COUNTERS)
                overload = runner.wrk(
                    "overload-email",
                    http,
                    content_script(*users.take(), content_query(TEMPLATE), pace_ms=pace, back_off=False),
                    server.pid,
                    connections=connections,
                )
                users.took(overload.used)
                after = prometheus_counters(http, COUNTERS)

                unpinned_http: dict[str, WrkResult] = {}
                unpinned_grpc: dict[str, ContentLoadResult] = {}
                if not args.quick:
                    progress("the same server on both cores, the load generators unpinned")
                    set_affinity(server.pid, range(2))
                    unpinned_http = _http_passes(
                        runner,
                        "unpinned-http",
                        http,
                        server.pid,
                        users,
                        warm_first,
                        args.warm_users,
                        pinned_run=False,
                    )
                    unpinned_grpc = _grpc_passes(
                        runner, "unpinned-grpc", server, users, warm_first, args.warm_users, pinned_run=False
                    )
                counters_end = prometheus_counters(http, COUNTERS)
            sendtime_exit = server.exit_code
            progress(f"sendtime exited with {sendtime_exit}")

        echo = ServerProcess(
            "content echo",
            [sys.executable, "-m", "benchmarks.content_echo", "--port", "0"],
            ready=_ECHO_READY,
            log_path=tmp / "echo.log",
            cores=SERVER_CORES,
        )
        with echo:
            echo_run = runner.grpc(
                "echo",
                echo,
                ["content", "--blocks", ",".join(CONTENT_BLOCKS), "--deadline-ms", str(DEFAULT_DEADLINE_MS)],
            )

        baseline = ServerProcess(
            "baseline content",
            [
                sys.executable,
                "-m",
                "benchmarks.baseline_content",
                "--catalog",
                str(catalog_path),
                "--templates",
                str(REPO / "templates"),
                "--port",
                "0",
            ],
            ready=_BASELINE_READY,
            log_path=tmp / "baseline.log",
            cores=SERVER_CORES,
        )
        with baseline:
            assert baseline.match is not None
            base_http = baseline.match["http"]
            progress(
                f"baseline (pid {baseline.pid}, core {SERVER_CORES}) on {base_http}: loading the same events"
            )
            t0 = time.perf_counter()
            base_seeded = asyncio.run(load_batches(base_http, bodies))
            progress(f"loaded in {time.perf_counter() - t0:.1f} s: {base_seeded}")
            base_primed = asyncio.run(prime(base_http, warm_prime))
            base_runs = _http_passes(
                runner, "baseline", base_http, baseline.pid, Users(args.users), warm_first, args.warm_users
            )
        baseline_exit = baseline.exit_code

    exposed = {name: after.get(name) is not None for name in COUNTERS}
    late_answers = counter_delta(before, after, LATE_COUNTER)
    shed = counter_delta(before, after, SHED_COUNTER)
    warm, first, email = http_runs["warm"], http_runs["first_touch"], http_runs["email"]
    first_touch_ratio = ratio(first.rps, warm.rps)
    email_ratio = ratio(email.rps, first.rps)
    echo_cpu = echo_run.server_cpu_us_per_call
    warm_cpu_ratio = ratio(echo_cpu, grpc_runs["warm"].server_cpu_us_per_call)
    all_wrk = {**{f"http_{k}": v for k, v in http_runs.items()}, "overload": overload}
    all_wrk |= {f"unpinned_http_{k}": v for k, v in unpinned_http.items()}
    all_wrk |= {f"baseline_{k}": v for k, v in base_runs.items()}
    all_grpc = {**{f"grpc_{k}": v for k, v in grpc_runs.items()}, "slow_upstream": slow, "echo": echo_run}
    all_grpc |= {f"unpinned_grpc_{k}": v for k, v in unpinned_grpc.items()}
    fresh_wrk = [
        r for name, r in all_wrk.items() if name.endswith(("first_touch", "email")) or name == "overload"
    ]
    fresh_grpc = [r for name, r in all_grpc.items() if name.endswith(("first_touch", "email"))]
    checks = {
        "loaded_all_batches": set(seeded) == {"200"} and set(base_seeded) == {"200"},
        "warm_users_primed": set(primed) == {"200"} and set(base_primed) == {"200"},
        # a whole email refused with 429 (it could not be made in time) is the
        # server shedding, counted in refused_429; anything else is an error
        "no_http_errors": all(_only_refusals(r) for r in all_wrk.values()),
        # DEADLINE_EXCEEDED is the server's own failure to answer in time (counted
        # in grpc_deadline_misses), RESOURCE_EXHAUSTED its refusal of an email it
        # cannot make in time (grpc_refused): neither is the benchmark's error
        "no_grpc_errors": not any(
            set(r.errors_by_code) - {"DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"} for r in all_grpc.values()
        ),
        "first_touch_no_user_asked_twice": all(r.wraps == 0 for r in fresh_wrk)
        and all(r.user_wraps == 0 for r in fresh_grpc)
        and not users.exhausted,
        "grpc_warm_blocks_cached": _count(
            grpc_runs["warm"].window_block_sources, keep=("cached", "fallback/missing_data")
        )
        == 0,
        # a first touch finds nothing cached: its blocks are computed (fresh), or
        # fall back when the server runs out of time or sheds (counted below)
        "grpc_first_touch_nothing_cached": _cached(grpc_runs["first_touch"].window_block_sources) == 0,
        "grpc_emails_complete": grpc_runs["email"].empty_emails == 0 and grpc_runs["email"].ok > 0,
        "slow_upstream_block_in_every_answer": slow.missing_block == 0 and slow.ok > 0,
        "slow_upstream_no_deadline_misses": slow.deadline_misses == 0,
        # uvicorn exits by re-raising the SIGTERM it was stopped with
        "servers_stopped_cleanly": sendtime_exit == 0 and baseline_exit in (0, -signal.SIGTERM),
    }
    meets = {
        "first_touch_ratio": first_touch_ratio >= TARGETS["first_touch_ratio"],
        "email_ratio": email_ratio >= TARGETS["email_ratio"],
        "warm_cpu_ratio": warm_cpu_ratio >= TARGETS["warm_cpu_ratio"],
        "late_answers": late_answers == TARGETS["late_answers"],
        "slow_upstream_p99_ms": slow.p99_ms is not None and slow.p99_ms < TARGETS["slow_upstream_p99_ms"],
        "deadline_misses": slow.deadline_misses == TARGETS["deadline_misses"],
    }
    base_warm, base_first, base_email = base_runs["warm"], base_runs["first_touch"], base_runs["email"]
    result: dict[str, Any] = {
        "http_warm_rps": warm.rps,
        "http_first_touch_rps": first.rps,
        "http_email_rps": email.rps,
        "first_touch_ratio": first_touch_ratio,
        "email_ratio": email_ratio,
        "warm_cpu_ratio": warm_cpu_ratio,
        "late_answers": late_answers,
        "shed": shed,
        "server_counters_exposed": exposed,
        "http_warm_p50_ms": warm.p50_ms,
        "http_warm_p99_ms": warm.p99_ms,
        "http_first_touch_p50_ms": first.p50_ms,
        "http_first_touch_p99_ms": first.p99_ms,
        "http_email_p50_ms": email.p50_ms,
        "http_email_p99_ms": email.p99_ms,
        "http_email_response_bytes": email.mean_response_bytes,
        "grpc_warm_rps": grpc_runs["warm"].rps,
        "grpc_first_touch_rps": grpc_runs["first_touch"].rps,
        "grpc_email_rps": grpc_runs["email"].rps,
        "grpc_warm_p99_ms": grpc_runs["warm"].p99_ms,
        "grpc_first_touch_p99_ms": grpc_runs["first_touch"].p99_ms,
        "grpc_email_p99_ms": grpc_runs["email"].p99_ms,
        "slow_upstream_p99_ms": slow.p99_ms,
        "deadline_misses": slow.deadline_misses,
        # answers slower than the 300 ms budget, at the client: wrk's share (from
        # its percentiles) and the gRPC generator's count (failed or late)
        "http_slower_than_deadline_pct": {name: r.late_pct for name, r in all_wrk.items()},
        "http_refused_429": {name: r.statuses.get("429", 0) for name, r in all_wrk.items()},
        "grpc_deadline_misses": {name: r.deadline_misses for name, r in all_grpc.items()},
        "grpc_refused": {name: r.errors_by_code.get("RESOURCE_EXHAUSTED", 0) for name, r in all_grpc.items()},
        # blocks that fell back (timeout, deadline_too_short, overloaded...) in the measured window
        "grpc_fallback_blocks": {name: _fallbacks(r.window_block_sources) for name, r in all_grpc.items()},
        # CPU per call of the server (render workers included), pinned runs
        "server_cpu_us_per_call": {
            **{f"http_{k}": v.server_cpu_us_per_request for k, v in http_runs.items()},
            **{f"grpc_{k}": v.server_cpu_us_per_call for k, v in grpc_runs.items()},
            "echo": echo_cpu,
            **{f"baseline_{k}": v.server_cpu_us_per_request for k, v in base_runs.items()},
        },
        "overload": {
            "offered_rps": round(offered, 1),
            "connections": connections,
            "answered_rps": overload.rps,
            "p50_ms": overload.p50_ms,
            "p99_ms": overload.p99_ms,
            "max_ms": overload.max_ms,
            "refused_429": overload.statuses.get("429", 0),
            "slower_than_deadline_at_client_pct": overload.late_pct,
            "late_answers": late_answers,
            "shed": shed,
        },
        "late_answers_whole_run": counter_delta(counters_start, counters_end, LATE_COUNTER),
        "shed_whole_run": counter_delta(counters_start, counters_end, SHED_COUNTER),
        "unpinned": {
            **{f"http_{k}_rps": v.rps for k, v in unpinned_http.items()},
            **{f"http_{k}_p99_ms": v.p99_ms for k, v in unpinned_http.items()},
            **{f"grpc_{k}_rps": v.rps for k, v in unpinned_grpc.items()},
            **{f"grpc_{k}_p99_ms": v.p99_ms for k, v in unpinned_grpc.items()},
        },
        "baseline": {
            "what": "FastAPI + aiocache + python-liquid + mjml-python, one process (benchmarks.baseline_content)",
            "http_warm_rps": base_warm.rps,
            "http_first_touch_rps": base_first.rps,
            "http_email_rps": base_email.rps,
            "http_warm_p50_ms": base_warm.p50_ms,
            "http_warm_p99_ms": base_warm.p99_ms,
            "http_first_touch_p50_ms": base_first.p50_ms,
            "http_first_touch_p99_ms": base_first.p99_ms,
            "http_email_p50_ms": base_email.p50_ms,
            "http_email_p99_ms": base_email.p99_ms,
            "http_email_response_bytes": base_email.mean_response_bytes,
        },
        "vs_baseline": {
            "warm": ratio(warm.rps, base_warm.rps),
            "first_touch": ratio(first.rps, base_first.rps),
            "email": ratio(email.rps, base_email.rps),
        },
        "slow_upstream_sources": {
            key: n for key, n in slow.block_sources.items() if key.split(": ", 1)[0] == UPSTREAM_NAME
        },
        "upstream_requests": upstream_stats,
        "users": args.users,
        "warm_users": args.warm_users,
        "first_touch_users_used": users.next,
        "catalog_products": len(catalog),
        "loaded_events": events,
        "concurrency": CONCURRENCY,
        "duration_s": args.duration,
        "warmup_s_grpc": args.warmup,
        "deadline_ms": DEFAULT_DEADLINE_MS,
        "slow_upstream_deadline_ms": args.deadline_ms,
        "upstream_delay_s": args.upstream_delay,
        "quick": args.quick,
        "pinning": {"server_cores": SERVER_CORES, "load_cores": LOAD_CORES},
        "correct": all(checks.values()),
        "checks": checks,
        "targets": TARGETS,
        "meets_targets": meets,
        "machine": about,
        "python": about["python"],
        "cpu_count": about["cpu_count"],
        "platform": about["platform"],
        "grpcio": version("grpcio"),
        "fastapi": version("fastapi"),
        "wall_s": round(time.monotonic() - started, 1),
        "runs": {
            "wrk": {name: msgspec.to_builtins(r) for name, r in all_wrk.items()},
            "grpc": {name: msgspec.to_builtins(r) for name, r in all_grpc.items()},
        },
    }
    return result


def summary(result: dict[str, Any]) -> str:
    meets, base, vs = result["meets_targets"], result["baseline"], result["vs_baseline"]

    def mark(key: str) -> str:
        return f"{'meets' if meets[key] else 'MISSES'} target {TARGETS[key]:g}"

    def row(
        label: str, rps: float, p50: float | None, p99: float | None, base_rps: float, times: float
    ) -> str:
        return (
            f"  {label:<18}: {rps:>8,.0f}/s  p50 {ms(p50)}  p99 {ms(p99)}"
            f"   baseline {base_rps:>7,.0f}/s  ({times:.2f}x)"
        )

    overload = result["overload"]
    lines = [
        f"sendtime content benchmark ({result['concurrency']} in flight, {result['duration_s']:g} s runs,"
        f" server on core {result['pinning']['server_cores']}, wrk on core {result['pinning']['load_cores']})",
        row(
            "HTTP warm",
            result["http_warm_rps"],
            result["http_warm_p50_ms"],
            result["http_warm_p99_ms"],
            base["http_warm_rps"],
            vs["warm"],
        ),
        row(
            "HTTP first touch",
            result["http_first_touch_rps"],
            result["http_first_touch_p50_ms"],
            result["http_first_touch_p99_ms"],
            base["http_first_touch_rps"],
            vs["first_touch"],
        ),
        row(
            "HTTP email",
            result["http_email_rps"],
            result["http_email_p50_ms"],
            result["http_email_p99_ms"],
            base["http_email_rps"],
            vs["email"],
        ),
        f"  first_touch_ratio : {result['first_touch_ratio']:.3f} ({mark('first_touch_ratio')})",
        f"  email_ratio       : {result['email_ratio']:.3f} ({mark('email_ratio')})",
        f"  warm_cpu_ratio    : {result['warm_cpu_ratio']:.3f} ({mark('warm_cpu_ratio')})",
        f"  gRPC warm / first touch / email: {result['grpc_warm_rps']:,.0f} / {result['grpc_first_touch_rps']:,.0f}"
        f" / {result['grpc_email_rps']:,.0f} calls/s",
        f"  unpinned          : {result['unpinned']}",
        f"  overload          : offered {overload['offered_rps']:,.0f}/s, answered {overload['answered_rps']:,.0f}/s,"
        f" p99 {ms(overload['p99_ms'])}, late_answers {result['late_answers']} ({mark('late_answers')}),"
        f" shed {result['shed']}; counters exposed {result['server_counters_exposed']}",
        f"  slow upstream p99 : {ms(result['slow_upstream_p99_ms'])} ({mark('slow_upstream_p99_ms')}),"
        f" deadline misses {result['deadline_misses']} ({mark('deadline_misses')})",
        f"  server CPU per call (us): {result['server_cpu_us_per_call']}",
        checks_line(result, "  checks            "),
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.content",
        description="Send-time content at the shape real sends have: sendtime vs a plain FastAPI service.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke test: small and short, no unpinned runs"
    )
    parser.add_argument("--duration", type=float, default=None, help="measured seconds per run (default 6)")
    parser.add_argument(
        "--warmup", type=float, default=None, help="gRPC runs' unmeasured seconds (default 1)"
    )
    parser.add_argument("--users", type=int, default=None, help="first-touch shoppers (default 100,000)")
    parser.add_argument(
        "--warm-users", type=int, default=None, help="shoppers of the warm runs (default 1,000)"
    )
    parser.add_argument(
        "--deadline-ms", type=float, default=200.0, help="the slow upstream run's deadline (default 200)"
    )
    parser.add_argument("--upstream-delay", type=float, default=1.0, help="the slow upstream's sleep, s")
    parser.add_argument("--py-spy", metavar="DIR", help="sample the server during every run into DIR")
    parser.add_argument("--keep", metavar="DIR", help="keep server logs and data in DIR (emptied first)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    defaults = (1.0, 0.5, 10_000, 200) if args.quick else (6.0, 1.0, 100_000, 1000)
    for name, value in zip(("duration", "warmup", "users", "warm_users"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    result = run(args)
    return report(result, summary, as_json=args.json, passed=result["correct"])


if __name__ == "__main__":
    sys.exit(main())
