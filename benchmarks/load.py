"""The load generator, run by benchmarks.ingest in a process of its own and
pointed at sendtime or at the echo baseline alike.

    python -m benchmarks.load grpc --target HOST:PORT --label NAME [options]
    python -m benchmarks.load http --url http://HOST:PORT --label NAME [options]

gRPC: several concurrent StreamEvents streams; each sends messages of N events
while at most W events are un-acked on it, and reads acks as they come.
HTTP: several concurrent connections, each POSTing Segment /v1/batch bodies
one after the other. Every event has a fresh message id; all requests are
built from templates made before the clock starts (benchmarks.workload).

It warms up, then measures for --duration seconds: events acked in that window
per second, and each event's ack latency (from just before its message was
written to the receipt of its ack). Then it stops sending, waits for the acks
of everything sent, and checks that each message id was acked exactly once
and accepted. Progress goes to stderr; the last stdout line is a LoadResult as
JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Final

import aiohttp
import grpc
import grpc.aio
import msgspec
import uvloop

from benchmarks.harness import machine_cpu, process_cpu_s
from benchmarks.workload import (
    EventSpec,
    Requests,
    Template,
    grpc_templates,
    make_events,
    segment_templates,
)
from sendtime.v1 import event_pb2, event_service_pb2

STREAM_METHOD: Final = "/sendtime.v1.EventService/StreamEvents"
API_KEY: Final = "dev-key"
_ACCEPTED: Final = event_pb2.EVENT_OUTCOME_ACCEPTED
_OUTCOME_NAMES: Final[dict[int, str]] = {
    event_pb2.EVENT_OUTCOME_ACCEPTED: "accepted",
    event_pb2.EVENT_OUTCOME_DUPLICATE: "duplicate",
    event_pb2.EVENT_OUTCOME_REJECTED: "rejected",
}
DRAIN_TIMEOUT_S: Final = 60.0


class LoadResult(msgspec.Struct, kw_only=True):
    label: str
    transport: str
    target: str
    duration_s: float
    warmup_s: float
    #: gRPC streams or HTTP connections
    concurrency: int
    events_per_message: int
    #: un-acked events allowed per stream (gRPC), or one batch per connection (HTTP)
    window_events: int
    events_per_s: float
    p50_ack_ms: float | None
    p90_ack_ms: float | None
    p99_ack_ms: float | None
    max_ack_ms: float | None
    sent: int
    acked: int
    accepted: int
    duplicate: int
    rejected: int
    #: acks for ids not awaiting one: acked twice, or never sent
    unexpected_acks: int
    #: sent but never acked
    unacked: int
    errors: list[str]
    reject_samples: list[str]
    #: CPU used in the measured window, in % of one core (200 = both cores of two)
    server_cpu_pct: float | None
    generator_cpu_pct: float
    machine_busy_pct: float | None

    @property
    def correct(self) -> bool:
        return (
            not self.errors
            and self.sent > 0
            and self.accepted == self.sent == self.acked
            and not (self.duplicate or self.rejected or self.unexpected_acks or self.unacked)
        )


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- accounting ------------------------------------------------------------


class Meter:
    """Tracks every sent message id until its ack; all on one event loop."""

    def __init__(self) -> None:
        self.pending: dict[str, float] = {}
        self.sent = 0
        self.acked = 0
        self.outcomes = {"duplicate": 0, "rejected": 0}
        self.unexpected = 0
        self.reject_samples: list[str] = []
        self.errors: list[str] = []
        self.measuring = False
        self.window_acked = 0
        self.latencies: list[float] = []

    def sent_now(self, ids: list[str]) -> None:
        self.pending.update(dict.fromkeys(ids, time.perf_counter()))
        self.sent += len(ids)

    def acks(self, acks: Iterable[tuple[str, int, str]], received: float) -> int:
        """Counts (message id, outcome, reason) acks; returns how many there were."""
        pop = self.pending.pop
        latencies = []
        count = 0
        for message_id, outcome, reason in acks:
            count += 1
            sent = pop(message_id, None)
            if sent is None:
                self.unexpected += 1
                continue
            latencies.append(received - sent)
            if outcome != _ACCEPTED:
                self._not_accepted(message_id, outcome, reason)
        self.acked += len(latencies)
        if self.measuring:
            self.window_acked += len(latencies)
            self.latencies += latencies
        return count

    def grpc_acks(self, response: event_service_pb2.StreamEventsResponse, received: float) -> int:
        """``acks`` for a StreamEventsResponse, without making tuples."""
        pop = self.pending.pop
        latencies = []
        for ack in response.acks:
            sent = pop(ack.message_id, None)
            if sent is None:
                self.unexpected += 1
                continue
            latencies.append(received - sent)
            if ack.outcome != _ACCEPTED:
                self._not_accepted(ack.message_id, ack.outcome, ack.reason)
        self.acked += len(latencies)
        if self.measuring:
            self.window_acked += len(latencies)
            self.latencies += latencies
        return len(response.acks)

    def _not_accepted(self, message_id: str, outcome: int, reason: str) -> None:
        name = _OUTCOME_NAMES.get(outcome, f"outcome {outcome}")
        self.outcomes[name if name in self.outcomes else "rejected"] += 1
        if len(self.reject_samples) < 5:
            self.reject_samples.append(f"{message_id}: {name}: {reason}")

    def error(self, message: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(message)
        progress(f"error: {message}")


class Window:
    """At most ``limit`` events un-acked on one stream."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._freed = asyncio.Event()

    async def acquire(self, count: int) -> None:
        while self.used and self.used + count > self.limit:
            self._freed.clear()
            await self._freed.wait()
        self.used += count

    def release(self, count: int) -> None:
        self.used -= count
        self._freed.set()


# -- CPU accounting (process_cpu_s, machine_cpu: benchmarks.harness) -------------


class CpuWindow:
    def __init__(self, server_pid: int | None) -> None:
        self._pid = server_pid
        self._start = self._sample()
        self._end = self._start

    def _sample(self) -> tuple[float, float | None, float, tuple[float, float] | None]:
        server = process_cpu_s(self._pid) if self._pid else None
        return time.perf_counter(), server, time.process_time(), machine_cpu()

    def stop(self) -> None:
        self._end = self._sample()

    def percentages(self) -> tuple[float | None, float, float | None]:
        (w0, s0, g0, m0), (w1, s1, g1, m1) = self._start, self._end
        wall = max(w1 - w0, 1e-9)
        server = None if s0 is None or s1 is None else round(100 * (s1 - s0) / wall, 1)
        machine = None
        if m0 is not None and m1 is not None and m1[1] > m0[1]:
            machine = round(100 * (m1[0] - m0[0]) / (m1[1] - m0[1]), 1)
        return server, round(100 * (g1 - g0) / wall, 1), machine


# -- the run ------------------------------------------------------------------


def _percentile(ordered: list[float], fraction: float) -> float | None:
    if not ordered:
        return None
    index = min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))
    return round(ordered[index] * 1000, 2)


async def _measure(
    args: argparse.Namespace,
    meter: Meter,
    workers: list[Callable[[asyncio.Event], asyncio.Future[None]]],
) -> tuple[float, CpuWindow]:
    """Starts the workers, warms up, measures, stops them; returns the measured seconds."""
    stopping = asyncio.Event()
    tasks = [asyncio.ensure_future(worker(stopping)) for worker in workers]

    async def watch(seconds: float, phase: str) -> None:
        deadline = time.perf_counter() + seconds
        while (left := deadline - time.perf_counter()) > 0:
            before, started = meter.acked, time.perf_counter()
            done, _ = await asyncio.wait(tasks, timeout=min(1.0, left), return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    raise RuntimeError(f"a worker failed: {task.exception()!r}")
            interval = time.perf_counter() - started
            if interval < 0.2:
                continue
            rate = (meter.acked - before) / interval
            progress(
                f"[{args.label}] {phase}: {rate:10,.0f} events/s acked,"
                f" {meter.acked:,} acked, {len(meter.pending):,} in flight"
            )

    try:
        await watch(args.warmup, "warm-up")
        cpu = CpuWindow(args.server_pid)
        meter.measuring = True
        started = time.perf_counter()
        await watch(args.duration, "measure")
        meter.measuring = False
        elapsed = time.perf_counter() - started
        cpu.stop()
    finally:
        stopping.set()
        progress(f"[{args.label}] draining: waiting for the acks of {len(meter.pending):,} events")
        for task in asyncio.as_completed(tasks, timeout=DRAIN_TIMEOUT_S):
            try:
                await task
            except Exception as exc:
                meter.error(f"worker: {exc!r}")
    return elapsed, cpu


async def _grpc_worker(
    channel: grpc.aio.Channel, requests: Requests, meter: Meter, window_events: int, stopping: asyncio.Event
) -> None:
    call = channel.stream_stream(
        STREAM_METHOD,
        request_serializer=None,  # the requests are serialized already
        response_deserializer=event_service_pb2.StreamEventsResponse.FromString,
    )(None, metadata=(("authorization", f"Bearer {API_KEY}"),))
    window = Window(window_events)

    async def read_acks() -> None:
        while True:
            response = await call.read()
            if not isinstance(response, event_service_pb2.StreamEventsResponse):
                return  # grpc.aio.EOF
            window.release(meter.grpc_acks(response, time.perf_counter()))

    reader = asyncio.ensure_future(read_acks())
    try:
        while not stopping.is_set() and not reader.done():
            body, ids = requests.grpc()
            await window.acquire(len(ids))
            if stopping.is_set() or reader.done():
                break
            meter.sent_now(ids)
            await call.write(body)
        await call.done_writing()
        await asyncio.wait_for(asyncio.shield(reader), DRAIN_TIMEOUT_S)
        code = await call.code()
        if code != grpc.StatusCode.OK:
            meter.error(f"stream ended with {code.name}: {await call.details()}")
    except grpc.aio.AioRpcError as exc:
        meter.error(f"stream failed with {exc.code().name}: {exc.details()}")
    finally:
        reader.cancel()


async def run_grpc(args: argparse.Namespace) -> LoadResult:
    templates = _templates(args, grpc_templates)
    meter = Meter()
    options = [("grpc.max_receive_message_length", 8 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(args.target, options=options) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10.0)
        workers = [
            _bind_grpc(
                channel,
                Requests(templates, args.events_per_message, k * len(templates) // args.concurrency),
                meter,
                args.window,
            )
            for k in range(args.concurrency)
        ]
        elapsed, cpu = await _measure(args, meter, workers)
    return _result(args, "grpc", args.target, args.window, meter, elapsed, cpu)


def _bind_grpc(
    channel: grpc.aio.Channel, requests: Requests, meter: Meter, window: int
) -> Callable[[asyncio.Event], asyncio.Future[None]]:
    return lambda stopping: asyncio.ensure_future(_grpc_worker(channel, requests, meter, window, stopping))


class _SegmentResult(msgspec.Struct, rename="camel"):
    message_id: str
    outcome: str
    message: str = ""


class _SegmentResponse(msgspec.Struct):
    results: list[_SegmentResult] = []


_decode_segment = msgspec.json.Decoder(_SegmentResponse).decode
_SEGMENT_OUTCOMES: Final = {
    "accepted": event_pb2.EVENT_OUTCOME_ACCEPTED,
    "duplicate": event_pb2.EVENT_OUTCOME_DUPLICATE,
    "rejected": event_pb2.EVENT_OUTCOME_REJECTED,
}


async def _http_worker(
    session: aiohttp.ClientSession, url: str, requests: Requests, meter: Meter, stopping: asyncio.Event
) -> None:
    while not stopping.is_set():
        body, ids = requests.segment_batch()
        meter.sent_now(ids)
        async with session.post(url, data=body) as response:
            payload = await response.read()
            status = response.status
        received = time.perf_counter()
        try:
            results = _decode_segment(payload).results
        except msgspec.DecodeError:
            results = []
        if status != 200 and not results:
            meter.error(f"HTTP {status}: {payload[:300]!r}")
            continue
        meter.acks(
            ((r.message_id, _SEGMENT_OUTCOMES.get(r.outcome, -1), r.message) for r in results), received
        )


async def run_http(args: argparse.Namespace) -> LoadResult:
    templates = _templates(args, segment_templates)
    meter = Meter()
    basic = base64.b64encode(f"{API_KEY}:".encode()).decode()
    headers = {"Authorization": f"Basic {basic}", "Content-Type": "application/json"}
    url = f"{args.url.rstrip('/')}/v1/batch"
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        async with session.get(f"{args.url.rstrip('/')}/readyz") as ready:
            ready.raise_for_status()

        def bind(requests: Requests) -> Callable[[asyncio.Event], asyncio.Future[None]]:
            return lambda stopping: asyncio.ensure_future(
                _http_worker(session, url, requests, meter, stopping)
            )

        workers = [
            bind(Requests(templates, args.events_per_message, k * len(templates) // args.concurrency))
            for k in range(args.concurrency)
        ]
        elapsed, cpu = await _measure(args, meter, workers)
    return _result(args, "http", url, args.events_per_message, meter, elapsed, cpu)


def _templates(
    args: argparse.Namespace, serialize: Callable[[Sequence[EventSpec]], list[Template]]
) -> list[Template]:
    started = time.perf_counter()
    templates = serialize(make_events(args.templates, users=args.users, seed=args.seed))
    progress(
        f"[{args.label}] built {len(templates):,} event templates from {args.users:,} users"
        f" in {time.perf_counter() - started:.2f} s"
    )
    return templates


def _result(
    args: argparse.Namespace,
    transport: str,
    target: str,
    window: int,
    meter: Meter,
    elapsed: float,
    cpu: CpuWindow,
) -> LoadResult:
    latencies = sorted(meter.latencies)
    server_cpu, generator_cpu, machine = cpu.percentages()
    return LoadResult(
        label=args.label,
        transport=transport,
        target=target,
        duration_s=round(elapsed, 3),
        warmup_s=args.warmup,
        concurrency=args.concurrency,
        events_per_message=args.events_per_message,
        window_events=window,
        events_per_s=round(meter.window_acked / elapsed, 1),
        p50_ack_ms=_percentile(latencies, 0.50),
        p90_ack_ms=_percentile(latencies, 0.90),
        p99_ack_ms=_percentile(latencies, 0.99),
        max_ack_ms=_percentile(latencies, 1.0),
        sent=meter.sent,
        acked=meter.acked,
        accepted=meter.acked - meter.outcomes["duplicate"] - meter.outcomes["rejected"],
        duplicate=meter.outcomes["duplicate"],
        rejected=meter.outcomes["rejected"],
        unexpected_acks=meter.unexpected,
        unacked=len(meter.pending),
        errors=meter.errors,
        reject_samples=meter.reject_samples,
        server_cpu_pct=server_cpu,
        generator_cpu_pct=generator_cpu,
        machine_busy_pct=machine,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__)
    sub = parser.add_subparsers(dest="transport", required=True)
    grpc_parser = sub.add_parser("grpc", help="StreamEvents streams")
    grpc_parser.add_argument("--target", required=True, help="HOST:PORT")
    grpc_parser.add_argument("--window", type=int, default=1000, help="un-acked events per stream")
    http_parser = sub.add_parser("http", help="Segment /v1/batch")
    http_parser.add_argument("--url", required=True, help="http://HOST:PORT")
    for p in (grpc_parser, http_parser):
        p.add_argument("--label", required=True)
        p.add_argument("--duration", type=float, default=10.0)
        p.add_argument("--warmup", type=float, default=1.0)
        p.add_argument("--concurrency", type=int, default=4, help="streams or connections")
        p.add_argument("--events-per-message", type=int, default=100)
        p.add_argument("--users", type=int, default=10_000)
        p.add_argument("--templates", type=int, default=10_000, help="distinct events to cycle through")
        p.add_argument("--seed", type=int, default=1)
        p.add_argument("--server-pid", type=int, default=None, help="report this process's CPU use")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    run = run_grpc if args.transport == "grpc" else run_http
    result = uvloop.run(run(args))
    print(msgspec.json.encode(result).decode(), flush=True)


if __name__ == "__main__":
    main()
