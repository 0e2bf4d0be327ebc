"""Benchmark: every door of sendtime at twice the load that saturates it.
The promise under test: answers leave on time or the caller is refused early
(429 with Retry-After), health keeps answering, memory stays bounded, and
nothing acknowledged is lost.

Doors, over HTTP with Debian's wrk on core 1 and ``sendtime serve`` on core 0
(benchmarks.harness), each with the time an answer must leave within:
- ``ingest``: ``POST /v1/batch`` of 100 Segment events, each with a fresh
  message id (benchmarks.ingest's script): 1,000 ms;
- ``content``: ``GET /v1/content/{user}?blocks=cart,recently_viewed,
  recommendations``, each request a user never asked before (first touch):
  the server's default deadline, 300 ms;
- ``email``: the same with ``?template=abandoned_cart``: 300 ms;
- ``status_page``: ``GET /`` with the admin key: 1,000 ms.

For each door, first 64 connections back to back for --duration seconds: the
rate that saturates it (``saturating_rps``). Then twice that rate, offered by
many connections each pausing a random time between its requests (about
open-loop: the offered rate barely drops while answers take up to the
deadline), for --duration seconds, and reported:
- ``offered_rps``: requests made per second;
- ``answered_on_time_pct``: answered (not refused) within the door's time;
- ``refused_pct``: answered 429 or 503, the server's "not now";
- ``late_answers``: answers of any kind that left after the door's time,
  from wrk's latency histogram (for content and email, also the server's own
  counter ``sendtime_content_late_answers_total``: ``server_late_answers``);
- ``failed``: other 5xx answers and connection errors;
- ``max_rss_mib``: the server's resident memory, render workers included,
  sampled every 0.2 s;
- ``saturated_cpu_ms_per_ok``: the server's CPU (render workers included) per
  2xx answer in the saturating run: what one answer costs, whatever the
  machine's speed;
- ``health_p99_ms`` / ``health_max_ms``: ``GET /healthz`` every 0.1 s meanwhile.
After all doors, a graceful stop, then the ingest check: the store holds
every event of every batch answered 200 (``ingest_acked_events`` <=
``ingest_stored_events``).

    python -m benchmarks.overload [--json] [--quick] [--duration S] [--users N] [--doors a,b]

--doors runs only the doors named (comma-separated; the ingest check only
when ``ingest`` is among them). --set SETTING=VALUE (repeatable) gives the
server a setting (``--set http.max_ingest_bytes_in_flight=524288``), to
measure what a bound trades.

--quick is a smoke test (4 s runs, few users): its figures mean little.
Progress goes to stderr; with --json the last stdout line is one JSON object
with one object per door, the checks and ``meets_targets`` (late_answers = 0
on every door); the exit status is 1 when a check or target fails.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from benchmarks.content import content_query, content_script
from benchmarks.content_workload import TEMPLATE, batch_bodies, load_batches, make_catalog, write_catalog
from benchmarks.harness import (
    LOAD_CORES,
    SERVER_CORES,
    WRK_DONE,
    WrkResult,
    counter_delta,
    machine,
    progress,
    prometheus_counters,
    report,
    require_wrk,
    rss_mib,
    run_wrk,
    work_dir,
    wrk_answers,
)
from benchmarks.ingest import EVENTS_PER_BATCH, batch_script, count_rows
from benchmarks.servers import sendtime_server

#: The time each door's answer must leave within, in ms.
BUDGET_MS: Final = {"ingest": 1000.0, "content": 300.0, "email": 300.0, "status_page": 1000.0}
SATURATING_CONNECTIONS: Final = 64
#: Below the HTTP edge's default connection bound (512).
MAX_CONNECTIONS: Final = 400
LATE_COUNTER: Final = "sendtime_content_late_answers_total"
#: The server saying "not now, retry": refused early, not failed.
REFUSALS: Final = frozenset({"429", "503"})


@dataclass
class Door:
    name: str
    saturating_rps: float
    offered_rps: float
    connections: int
    requests: int
    answered_on_time_pct: float
    refused_pct: float
    late_answers: int
    server_late_answers: int | None
    failed: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    max_rss_mib: float
    saturated_cpu_ms_per_ok: float | None
    health_p99_ms: float
    health_max_ms: float
    health_failures: int
    runs: dict[str, Any] = field(default_factory=dict)


class Watch:
    """While a door is overloaded: the server's RSS every 0.2 s and a health
    probe every 0.1 s, each in a thread of its own (the event loop is wrk's
    business here, not ours)."""

    def __init__(self, pid: int, base_url: str) -> None:
        self._pid = pid
        self._url = f"{base_url}/healthz"
        self._stop = threading.Event()
        self.rss: list[float] = []
        self.health_ms: list[float] = []
        self.health_failures = 0

    def _sample_rss(self) -> None:
        while not self._stop.wait(0.2):
            self.rss.append(rss_mib(self._pid))

    def _probe(self) -> None:
        while not self._stop.wait(0.1):
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(self._url, timeout=5) as answer:  # noqa: S310 (loopback)
                    answer.read()
            except OSError:
                self.health_failures += 1
                continue
            self.health_ms.append((time.perf_counter() - started) * 1000)

    @contextmanager
    def running(self) -> Iterator[None]:
        threads = [threading.Thread(target=self._sample_rss), threading.Thread(target=self._probe)]
        for thread in threads:
            thread.start()
        try:
            yield
        finally:
            self._stop.set()
            for thread in threads:
                thread.join()


Pace = tuple[int, int] | None


def status_page_script(pace_ms: Pace) -> str:
    return f"""\
deadline_us = {round(BUDGET_MS["status_page"] * 1000)}
wrk.headers["Authorization"] = "Bearer dev-key"
{wrk_answers(pace_ms)}{WRK_DONE}"""


def ingest_script(args: argparse.Namespace, pace_ms: Pace) -> str:
    """benchmarks.ingest's batches (message ids never sent before, each time
    it is made), answers counted, paced when asked."""
    budget = f"deadline_us = {round(BUDGET_MS['ingest'] * 1000)}\n"
    return budget + wrk_answers(pace_ms) + batch_script(args.templates, args.users)


class Users:
    """First-touch users handed out in order across runs: none asked twice."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.next = 0

    def script(self, door: str, pace_ms: Pace) -> str:
        query = content_query(TEMPLATE if door == "email" else None)
        return content_script(self.next, max(1, self.count - self.next), query, pace_ms=pace_ms)

    def took(self, run: WrkResult) -> None:
        self.next += run.used


def overload_door(
    name: str,
    script: Callable[[Pace], str],
    *,
    base_url: str,
    pid: int,
    args: argparse.Namespace,
    tmp: Path,
    users: Users | None = None,
) -> Door:
    """``script(pace)`` makes each run's wrk script (fresh message ids or users
    every time), counting answers by status and backing off on a refusal's
    Retry-After as an ESP's sender does; paced for the overload run."""

    def wrk(label: str, body: str, connections: int) -> WrkResult:
        return run_wrk(
            label,
            base_url,
            body,
            work_dir=tmp,
            duration_s=args.duration,
            connections=connections,
            server_pid=pid,
            timeout_s=10.0,
        )

    saturate = wrk(f"{name}-saturate", script(None), SATURATING_CONNECTIONS)
    if users:
        users.took(saturate)
    offered = max(2.0 * saturate.rps, 20.0)
    # enough connections that each waits out a whole budget and still offers its
    # share, but within the server's own bound (http.max_connections, 512), which
    # would otherwise close idle ones to make room and measure reconnects instead
    connections = int(
        min(MAX_CONNECTIONS, max(2 * SATURATING_CONNECTIONS, offered * BUDGET_MS[name] / 1000 * 2))
    )
    mean_pause_ms = 1000.0 * connections / offered
    pace = (round(0.5 * mean_pause_ms), round(1.5 * mean_pause_ms))
    progress(
        f"{name}: offered {offered:,.0f}/s (twice {saturate.rps:,.0f}/s) by {connections} connections"
        f" pausing {pace[0]}-{pace[1]} ms"
    )
    watch = Watch(pid, base_url)
    before = prometheus_counters(base_url, (LATE_COUNTER,))
    with watch.running():
        overload = wrk(f"{name}-overload", script(pace), connections)
    after = prometheus_counters(base_url, (LATE_COUNTER,))
    if users:
        users.took(overload)
    requests = overload.requests
    late = round(requests * overload.late_pct / 100)
    refused = sum(n for status, n in overload.statuses.items() if status in REFUSALS)
    server_errors = sum(
        n for status, n in overload.statuses.items() if status >= "500" and status not in REFUSALS
    )
    connection_errors = sum(v for k, v in overload.errors.items() if k != "status")
    on_time = max(0, requests - late - refused - server_errors)
    health = sorted(watch.health_ms)
    return Door(
        name=name,
        saturating_rps=saturate.rps,
        offered_rps=round(requests / overload.duration_s, 1) if overload.duration_s else 0.0,
        connections=connections,
        requests=requests,
        answered_on_time_pct=round(100 * on_time / requests, 2) if requests else 0.0,
        refused_pct=round(100 * refused / requests, 2) if requests else 0.0,
        late_answers=late,
        server_late_answers=(
            counter_delta(before, after, LATE_COUNTER) if name in ("content", "email") else None
        ),
        failed=server_errors + connection_errors,
        p50_ms=overload.p50_ms,
        p99_ms=overload.p99_ms,
        max_ms=overload.max_ms,
        max_rss_mib=round(max(watch.rss, default=0.0), 1),
        saturated_cpu_ms_per_ok=(
            round(saturate.server_cpu_pct * saturate.duration_s * 10 / saturate.ok, 3)
            if saturate.server_cpu_pct is not None and saturate.ok
            else None
        ),
        health_p99_ms=round(health[int(len(health) * 0.99)], 2) if health else 0.0,
        health_max_ms=round(health[-1], 2) if health else 0.0,
        health_failures=watch.health_failures,
        runs={"saturate": asdict(saturate), "overload": asdict(overload)},
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    require_wrk()
    started = time.monotonic()
    with work_dir(args.keep, "sendtime-overload-bench-") as tmp:
        catalog = write_catalog(tmp / "catalog.json", make_catalog())
        config = tmp / "sendtime.toml"
        config.write_text(f'[content]\ncatalog_file = "{catalog}"\n')
        data_dir = tmp / "data"
        server = sendtime_server(
            data_dir,
            tmp,
            {
                "SENDTIME_CONFIG": str(config),
                "SENDTIME_STORAGE__PROFILE_CACHE_SIZE": str(args.users + 1000),
                **dict(args.settings),
            },
            cores=SERVER_CORES,
        )
        with server:
            assert server.match is not None
            base_url = server.match["http"]
            bodies, events = batch_bodies(args.users, make_catalog())
            progress(f"loading {args.users:,} shoppers ({events:,} events) through /v1/batch")
            statuses = asyncio.run(load_batches(base_url, bodies))
            if set(statuses) != {"200"}:
                raise SystemExit(f"loading the shoppers failed: {statuses}")
            users = Users(args.users)
            scripts: dict[str, Callable[[Pace], str]] = {
                "ingest": lambda pace: ingest_script(args, pace),
                "content": lambda pace: users.script("content", pace),
                "email": lambda pace: users.script("email", pace),
                "status_page": status_page_script,
            }
            doors = {
                name: overload_door(
                    name,
                    script,
                    base_url=base_url,
                    pid=server.pid,
                    args=args,
                    tmp=tmp,
                    users=users if name in ("content", "email") else None,
                )
                for name, script in scripts.items()
                if name in args.doors
            }
            progress("stopping sendtime gracefully (SIGTERM)")
        stored = count_rows(data_dir / "sendtime.sqlite3")

    ingest = doors.get("ingest")
    # "ok" counts 2xx answers only: a refused batch was not acknowledged
    acked = sum(run["ok"] * EVENTS_PER_BATCH for run in ingest.runs.values()) if ingest else 0
    stored_from_load = None if stored is None else stored - events
    checks = {
        "nothing_acked_lost": stored_from_load is not None and acked <= stored_from_load,
        "health_answered": all(d.health_failures == 0 for d in doors.values()),
        "no_5xx_or_connection_errors": all(d.failed == 0 for d in doors.values()),
        "first_touch_users_never_repeated": users.next <= users.count,
        "server_stopped_cleanly": server.exit_code == 0,
    }
    meets = {f"{name}_late_answers": door.late_answers == 0 for name, door in doors.items()}
    return {
        **{name: {k: v for k, v in asdict(door).items() if k != "runs"} for name, door in doors.items()},
        "doors": list(doors),
        "settings": dict(args.settings),
        "budget_ms": BUDGET_MS,
        "ingest_acked_events": acked,
        "ingest_stored_events": stored_from_load,
        "users": args.users,
        "duration_s": args.duration,
        "pinning": {"server_cores": SERVER_CORES, "load_cores": LOAD_CORES},
        "quick": args.quick,
        "correct": all(checks.values()),
        "checks": checks,
        "meets_targets": meets,
        "machine": machine(),
        "wall_s": round(time.monotonic() - started, 1),
        "runs": {name: door.runs for name, door in doors.items()},
    }


def summary(result: dict[str, Any]) -> str:
    lines = ["sendtime at twice the load that saturates each door (server on core 0, wrk on core 1)"]
    for name in result["doors"]:
        door = result[name]
        lines.append(
            f"  {name:<12} saturates at {door['saturating_rps']:>8,.0f}/s; offered {door['offered_rps']:>8,.0f}/s:"
            f" on time {door['answered_on_time_pct']:5.1f}%, refused {door['refused_pct']:5.1f}%,"
            f" late {door['late_answers']} (budget {result['budget_ms'][name]:.0f} ms), p99 {door['p99_ms']:,.0f} ms,"
            f" RSS max {door['max_rss_mib']:,.0f} MiB, health p99 {door['health_p99_ms']:,.1f} ms,"
            f" CPU per answer when saturated {door['saturated_cpu_ms_per_ok']} ms"
        )
    lines.append(f"  checks: {result['checks']}")
    lines.append(f"  meets targets: {result['meets_targets']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.overload", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 4 s runs, few users")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of each run (default 10)")
    parser.add_argument("--users", type=int, default=60_000, help="shoppers loaded for first-touch calls")
    parser.add_argument("--templates", type=int, default=2000, help="distinct events the ingest bodies cycle")
    parser.add_argument("--keep", default=None, help="keep the work folder here (logs, wrk scripts)")
    parser.add_argument(
        "--doors",
        type=_doors,
        default=list(BUDGET_MS),
        help=f"comma-separated doors to run (default all: {','.join(BUDGET_MS)})",
    )
    parser.add_argument(
        "--set",
        dest="settings",
        type=_setting,
        action="append",
        default=[],
        metavar="SETTING=VALUE",
        help="a server setting for the run (repeatable): http.max_ingest_bytes_in_flight=524288",
    )
    return parser


def _setting(value: str) -> tuple[str, str]:
    name, equals, setting = value.partition("=")
    if not equals or not name.strip():
        raise argparse.ArgumentTypeError(f"expected SETTING=VALUE, not {value!r}")
    return "SENDTIME_" + name.strip().upper().replace(".", "__"), setting


def _doors(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in BUDGET_MS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"doors are {', '.join(BUDGET_MS)}; not {', '.join(unknown) or value!r}"
        )
    return names


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.duration, args.users = 4.0, 12_000  # runs long enough for the paced connections to start
    result = run(args)
    passed = result["correct"] and all(result["meets_targets"].values())
    return report(result, summary, as_json=args.json, passed=passed)


if __name__ == "__main__":
    sys.exit(main())
