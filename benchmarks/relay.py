"""Benchmark: from a triggering event to the email at the SMTP server, through
a zero-delay flow and sendtime's SMTP relay.

Every run uses three processes of its own besides this one, all on loopback:

- an SMTP server (benchmarks.relay_smtp: a lean SMTP sink under uvloop) that accepts
  every message and writes down its arrival time (time.time()), Message-ID
  and recipient;
- ``sendtime serve`` (benchmarks.servers.sendtime_server: uvloop, a fresh
  data folder, free ports) with one flow, abandoned_cart with delay_s = 0 and
  require_blocks = ["cart"], relaying over SMTP (tls off, pool_size 8) to that
  server, frequency cap off, max_concurrent_sends 64, poll_interval_ms 100;
- a load generator (benchmarks.relay_load: grpc.aio under uvloop) that first
  identifies every user (email, first name, marketing consent), sends a few
  warm-up events (not measured) and pauses, then sends one "Product Added"
  per user, each with a cart of its own, at a fixed rate over one
  StreamEvents stream, writing down each event's send time (time.time()).

Per email, the latency is its arrival at the SMTP server minus its event's
send time (one machine, one wall clock). After the last event the benchmark
waits up to --drain seconds for the emails still missing, reads the delivery
ledger (DeliveryService.ListDeliveries: every send's status, reason and the
server's own event-to-acceptance latency), stops sendtime (SIGTERM) and then
the SMTP server, and counts:

- sent: measured events sent (and accepted);
- lost: measured events whose email had not arrived by the last event's send
  time plus --drain seconds (late: arrived after that, before the stop);
- duplicates: messages received for a user beyond the first (a repeated
  Message-ID or a second email to the same user), warm-up users included;
- p50/p99_event_to_smtp_ms over the measured emails that arrived.

The main run sends --rate events/s (200) for --duration seconds (10). Then a
baseline (benchmarks.relay_baseline): aiosmtplib, the relay's own library,
sends the message the main run received straight to a fresh SMTP server over
as many connections as sendtime's pool, for --baseline-duration seconds: the
emails/s this machine's SMTP path takes without sendtime (once before the
steps, once after; smtp_baseline_emails_per_s is their mean). Then
max_emails_per_s: short runs (--step-duration, 5 s) at rising rates
(--step-rates: from 50/s, finer at the bottom so a slow server still gets a
figure) on a fresh server each, until one has p99 over --max-p99-ms (1000),
loses or duplicates an email, or its generator could not keep the rate, and
fails again when run once more (--step-retries 1: the machine is shared, and
one bad moment should not end the search). max_emails_per_s is the highest
rate sustained before that (the offered rate; each step also reports the
rate measured at the SMTP server). Compare it with the SMTP baseline: a
figure near the baseline means the SMTP server, not sendtime, set it.

    python -m benchmarks.relay [--json] [--duration S] [--rate R]
        [--step-duration S] [--step-rates 50,100,...] [--step-retries N] [--no-steps]
        [--drain S] [--baseline-duration S] [--py-spy DIR] [--keep DIR]

Progress goes to stderr. With --json the last stdout line is one JSON object:
rate_per_s, sent, lost, late, duplicates, p50/p90/p99/max_event_to_smtp_ms,
max_emails_per_s, smtp_baseline_emails_per_s, the main run's details (ledger
statuses, the server's own latency, CPU use of each process and of the rest
of the machine, server log warnings), the per-step results, and
meets_targets (at the main rate of 200/s: p99_event_to_smtp_ms <= 100, lost
== 0, duplicates == 0; max_emails_per_s >= 500). --py-spy DIR samples the
server during every run and prints where its time goes. The machine is small
and shared: compare runs made at the same time (GUIDE.md section 5).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import grpc
import msgspec

from benchmarks.harness import machine_cpu, process_cpu_s, report, summarize_stacks
from benchmarks.relay_load import RelayLoadResult, email_of
from benchmarks.servers import REPO, ServerProcess, sendtime_server
from sendtime.v1 import delivery_service_pb2, delivery_service_pb2_grpc

FLOW_ID: Final = "abandoned_cart"
TARGET_RATE: Final = 200.0
TARGETS: Final[dict[str, float]] = {
    "p99_event_to_smtp_ms": 100.0,
    "lost": 0,
    "duplicates": 0,
    "max_emails_per_s": 500.0,
}
DEFAULT_STEPS: Final = "50,100,150,200,300,400,500,600,800,1000,1500,2000"
_SINK_READY: Final = re.compile(r"relay smtp sink serving on (?P<host>\S+):(?P<port>\d+)")
_LOG_PROBLEM: Final = re.compile(r"\b(WARNING|ERROR|CRITICAL|Traceback)\b")
#: Said at every start of a server configured as this benchmark's is: not a problem.
_LOG_EXPECTED: Final = ("the development API key 'dev-key' is accepted",)
_METADATA: Final = (("authorization", "Bearer dev-key"),)


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def config_toml(smtp_port: int, pool_size: int, max_concurrent_sends: int) -> str:
    return f"""\
[delivery]
unsubscribe_secret = "relay-benchmark-secret-0123456789"
frequency_cap_count = 0
poll_interval_ms = 100
max_concurrent_sends = {max_concurrent_sends}

[delivery.relay]
kind = "smtp"
host = "127.0.0.1"
port = {smtp_port}
tls = "off"
pool_size = {pool_size}

[[flows]]
id = "{FLOW_ID}"
template = "abandoned_cart"
entry_event = "Product Added"
entry_key = "cart_id"
delay_s = 0.0
exit_events = ["Order Completed"]
require_blocks = ["cart"]
"""


# -- one run -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Arrival:
    at: float
    message_id: str
    recipient: str
    size: int


def read_arrivals(path: Path) -> list[Arrival]:
    arrivals = []
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) >= 5:
            arrivals.append(Arrival(float(parts[0]), parts[1], parts[2].lower(), int(parts[4])))
    return arrivals


def count_lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 16), b""))
    except OSError:
        return 0


def _percentile_ms(ordered: list[float], fraction: float) -> float | None:
    if not ordered:
        return None
    index = min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))
    return round(ordered[index] * 1000, 1)


def ledger(target: str) -> dict[str, Any]:
    """The flow's deliveries from DeliveryService.ListDeliveries: counts by
    status, samples of reasons, and the server's own latency (event arrival to
    ESP acceptance)."""
    statuses: collections.Counter[str] = collections.Counter()
    reasons: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    users_by_status: dict[str, set[str]] = collections.defaultdict(set)
    name = delivery_service_pb2.DeliveryStatus.Name
    with grpc.insecure_channel(target) as channel:
        stub = delivery_service_pb2_grpc.DeliveryServiceStub(channel)
        token = ""
        while True:
            reply = stub.ListDeliveries(
                delivery_service_pb2.ListDeliveriesRequest(flow_id=FLOW_ID, page_size=500, page_token=token),
                metadata=_METADATA,
                timeout=30,
            )
            for delivery in reply.deliveries:
                status = name(delivery.status).removeprefix("DELIVERY_STATUS_").lower()
                statuses[status] += 1
                users_by_status[status].add(delivery.user_id)
                if delivery.reason:
                    reasons[f"{status}: {delivery.reason[:160]}"] += 1
                if delivery.HasField("latency"):
                    latencies.append(delivery.latency.ToTimedelta().total_seconds())
            token = reply.next_page_token
            if not token:
                break
    latencies.sort()
    return {
        "deliveries": sum(statuses.values()),
        "statuses": dict(statuses),
        "reasons": dict(reasons.most_common(5)),
        "p50_event_to_accept_ms": _percentile_ms(latencies, 0.5),
        "p99_event_to_accept_ms": _percentile_ms(latencies, 0.99),
        "_users_by_status": users_by_status,
    }


def log_problems(path: Path, limit: int = 8) -> tuple[int, list[str]]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return 0, []
    problems = [
        line
        for line in lines
        if _LOG_PROBLEM.search(line) and not any(expected in line for expected in _LOG_EXPECTED)
    ]
    return len(problems), [line[:300] for line in problems[:limit]]


@contextmanager
def py_spy(out_dir: Path | None, label: str, pid: int, seconds: float) -> Iterator[None]:
    """Samples ``pid`` for ``seconds`` (collapsed stacks) and summarises them afterwards."""
    if out_dir is None:
        yield
        return
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out = out_dir / f"{label}.txt"
    out_dir.mkdir(parents=True, exist_ok=True)
    argv = [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds)))]
    argv += ["--rate", "200", "--format", "raw", "--threads", "--nonblocking", "--output", str(out)]
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        try:
            spy.wait(seconds + 30)
        except subprocess.TimeoutExpired:
            spy.send_signal(signal.SIGINT)
            spy.wait(10)
    if out.exists():
        progress(f"py-spy samples of sendtime during {label} in {out}")
        for line in summarize_stacks(out.read_text(), top=20):
            progress(f"  {line}")
    else:
        progress(f"py-spy recorded nothing for {label} (exit {spy.returncode})")


def run_once(
    args: argparse.Namespace, label: str, rate: float, duration: float, work: Path
) -> dict[str, Any]:
    """One run on a fresh SMTP server and a fresh sendtime; its measurements."""
    run_dir = work / label
    run_dir.mkdir(parents=True)
    users = max(1, round(rate * duration))
    sink_file, sample = run_dir / "arrivals.tsv", run_dir / "sample.eml"
    sink = ServerProcess(
        "smtp sink",
        [sys.executable, "-m", "benchmarks.relay_smtp", "--out", str(sink_file), "--sample", str(sample)],
        ready=_SINK_READY,
        log_path=run_dir / "smtp.log",
    )
    started = time.monotonic()
    with sink:
        assert sink.match is not None
        config = run_dir / "sendtime.toml"
        config.write_text(config_toml(int(sink.match["port"]), args.pool_size, args.max_concurrent_sends))
        server = sendtime_server(run_dir / "data", run_dir, {"SENDTIME_CONFIG": str(config)})
        with server:
            assert server.match is not None
            target = f"{server.match['grpc']}:{server.match['grpc_port']}"
            progress(f"[{label}] sendtime pid {server.pid} on {target}; {users:,} users at {rate:g}/s")
            result = _drive(args, label, rate, users, target, server, sink, sink_file, run_dir)
        result["server_exit_code"] = server.exit_code
        result["server_log_problems"], result["server_log_samples"] = log_problems(server.log_path)
        time.sleep(0.2)  # anything still on the wire reaches the sink's file
    arrivals = read_arrivals(sink_file)
    load: RelayLoadResult = result.pop("_load")
    result.update(score(load, arrivals, result.pop("_drain_deadline"), result["ledger"]))
    result["run_s"] = round(time.monotonic() - started, 1)
    result["label"] = label
    return result


def _drive(
    args: argparse.Namespace,
    label: str,
    rate: float,
    users: int,
    target: str,
    server: ServerProcess,
    sink: ServerProcess,
    sink_file: Path,
    run_dir: Path,
) -> dict[str, Any]:
    load_out = run_dir / "load.json"
    argv = [sys.executable, "-m", "benchmarks.relay_load", "--target", target, "--prefix", label]
    argv += ["--users", str(users), "--rate", str(rate), "--warmup-users", str(args.warmup_users)]
    argv += ["--out", str(load_out)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH")))),
    }
    pids = {"server": server.pid, "smtp_sink": sink.pid}
    cpu_before = {name: process_cpu_s(pid) for name, pid in pids.items()}
    machine_before = machine_cpu()
    wall_before = time.monotonic()
    spy_dir = Path(args.py_spy) if args.py_spy else None
    expected_s = users / rate + 3.0
    with py_spy(spy_dir, label, server.pid, expected_s):
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        generator = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
        stdout, _ = generator.communicate()
        # the generator is the only child to end in between (py-spy ends later)
        waited_for = resource.getrusage(resource.RUSAGE_CHILDREN)
        generator_cpu = (waited_for.ru_utime + waited_for.ru_stime) - (children.ru_utime + children.ru_stime)
        if generator.returncode != 0 or not load_out.exists():
            raise RuntimeError(f"[{label}] the load generator failed (exit {generator.returncode})")
        progress(f"[{label}] {stdout.strip()}")
        load = msgspec.json.decode(load_out.read_bytes(), type=RelayLoadResult)
        expected = len(load.events)
        drain_deadline = load.last_sent_at + args.drain
        while (arrived := count_lines(sink_file)) < expected and time.time() < drain_deadline:
            time.sleep(0.05)
        waited = max(0.0, time.time() - load.last_sent_at)
        progress(f"[{label}] {arrived:,} of {expected:,} emails arrived {waited:.1f} s after the last event")
    wall = time.monotonic() - wall_before
    cpu_after = {name: process_cpu_s(pid) for name, pid in pids.items()}
    machine_after = machine_cpu()
    cpu_pct: dict[str, float | None] = {}
    for name in pids:
        b, a = cpu_before[name], cpu_after[name]
        cpu_pct[name] = round(100 * (a - b) / wall, 1) if a is not None and b is not None else None
    cpu_pct["load_generator"] = round(100 * generator_cpu / wall, 1)
    if machine_before is not None and machine_after is not None and machine_after[1] > machine_before[1]:
        # the whole machine's busy share, in % of one core like the others: what
        # is left after ours is other work on this shared machine (and this script)
        busy = (machine_after[0] - machine_before[0]) / (machine_after[1] - machine_before[1])
        machine = round(100 * busy * (os.cpu_count() or 1), 1)
        cpu_pct["others"] = round(machine - sum(v or 0.0 for v in cpu_pct.values()), 1)
        cpu_pct["machine"] = machine
    book = ledger(target)
    progress(f"[{label}] ledger: {book['statuses']}")
    return {
        "_load": load,
        "_drain_deadline": drain_deadline,
        "ledger": book,
        "cpu_pct_of_one_core": cpu_pct,
        "generator": {
            "achieved_rate_per_s": load.achieved_rate_per_s,
            "p99_lag_ms": load.p99_lag_ms,
            "max_lag_ms": load.max_lag_ms,
            "messages": load.messages,
            "identify_s": load.identify_s,
            "accepted": load.accepted,
            "not_accepted": load.not_accepted,
            "unacked": load.unacked,
            "reject_samples": load.reject_samples,
            "errors": load.errors,
        },
    }


def score(
    load: RelayLoadResult, arrivals: list[Arrival], drain_deadline: float, book: dict[str, Any]
) -> dict[str, Any]:
    """Matches arrivals to events by recipient; latencies, losses, duplicates."""
    sent_at = {e.email: e.sent_at for e in load.events if not e.warmup}
    warmup = {e.email for e in load.events if e.warmup}
    first_arrival: dict[str, float] = {}
    per_user: collections.Counter[str] = collections.Counter()
    per_message_id: collections.Counter[str] = collections.Counter()
    unexpected = 0
    for arrival in arrivals:
        if arrival.recipient not in sent_at and arrival.recipient not in warmup:
            unexpected += 1
            continue
        per_user[arrival.recipient] += 1
        per_message_id[arrival.message_id] += 1
        if arrival.recipient in sent_at:
            first_arrival.setdefault(arrival.recipient, arrival.at)
    duplicates = sum(n - 1 for n in per_user.values())
    duplicate_message_ids = sum(n - 1 for n in per_message_id.values())
    latencies = sorted(at - sent_at[email] for email, at in first_arrival.items())
    on_time = {email for email, at in first_arrival.items() if at <= drain_deadline}
    missing = [email for email in sent_at if email not in on_time]
    late = sum(1 for email in missing if email in first_arrival)
    # why the missing ones are missing, according to the ledger
    users_by_status: dict[str, set[str]] = book.pop("_users_by_status", {})
    missing_by_status: collections.Counter[str] = collections.Counter()
    status_of = {email_of(user): status for status, users in users_by_status.items() for user in users}
    for email in missing:
        if email not in first_arrival:
            missing_by_status[status_of.get(email, "no delivery")] += 1
    arrived_times = sorted(first_arrival.values())
    delivered_per_s = None
    if len(arrived_times) > 1 and load.first_sent_at:
        span = arrived_times[-1] - load.first_sent_at
        delivered_per_s = round(len(arrived_times) / span, 1) if span > 0 else None
    return {
        "sent": len(sent_at),
        "received": len(first_arrival),
        "lost": len(missing) - late,
        "late": late,
        "lost_by_ledger_status": dict(missing_by_status),
        "duplicates": duplicates,
        "duplicate_message_ids": duplicate_message_ids,
        "unexpected_recipients": unexpected,
        "warmup_received": sum(1 for email in warmup if per_user[email]),
        "p50_event_to_smtp_ms": _percentile_ms(latencies, 0.5),
        "p90_event_to_smtp_ms": _percentile_ms(latencies, 0.9),
        "p99_event_to_smtp_ms": _percentile_ms(latencies, 0.99),
        "max_event_to_smtp_ms": _percentile_ms(latencies, 1.0),
        "smtp_emails_per_s": delivered_per_s,
        "mean_message_bytes": round(sum(a.size for a in arrivals) / len(arrivals)) if arrivals else None,
    }


def _brief(label: str, r: dict[str, Any]) -> str:
    return (
        f"[{label}] sent {r['sent']:,}, received {r['received']:,}, lost {r['lost']}, late {r['late']},"
        f" duplicates {r['duplicates']}, p50 {r['p50_event_to_smtp_ms']} ms, p99 {r['p99_event_to_smtp_ms']} ms,"
        f" max {r['max_event_to_smtp_ms']} ms, {r['smtp_emails_per_s']} emails/s at the SMTP server,"
        f" CPU {r['cpu_pct_of_one_core']}, server log problems {r['server_log_problems']}"
    )


def sustained(r: dict[str, Any], rate: float, max_p99_ms: float) -> tuple[bool, str]:
    """Whether a step held its rate; why not otherwise."""
    p99 = r["p99_event_to_smtp_ms"]
    if r["lost"] or r["late"]:
        return False, f"{r['lost']} lost, {r['late']} late"
    if r["duplicates"]:
        return False, f"{r['duplicates']} duplicates"
    if p99 is None or p99 > max_p99_ms:
        return False, f"p99 {p99} ms > {max_p99_ms:g} ms"
    if r["generator"]["achieved_rate_per_s"] < 0.95 * rate:
        return False, f"the generator reached only {r['generator']['achieved_rate_per_s']}/s"
    return True, "ok"


def smtp_baseline(args: argparse.Namespace, work: Path, message: Path, label: str) -> dict[str, Any] | None:
    """benchmarks.relay_baseline against a fresh SMTP server: the SMTP path alone."""
    if not message.exists():
        progress("no message was received to run the SMTP baseline with")
        return None
    run_dir = work / label
    run_dir.mkdir(parents=True, exist_ok=True)
    sink = ServerProcess(
        "smtp sink",
        [sys.executable, "-m", "benchmarks.relay_smtp", "--out", str(run_dir / "arrivals.tsv")],
        ready=_SINK_READY,
        log_path=run_dir / "smtp.log",
    )
    with sink:
        assert sink.match is not None
        argv = [sys.executable, "-m", "benchmarks.relay_baseline", "--port", sink.match["port"]]
        argv += ["--message", str(message), "--connections", str(args.pool_size)]
        argv += ["--duration", str(args.baseline_duration)]
        before, started = process_cpu_s(sink.pid), time.monotonic()
        done = subprocess.run(
            argv,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            timeout=args.baseline_duration + 60,
            check=False,
        )
        after, wall = process_cpu_s(sink.pid), time.monotonic() - started
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        progress(f"the SMTP baseline failed (exit {done.returncode})")
        return None
    result: dict[str, Any] = json.loads(lines[-1])
    if before is not None and after is not None:
        result["smtp_sink_cpu_pct_of_one_core"] = round(100 * (after - before) / wall, 1)
    progress(
        f"[{label}] aiosmtplib straight to the SMTP server over {args.pool_size} connections:"
        f" {result['emails_per_s']:,.0f} emails/s, p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms"
    )
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    keep = Path(args.keep) if args.keep else None
    with tempfile.TemporaryDirectory(prefix="sendtime-relay-bench-") as tmp:
        work = keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%H%M%S")
        main = run_once(args, f"main-{stamp}", args.rate, args.duration, work)
        progress(_brief("main", main))
        sample = work / main["label"] / "sample.eml"
        baselines = [smtp_baseline(args, work, sample, f"baseline-first-{stamp}")]
        steps: list[dict[str, Any]] = []
        max_rate = 0.0
        stopped_by = "no steps run"
        if not args.no_steps:
            stopped_by = "every step sustained"
            for rate in (float(r) for r in args.step_rates.split(",") if r.strip()):
                ok = False
                for attempt in range(1 + args.step_retries):
                    label = f"step{rate:g}-{stamp}" + (f"-again{attempt}" if attempt else "")
                    step = run_once(args, label, rate, args.step_duration, work)
                    ok, why = sustained(step, rate, args.max_p99_ms)
                    step["rate_per_s"] = rate
                    step["sustained"] = ok
                    step["verdict"] = why
                    steps.append(step)
                    progress(_brief(f"step {rate:g}/s", step) + f": {why}")
                    if ok:
                        break
                if not ok:
                    stopped_by = f"{rate:g}/s: {why}"
                    break
                max_rate = rate
        if not args.no_steps:
            baselines.append(smtp_baseline(args, work, sample, f"baseline-last-{stamp}"))
    rates = [b["emails_per_s"] for b in baselines if b is not None]
    result: dict[str, Any] = {
        "rate_per_s": args.rate,
        "duration_s": args.duration,
        "sent": main["sent"],
        "lost": main["lost"],
        "late": main["late"],
        "duplicates": main["duplicates"],
        "p50_event_to_smtp_ms": main["p50_event_to_smtp_ms"],
        "p90_event_to_smtp_ms": main["p90_event_to_smtp_ms"],
        "p99_event_to_smtp_ms": main["p99_event_to_smtp_ms"],
        "max_event_to_smtp_ms": main["max_event_to_smtp_ms"],
        "max_emails_per_s": max_rate if not args.no_steps else None,
        "max_emails_per_s_stopped_by": stopped_by,
        # the mean of the baseline before and after the steps (both below: drift shows)
        "smtp_baseline_emails_per_s": round(sum(rates) / len(rates), 1) if rates else None,
        "main": main,
        "smtp_baselines": baselines,
        "steps": [
            {
                k: s[k]
                for k in (
                    "rate_per_s",
                    "sustained",
                    "verdict",
                    "sent",
                    "lost",
                    "late",
                    "duplicates",
                    "p50_event_to_smtp_ms",
                    "p99_event_to_smtp_ms",
                    "max_event_to_smtp_ms",
                    "smtp_emails_per_s",
                    "cpu_pct_of_one_core",
                    "generator",
                    "ledger",
                    "lost_by_ledger_status",
                    "server_log_problems",
                    "server_log_samples",
                    "run_s",
                )
            }
            for s in steps
        ],
        "settings": {
            "step_duration_s": args.step_duration,
            "step_rates": args.step_rates,
            "step_retries": args.step_retries,
            "max_p99_ms": args.max_p99_ms,
            "drain_s": args.drain,
            "warmup_users": args.warmup_users,
            "pool_size": args.pool_size,
            "max_concurrent_sends": args.max_concurrent_sends,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "aiosmtpd": _version("aiosmtpd"),
            "aiosmtplib": _version("aiosmtplib"),
        },
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    at_target_rate = args.rate == TARGET_RATE
    p99 = result["p99_event_to_smtp_ms"]
    result["meets_targets"] = {
        "p99_event_to_smtp_ms": at_target_rate and p99 is not None and p99 <= TARGETS["p99_event_to_smtp_ms"],
        "lost": at_target_rate and result["lost"] == 0 and result["late"] == 0,
        "duplicates": result["duplicates"] == 0 and all(s["duplicates"] == 0 for s in steps),
        "max_emails_per_s": result["max_emails_per_s"] is not None
        and result["max_emails_per_s"] >= TARGETS["max_emails_per_s"],
    }
    return result


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line last")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of the main run")
    parser.add_argument("--rate", type=float, default=TARGET_RATE, help="events/s of the main run")
    parser.add_argument("--step-duration", type=float, default=5.0, help="seconds of each step")
    parser.add_argument("--step-rates", default=DEFAULT_STEPS, help="comma-separated events/s to try")
    parser.add_argument("--no-steps", action="store_true", help="skip the search for max_emails_per_s")
    parser.add_argument(
        "--step-retries", type=int, default=1, help="runs more of a failed step before the search stops"
    )
    parser.add_argument("--max-p99-ms", type=float, default=1000.0, help="a step's p99 bound")
    parser.add_argument("--drain", type=float, default=10.0, help="seconds to wait after the last event")
    parser.add_argument("--warmup-users", type=int, default=20, help="unmeasured events first")
    parser.add_argument("--pool-size", type=int, default=8, help="delivery.relay.pool_size")
    parser.add_argument("--max-concurrent-sends", type=int, default=64)
    parser.add_argument("--baseline-duration", type=float, default=3.0, help="seconds of the SMTP baseline")
    parser.add_argument("--py-spy", metavar="DIR", help="sample the server with py-spy into DIR")
    parser.add_argument("--keep", metavar="DIR", help="keep every run's files (logs, arrivals) in DIR")
    args = parser.parse_args()
    report(run(args), lambda result: json.dumps(result, indent=2), as_json=args.json)


if __name__ == "__main__":
    main()
