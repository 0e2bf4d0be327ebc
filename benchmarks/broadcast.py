"""Benchmark: a 100,000-user broadcast, from the segment to the emails at a real SMTP server.

    python -m benchmarks.broadcast [--json] [--audience 100000] [--others 10000]

Three processes besides this one, on loopback: an SMTP sink (benchmarks.relay_smtp,
a lean one under uvloop, writing one line per message as it arrives; the first
message is kept as first.eml), ``sendtime serve`` (a fresh SQLite data folder;
segments evaluated in --segment-processes worker processes; frequency cap off,
64 sends in flight, --smtp-pool connections, 8 by default) and this one, which
drives it over gRPC.

1. Profiles: --audience users who opted in to marketing and --others who opted
   out, each with an identify (email, time zone in one of three zones, consent)
   and two product views.
2. segment_eval_profiles_per_s: SegmentService.CountSegment on
   ``consent.marketing == "opted_in"`` (the stored profiles, walked by the
   server), the best of --count-runs; the server reports the walk's time.
   Also the issue's example expression (the country is the locale here: gRPC
   traits carry no free-form ones): ``issue_example_profiles_per_s``. And a
   baseline in this process: the same stored profiles decoded with msgspec and
   tested by a plain Python predicate (``python_baseline_profiles_per_s``).
3. plan_s and the ingest p99s: a broadcast at a local time hours away (so its
   planning sends nothing: it is cancelled after) is planned while a probe
   sends one IngestEvent at a time at --probe-rate/s; the same probe ran for
   --probe-s seconds before, on the idle server: ``ingest_p99_ms_idle`` against
   ``ingest_p99_ms_during_plan``. plan_s: from the broadcast's start to the
   end of its planning (the server's own times).
4. sent_per_s: a broadcast to the same segment now, at no rate limit: emails
   at the sink over the time from the first to the last (watched twice a
   second, as in 3).
5. Baselines for machines of different speed: the broadcast's first message
   relayed by aiosmtplib alone (benchmarks.relay_baseline) over --smtp-pool
   connections to a fresh sink for --baseline-s (``smtp_baseline_emails_per_s``,
   ``sent_vs_smtp_baseline``), and ``segment_eval_vs_python_baseline``. lost: recipients
   with no email; duplicates: emails beyond one per recipient. The ledger's
   progress (sent, skipped, failed, uncertain) is reported beside.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sqlite3
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Final

import grpc.aio
import msgspec

from benchmarks.harness import machine, progress, ratio, report, work_dir
from benchmarks.relay import smtp_baseline
from benchmarks.servers import ServerProcess, sendtime_server
from sendtime.v1 import broadcast_service_pb2 as B
from sendtime.v1 import broadcast_service_pb2_grpc, event_pb2, event_service_pb2, event_service_pb2_grpc

AUTH: Final = (("authorization", "Bearer dev-key"),)
SEGMENT: Final = 'consent.marketing == "opted_in"'
ISSUE_EXAMPLE: Final = (
    'traits.locale == "de-DE" && viewed.exists(v, v.category == "boots" && now - v.viewed_at < duration("720h"))'
    ' && (last_order_at == null || last_order_at < now - duration("720h"))'
)
ZONES: Final = ("Europe/Berlin", "America/New_York", "Asia/Tokyo")
CATEGORIES: Final = ("boots", "hats", "coats", "bags")
_SINK_READY: Final = r"relay smtp sink serving on (?P<host>\S+):(?P<port>\d+)"
TARGETS: Final = {"segment_eval_profiles_per_s": 200_000, "sent_per_s": 400}


def config_toml(smtp_port: int, segment_processes: int, smtp_pool: int) -> str:
    return f"""\
[delivery]
unsubscribe_secret = "broadcast-benchmark-secret-0123456789"
public_base_url = "https://mail.example.com"
frequency_cap_count = 0
poll_interval_ms = 100
max_concurrent_sends = 64

[delivery.relay]
kind = "smtp"
host = "127.0.0.1"
port = {smtp_port}
tls = "off"
pool_size = {smtp_pool}

[broadcasts]
segment_processes = {segment_processes}
"""


def people(first: int, count: int, *, opted_in: bool) -> list[event_pb2.Event]:
    state = event_pb2.CONSENT_STATE_OPTED_IN if opted_in else event_pb2.CONSENT_STATE_OPTED_OUT
    events = []
    for n in range(first, first + count):
        user = f"user{n}"
        traits = event_pb2.Traits(
            email=f"{user}@example.com",
            first_name="Ada",
            timezone=ZONES[n % 3],
            locale="de-DE" if n % 2 else "en-US",
            consent={"marketing": state},
        )
        events.append(
            event_pb2.Event(
                message_id=f"who-{n}", user_id=user, identify=event_pb2.IdentifyPayload(traits=traits)
            )
        )
        for view in range(2):
            product = {
                "product_id": f"p{(n * 7 + view) % 500}",
                "category": CATEGORIES[(n + view) % 4],
                "price": 20.0,
            }
            events.append(
                event_pb2.Event(
                    message_id=f"view-{n}-{view}",
                    user_id=user,
                    track=event_pb2.TrackPayload(
                        name="Product Viewed", properties_json=json.dumps(product).encode()
                    ),
                )
            )
    return events


async def load_profiles(target: str, audience: int, others: int) -> float:
    """Every user's events, 2,000 a call, four calls in flight; returns events/s."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = event_service_pb2_grpc.EventServiceStub(channel)
        batches = [
            people(start, min(600, first + count - start), opted_in=opted_in)
            for first, count, opted_in in ((0, audience, True), (audience, others, False))
            for start in range(first, first + count, 600)
        ]
        started = time.perf_counter()
        total = 0
        window = asyncio.Semaphore(4)

        async def send(batch: list[event_pb2.Event]) -> None:
            nonlocal total
            async with window:
                answer = await stub.IngestEvents(
                    event_service_pb2.IngestEventsRequest(events=batch), metadata=AUTH, timeout=120
                )
                refused = [a for a in answer.acks if a.outcome == event_pb2.EVENT_OUTCOME_REJECTED]
                if refused:
                    raise RuntimeError(f"events refused: {refused[0]}")
                total += len(batch)

        await asyncio.gather(*(send(b) for b in batches))
        return total / (time.perf_counter() - started)


class Probe:
    """One IngestEvent at a time at a steady rate; each call's latency."""

    def __init__(self, target: str, rate: float) -> None:
        self._target = target
        self._gap = 1 / rate
        self.latencies_ms: list[float] = []
        self._sent = 0

    async def run(self, stop: asyncio.Event, label: str) -> list[float]:
        latencies: list[float] = []
        async with grpc.aio.insecure_channel(self._target) as channel:
            stub = event_service_pb2_grpc.EventServiceStub(channel)
            next_at = time.perf_counter()
            while not stop.is_set():
                self._sent += 1
                event = event_pb2.Event(
                    message_id=f"probe-{label}-{self._sent}",
                    # users of this phase's own: both phases make new profiles alike
                    # (a second phase on the first one's users would find them cached)
                    user_id=f"probe-{label}-{self._sent % 1000}",
                    track=event_pb2.TrackPayload(name="Page Viewed", properties_json=b'{"path": "/"}'),
                )
                started = time.perf_counter()
                await stub.IngestEvent(
                    event_service_pb2.IngestEventRequest(event=event), metadata=AUTH, timeout=30
                )
                latencies.append((time.perf_counter() - started) * 1000)
                next_at += self._gap
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        return latencies


def p99(values: list[float]) -> float | None:
    if len(values) < 20:
        return None
    return round(statistics.quantiles(values, n=100)[98], 2)


async def count_rate(stub: Any, expression: str, runs: int) -> dict[str, Any]:
    best: dict[str, Any] = {}
    for _ in range(runs):
        answer = await stub.CountSegment(
            B.CountSegmentRequest(expression=expression), metadata=AUTH, timeout=600
        )
        elapsed = answer.elapsed.ToTimedelta().total_seconds()
        rate = answer.scanned / elapsed if elapsed else 0.0
        if rate > best.get("profiles_per_s", 0):
            best = {
                "profiles_per_s": round(rate),
                "count": answer.count,
                "scanned": answer.scanned,
                "errors": answer.errors,
                "s": round(elapsed, 3),
            }
    return best


def python_baseline(db: Path, runs: int) -> float:
    """The stored profiles decoded and tested in plain Python, in this process."""
    from sendtime.server.domain.profile import Profile

    decode = msgspec.msgpack.Decoder(Profile).decode
    best = 0.0
    for _ in range(runs):
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            started = time.perf_counter()
            scanned = 0
            for _key, doc in conn.execute("SELECT profile_key, doc FROM profiles"):
                profile = decode(doc)
                consent = profile.consent.get("marketing")
                _ = consent is not None and consent.value == "opted_in"
                scanned += 1
            best = max(best, scanned / (time.perf_counter() - started))
        finally:
            conn.close()
    return round(best)


async def until(
    stub: Any, broadcast_id: str, done: Any, timeout_s: float, every_s: float = 0.05
) -> B.Broadcast:
    deadline = time.monotonic() + timeout_s
    while True:
        answer: B.GetBroadcastResponse = await stub.GetBroadcast(
            B.GetBroadcastRequest(id=broadcast_id), metadata=AUTH
        )
        got = answer.broadcast
        if done(got) or time.monotonic() > deadline:
            return got
        await asyncio.sleep(every_s)


async def drive(args: argparse.Namespace, target: str, sink_file: Path, data_dir: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"audience_target": args.audience, "others": args.others}
    progress(f"loading {args.audience + args.others:,} users (3 events each)")
    result["load_events_per_s"] = round(await load_profiles(target, args.audience, args.others))
    async with grpc.aio.insecure_channel(target) as channel:
        segments = broadcast_service_pb2_grpc.SegmentServiceStub(channel)
        broadcasts = broadcast_service_pb2_grpc.BroadcastServiceStub(channel)
        progress("counting the segment")
        counted = await count_rate(segments, SEGMENT, args.count_runs)
        result["segment_eval_profiles_per_s"] = counted["profiles_per_s"]
        result["segment_count"] = counted
        issue = await count_rate(segments, ISSUE_EXAMPLE, 1)
        result["issue_example_profiles_per_s"] = issue["profiles_per_s"]
        result["issue_example_count"] = issue
        result["python_baseline_profiles_per_s"] = python_baseline(
            data_dir / "sendtime.sqlite3", args.count_runs
        )

        progress(f"ingest probe on the idle server ({args.probe_s:g} s)")
        idle_stop = asyncio.Event()
        idle = asyncio.create_task(Probe(target, args.probe_rate).run(idle_stop, "idle"))
        await asyncio.sleep(args.probe_s)
        idle_stop.set()
        idle_latencies = await idle
        result["ingest_p99_ms_idle"] = p99(idle_latencies)

        progress("planning a local-time broadcast while the probe runs")
        # a local time 14 hours from now, UTC's wall clock: it starts when that time first
        # comes anywhere (UTC+14), now, and in these three zones nobody is due for hours
        local = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() + 14 * 3600 + 1))
        plan_stop = asyncio.Event()
        during = asyncio.create_task(Probe(target, args.probe_rate).run(plan_stop, "plan"))
        planned = (
            await broadcasts.CreateBroadcast(
                B.CreateBroadcastRequest(
                    broadcast=B.Broadcast(
                        idempotency_key="bench-plan",
                        template_id="post_purchase",
                        expression=SEGMENT,
                        local_time=local,
                    )
                ),
                metadata=AUTH,
            )
        ).broadcast
        # asked about twice a second, as a person watching it would: each answer counts
        # the broadcast's ledger rows (plan_s is the server's own times, not this wait's)
        first = await until(broadcasts, planned.id, lambda b: b.HasField("plan_time"), 900, every_s=0.5)
        plan_stop.set()
        during_latencies = await during
        result["ingest_p99_ms_during_plan"] = p99(during_latencies)
        result["probe_calls"] = {"idle": len(idle_latencies), "during_plan": len(during_latencies)}
        start_s = first.start_time.ToDatetime().timestamp() if first.HasField("start_time") else None
        plan_time = first.plan_time.ToDatetime().timestamp()
        result["plan_s"] = round(plan_time - start_s, 2) if start_s is not None else None
        result["planned"] = first.progress.planned
        await broadcasts.CancelBroadcast(B.CancelBroadcastRequest(id=planned.id), metadata=AUTH)

        progress("sending a broadcast to the segment now, no rate limit")
        started = time.time()
        now = (
            await broadcasts.CreateBroadcast(
                B.CreateBroadcastRequest(
                    broadcast=B.Broadcast(
                        idempotency_key="bench-now", template_id="post_purchase", expression=SEGMENT
                    )
                ),
                metadata=AUTH,
            )
        ).broadcast
        final = await until(
            broadcasts,
            now.id,
            lambda b: b.state in (B.BROADCAST_STATE_DONE, B.BROADCAST_STATE_CANCELLED),
            args.send_timeout_s,
            every_s=0.5,
        )
    await asyncio.sleep(0.5)  # the last messages reach the sink's file
    text = await asyncio.to_thread(sink_file.read_text)
    arrivals = [line.split("\t") for line in text.splitlines() if line]
    times = sorted(float(a[0]) for a in arrivals)
    recipients = Counter(a[2].lower() for a in arrivals)
    audience = final.progress.audience
    result["audience"] = audience
    result["emails"] = len(arrivals)
    result["sent_per_s"] = round((len(times) - 1) / (times[-1] - times[0])) if len(times) > 1 else 0
    result["broadcast_s"] = round(times[-1] - started, 1) if times else None
    result["duplicates"] = sum(n - 1 for n in recipients.values() if n > 1)
    result["lost"] = audience - len(recipients)
    progress_fields = final.progress
    result["ledger"] = {
        "state": B.BroadcastState.Name(final.state),
        "sent": progress_fields.sent,
        "skipped": dict(progress_fields.skipped),
        "failed": progress_fields.failed,
        "uncertain": progress_fields.uncertain,
        "scheduled": progress_fields.scheduled,
    }
    return result


def summary(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"broadcast: audience {r.get('audience'):,} of {r.get('audience_target', 0) + r.get('others', 0):,} profiles",
            f"  segment eval: {r.get('segment_eval_profiles_per_s', 0):,}/s (target 200,000); issue's example "
            f"{r.get('issue_example_profiles_per_s', 0):,}/s; plain Python in one process {r.get('python_baseline_profiles_per_s', 0):,}/s",
            f"  plan: {r.get('plan_s')} s; ingest p99 idle {r.get('ingest_p99_ms_idle')} ms, during planning "
            f"{r.get('ingest_p99_ms_during_plan')} ms (target <= 2x)",
            f"  sent: {r.get('sent_per_s', 0):,}/s (target 400); lost {r.get('lost')}, duplicates {r.get('duplicates')}",
            f"  the same message relayed by aiosmtplib alone: {r.get('smtp_baseline_emails_per_s')}/s"
            f" (sent / that: {r.get('sent_vs_smtp_baseline')}); segment eval / plain Python:"
            f" {r.get('segment_eval_vs_python_baseline')}",
            f"  checks: {json.dumps(r.get('checks'))}",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="the result as one JSON line on stdout")
    parser.add_argument("--audience", type=int, default=100_000)
    parser.add_argument("--others", type=int, default=10_000, help="profiles not in the segment")
    parser.add_argument("--segment-processes", type=int, default=2)
    parser.add_argument("--smtp-pool", type=int, default=8, help="SMTP connections to the sink")
    parser.add_argument("--baseline-s", type=float, default=5.0, help="how long the SMTP baseline runs")
    parser.add_argument("--count-runs", type=int, default=3)
    parser.add_argument("--probe-rate", type=float, default=100.0, help="ingest probe calls per second")
    parser.add_argument("--probe-s", type=float, default=5.0)
    parser.add_argument("--send-timeout-s", type=float, default=1800.0)
    parser.add_argument("--keep", metavar="DIR", help="keep the data and logs here")
    args = parser.parse_args()
    with work_dir(args.keep, "sendtime-broadcast-") as work:
        sink_file = work / "arrivals.tsv"
        sink = ServerProcess(
            "smtp sink",
            [
                sys.executable,
                "-m",
                "benchmarks.relay_smtp",
                "--out",
                str(sink_file),
                "--sample",
                str(work / "first.eml"),
            ],
            ready=re.compile(_SINK_READY),
            log_path=work / "smtp.log",
        )
        with sink:
            assert sink.match is not None
            config = work / "sendtime.toml"
            config.write_text(config_toml(int(sink.match["port"]), args.segment_processes, args.smtp_pool))
            server = sendtime_server(work / "data", work, {"SENDTIME_CONFIG": str(config)})
            with server:
                assert server.match is not None
                target = f"{server.match['grpc']}:{server.match['grpc_port']}"
                result = asyncio.run(drive(args, target, sink_file, work / "data"))
        # the same finished message, relayed by aiosmtplib alone over as many
        # connections to a fresh sink: what this machine's SMTP path takes
        settings = argparse.Namespace(pool_size=args.smtp_pool, baseline_duration=args.baseline_s)
        baseline = smtp_baseline(settings, work, work / "first.eml", "smtp-baseline")
    result["smtp_baseline"] = baseline
    result["smtp_baseline_emails_per_s"] = baseline["emails_per_s"] if baseline else None
    result["sent_vs_smtp_baseline"] = ratio(result.get("sent_per_s"), result["smtp_baseline_emails_per_s"])
    result["segment_eval_vs_python_baseline"] = ratio(
        result.get("segment_eval_profiles_per_s"), result.get("python_baseline_profiles_per_s")
    )
    result["segment_processes"] = args.segment_processes
    result["machine"] = machine()
    idle, during = result.get("ingest_p99_ms_idle"), result.get("ingest_p99_ms_during_plan")
    result["checks"] = {
        "lost = 0": result.get("lost") == 0,
        "duplicates = 0": result.get("duplicates") == 0,
        "segment_eval_profiles_per_s >= 200,000": result.get("segment_eval_profiles_per_s", 0) >= 200_000,
        "sent_per_s >= 400": result.get("sent_per_s", 0) >= 400,
        "ingest_p99_ms_during_plan <= 2 x idle": bool(idle and during and during <= 2 * idle),
    }
    result["correct"] = all(result["checks"].values())
    return report(result, summary, as_json=args.json, passed=result["correct"])


if __name__ == "__main__":
    sys.exit(main())
