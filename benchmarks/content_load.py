"""The content benchmark's load generator, run by benchmarks.content in a
process of its own and pointed at sendtime or at the echo baseline alike.

    python -m benchmarks.content_load content --target HOST:PORT --label NAME
        [--blocks cart,offers] [--deadline-ms 200] [options]
    python -m benchmarks.content_load render --target HOST:PORT --label NAME
        [--template abandoned_cart] [--deadline-ms 1000] [options]

--concurrency workers (coroutines on one grpc.aio channel under uvloop) each
send one unary call at a time, GetContent or RenderEmail, with the caller
deadline --deadline-ms, cycling through the users from their own offset. The
requests are serialized before the clock starts, and the answers are parsed
and checked after the run (kept as bytes meanwhile), so the load generator's
CPU per call is the same whatever the size of the answers. With --prime every request
is sent once before the warm-up (to fill a cache whatever the warm-up's length).

It warms up, then measures for --duration seconds: successful calls in that
window per second, and the latency of every call in it (from just before the
call to the receipt of its answer, or of its failure: a call that fails with
DEADLINE_EXCEEDED counts at the time it failed). Every answer of the whole run
(warm-up included) is checked: its status, whether it came back within its
deadline (a call failing with DEADLINE_EXCEEDED or answering later than its
deadline is a deadline miss), and each block's source and reason, counted per
block; with --degraded NAME, the answers whose block NAME is missing, or is
neither stale nor fallback, are counted. Progress goes to stderr; the last
stdout line is a ContentLoadResult as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import time
from collections.abc import Callable
from typing import Any, Final

import grpc
import grpc.aio
import msgspec
import uvloop

from benchmarks.content_workload import GET_CONTENT_METHOD, METADATA, RENDER_EMAIL_METHOD, user_ids
from benchmarks.harness import children_cpu_s
from benchmarks.load import CpuWindow
from sendtime.v1 import content_service_pb2

_SOURCES: Final = {
    value.number: value.name.removeprefix("BLOCK_SOURCE_").lower()
    for value in content_service_pb2.DESCRIPTOR.enum_types_by_name["BlockSource"].values
}
_REASONS: Final = {
    value.number: value.name.removeprefix("FALLBACK_REASON_").lower()
    for value in content_service_pb2.DESCRIPTOR.enum_types_by_name["FallbackReason"].values
}
_DEGRADED: Final = frozenset(
    {content_service_pb2.BLOCK_SOURCE_STALE, content_service_pb2.BLOCK_SOURCE_FALLBACK}
)
DRAIN_TIMEOUT_S: Final = 30.0


class ContentLoadResult(msgspec.Struct, kw_only=True):
    label: str
    method: str
    target: str
    concurrency: int
    duration_s: float
    warmup_s: float
    deadline_ms: float
    users: int
    #: blocks asked for (GetContent) or the template (RenderEmail)
    request: str
    request_bytes: int
    mean_response_bytes: float | None
    #: successful calls completed in the measured window, per second
    rps: float
    #: latency of every call of the measured window, a failed one at the time it failed
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    #: the server's own time (server_time in the answer), measured window
    server_p50_ms: float | None
    server_p99_ms: float | None
    #: every call of the run, warm-up and drain included
    calls: int
    ok: int
    errors_by_code: dict[str, int]
    error_samples: list[str]
    #: failed with DEADLINE_EXCEEDED or answered after its deadline (whole run)
    deadline_misses: int
    deadline_misses_in_window: int
    #: deadline misses in each second of the run, warm-up first
    deadline_misses_by_second: list[int]
    #: answers that came back late: the median of the server's own time and of
    #: the latency at the caller (the difference is queueing and transport)
    late_answers: int
    late_server_p50_ms: float | None
    late_latency_p50_ms: float | None
    #: "block: source" or "block: source/reason" -> count, over every answer
    block_sources: dict[str, int]
    #: the same over the answers of the measured window only
    window_block_sources: dict[str, int]
    #: with --degraded: answers whose block was neither stale nor fallback, and
    #: answers without the block
    degraded_block: str | None
    not_degraded: int
    missing_block: int
    #: RenderEmail: answers with an empty subject or HTML
    empty_emails: int
    #: CPU in the measured window, in % of one core
    server_cpu_pct: float | None
    #: the server's child processes (render workers), in % of one core
    server_workers_cpu_pct: float | None
    generator_cpu_pct: float
    machine_busy_pct: float | None
    #: CPU per successful call in the measured window, in microseconds: the
    #: server with its worker processes, and this load generator. Unlike the
    #: rates, these do not depend on how much of the machine the generator takes.
    server_cpu_us_per_call: float | None
    generator_cpu_us_per_call: float | None
    #: --fresh: users taken (one per call, warm-up included), and how often
    #: the walk ran out of users and began again (then users were asked twice)
    users_used: int | None = None
    user_wraps: int | None = None


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Meter:
    def __init__(self, deadline_s: float, degraded: str | None) -> None:
        self.deadline_s = deadline_s
        self.degraded = degraded
        self.measuring = False
        self.calls = 0
        self.ok = 0
        self.window_ok = 0
        self.latencies: list[float] = []
        self.server_times: list[float] = []
        self.misses = 0
        self.started = time.perf_counter()
        #: deadline misses per second since the start (warm-up included)
        self.miss_seconds: collections.Counter[int] = collections.Counter()
        #: (server time, latency) of answers that came back after their deadline
        self.late: list[tuple[float, float]] = []
        self.window_misses = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.error_samples: list[str] = []
        self.sources: collections.Counter[tuple[str, int, int]] = collections.Counter()
        self.window_sources: collections.Counter[tuple[str, int, int]] = collections.Counter()
        self.not_degraded = 0
        self.missing_block = 0
        self.empty_emails = 0
        self.response_bytes = 0
        #: (answer, latency, in the measured window) of answers not read yet
        self.unread: list[tuple[bytes, float, bool]] = []

    def missed(self) -> None:
        self.misses += 1
        self.miss_seconds[int(time.perf_counter() - self.started)] += 1
        if self.measuring:
            self.window_misses += 1

    def failed(self, error: grpc.aio.AioRpcError, latency: float) -> None:
        self.calls += 1
        code = error.code()
        self.errors[code.name] += 1
        if code is grpc.StatusCode.DEADLINE_EXCEEDED or latency > self.deadline_s:
            self.missed()
        if self.measuring:
            self.latencies.append(latency)
        if len(self.error_samples) < 10:
            self.error_samples.append(f"{code.name}: {error.details()}")
            progress(f"error: {code.name}: {error.details()}")

    def answered(self, raw: bytes, latency: float) -> None:
        """Counts an answer as it comes; what it says is read after the run
        (read_answers), so that parsing answers costs this process no CPU while
        the server is measured. Big answers (a whole email) would otherwise cost
        the load generator more than small ones, and on a 2-core machine the
        server would pay for it: the comparison with the echo would measure the
        load generator too."""
        self.calls += 1
        self.ok += 1
        if latency > self.deadline_s:
            self.missed()
        if self.measuring:
            self.window_ok += 1
            self.latencies.append(latency)
        self.unread.append((raw, latency, self.measuring))

    def read_answers(self, parse: Callable[[bytes], Any], render: bool) -> None:
        """Every answer's blocks, server time and (RenderEmail) subject and HTML."""
        for raw, latency, in_window in self.unread:
            answer = parse(raw)
            self.response_bytes += len(raw)
            server_s = answer.server_time.seconds + answer.server_time.nanos * 1e-9
            if render and not (answer.subject and answer.html):
                self.empty_emails += 1
            if latency > self.deadline_s and len(self.late) < 10_000:
                self.late.append((server_s, latency))
            sources = self.window_sources if in_window else self.sources
            found = False
            for block in answer.blocks:
                sources[(block.name, block.source, block.reason)] += 1
                if block.name == self.degraded:
                    found = True
                    if block.source not in _DEGRADED:
                        self.not_degraded += 1
            if self.degraded is not None and not found:
                self.missing_block += 1
            if in_window:
                self.server_times.append(server_s)
        self.unread.clear()

    def block_sources(self, window_only: bool = False) -> dict[str, int]:
        counts = self.window_sources if window_only else self.sources + self.window_sources
        named = {}
        for (name, source, reason), count in sorted(counts.items()):
            label = _SOURCES.get(source, str(source))
            if reason:
                label += "/" + _REASONS.get(reason, str(reason))
            named[f"{name}: {label}"] = count
        return named


async def _call_once(call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes], body: bytes, meter: Meter) -> None:
    started = time.perf_counter()
    try:
        raw = await call(body, timeout=meter.deadline_s, metadata=METADATA)
    except grpc.aio.AioRpcError as error:
        meter.failed(error, time.perf_counter() - started)
        return
    meter.answered(raw, time.perf_counter() - started)


async def _worker(
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes],
    bodies: list[bytes],
    offset: int,
    meter: Meter,
    stopping: asyncio.Event,
) -> None:
    n = offset
    count = len(bodies)
    while not stopping.is_set():
        await _call_once(call, bodies[n % count], meter)
        n += 1


class Cursor:
    """One walk through the users shared by every worker (--fresh): each call
    takes the next user, so no user is asked twice until all have been."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.used = 0

    def take(self) -> int:
        n = self.used
        self.used += 1
        return n % self.count

    @property
    def wraps(self) -> int:
        return max(0, self.used - 1) // self.count if self.used else 0


async def _fresh_worker(
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes],
    bodies: list[bytes],
    cursor: Cursor,
    meter: Meter,
    stopping: asyncio.Event,
) -> None:
    while not stopping.is_set():
        await _call_once(call, bodies[cursor.take()], meter)


async def _prime(
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes],
    bodies: list[bytes],
    meter: Meter,
    concurrency: int,
) -> None:
    """Every request once (``concurrency`` at a time), before the warm-up."""
    pending = iter(bodies)

    async def one() -> None:
        for body in pending:
            await _call_once(call, body, meter)

    await asyncio.gather(*(one() for _ in range(concurrency)))


def _percentile(ordered: list[float], fraction: float) -> float | None:
    if not ordered:
        return None
    index = min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))
    return round(ordered[index] * 1000, 2)


async def run(args: argparse.Namespace) -> ContentLoadResult:
    users = user_ids(args.users, args.first_user)
    render = args.method == "render"
    bodies: list[bytes]
    parse: Callable[[bytes], Any]
    if render:
        method, parse = RENDER_EMAIL_METHOD, content_service_pb2.RenderEmailResponse.FromString
        request = args.template
        bodies = [
            content_service_pb2.RenderEmailRequest(
                template_id=args.template, user_id=user
            ).SerializeToString()
            for user in users
        ]
    else:
        method, parse = GET_CONTENT_METHOD, content_service_pb2.GetContentResponse.FromString
        blocks = [b for b in args.blocks.split(",") if b]
        request = ",".join(blocks)
        bodies = [
            content_service_pb2.GetContentRequest(user_id=user, blocks=blocks).SerializeToString()
            for user in users
        ]
    meter = Meter(args.deadline_ms / 1000, args.degraded)
    options = [("grpc.max_receive_message_length", 8 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(args.target, options=options) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10.0)
        # request_serializer None: the bodies are serialized already; answers
        # are kept as bytes and parsed after the run (Meter.answered)
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            method, request_serializer=None, response_deserializer=None
        )
        if args.prime:
            started = time.perf_counter()
            await _prime(call, bodies, meter, args.concurrency)
            progress(
                f"[{args.label}] primed: every request once in {time.perf_counter() - started:.2f} s,"
                f" {meter.calls:,} calls, {sum(meter.errors.values()):,} errors"
            )
        stopping = asyncio.Event()
        cursor = Cursor(len(bodies))
        tasks = [
            asyncio.ensure_future(
                _fresh_worker(call, bodies, cursor, meter, stopping)
                if args.fresh
                else _worker(call, bodies, k * len(bodies) // args.concurrency, meter, stopping)
            )
            for k in range(args.concurrency)
        ]

        async def watch(seconds: float, phase: str) -> None:
            end = time.perf_counter() + seconds
            while (left := end - time.perf_counter()) > 0:
                before, started = meter.calls, time.perf_counter()
                done, _ = await asyncio.wait(
                    tasks, timeout=min(1.0, left), return_when=asyncio.FIRST_EXCEPTION
                )
                for task in done:
                    if task.exception() is not None:
                        raise RuntimeError(f"a worker failed: {task.exception()!r}")
                interval = time.perf_counter() - started
                if interval >= 0.2:
                    progress(
                        f"[{args.label}] {phase}: {(meter.calls - before) / interval:8,.0f} calls/s,"
                        f" {meter.calls:,} calls, {sum(meter.errors.values()):,} errors,"
                        f" {meter.misses:,} deadline misses"
                    )

        try:
            await watch(args.warmup, "warm-up")
            cpu = CpuWindow(args.server_pid)
            workers_before = children_cpu_s(args.server_pid) if args.server_pid else {}
            meter.measuring = True
            started = time.perf_counter()
            await watch(args.duration, "measure")
            meter.measuring = False
            elapsed = time.perf_counter() - started
            cpu.stop()
            workers_after = children_cpu_s(args.server_pid) if args.server_pid else {}
        finally:
            stopping.set()
            await asyncio.wait(tasks, timeout=DRAIN_TIMEOUT_S)
    meter.read_answers(parse, render)
    latencies = sorted(meter.latencies)
    server_times = sorted(meter.server_times)
    server_cpu, generator_cpu, machine = cpu.percentages()
    workers_cpu = None
    if args.server_pid:
        workers_s = sum(t - workers_before.get(pid, 0.0) for pid, t in workers_after.items())
        workers_cpu = round(100 * workers_s / elapsed, 1)

    def per_call(pct: float | None) -> float | None:
        if pct is None or not meter.window_ok:
            return None
        return round(pct / 100 * elapsed / meter.window_ok * 1e6, 1)

    return ContentLoadResult(
        label=args.label,
        method=method.rsplit("/", 1)[1],
        target=args.target,
        concurrency=args.concurrency,
        duration_s=round(elapsed, 3),
        warmup_s=args.warmup,
        deadline_ms=args.deadline_ms,
        users=len(users),
        request=request,
        request_bytes=round(sum(map(len, bodies)) / len(bodies)),
        mean_response_bytes=round(meter.response_bytes / meter.ok, 1) if meter.ok else None,
        rps=round(meter.window_ok / elapsed, 1),
        p50_ms=_percentile(latencies, 0.50),
        p90_ms=_percentile(latencies, 0.90),
        p99_ms=_percentile(latencies, 0.99),
        max_ms=_percentile(latencies, 1.0),
        server_p50_ms=_percentile(server_times, 0.50),
        server_p99_ms=_percentile(server_times, 0.99),
        calls=meter.calls,
        ok=meter.ok,
        errors_by_code=dict(meter.errors),
        error_samples=meter.error_samples,
        deadline_misses=meter.misses,
        deadline_misses_in_window=meter.window_misses,
        late_answers=len(meter.late),
        late_server_p50_ms=_percentile(sorted(server for server, _ in meter.late), 0.5),
        late_latency_p50_ms=_percentile(sorted(latency for _, latency in meter.late), 0.5),
        deadline_misses_by_second=[
            meter.miss_seconds.get(second, 0) for second in range(max(meter.miss_seconds, default=-1) + 1)
        ],
        block_sources=meter.block_sources(),
        window_block_sources=meter.block_sources(window_only=True),
        degraded_block=args.degraded,
        not_degraded=meter.not_degraded,
        missing_block=meter.missing_block,
        empty_emails=meter.empty_emails,
        server_cpu_pct=server_cpu,
        server_workers_cpu_pct=workers_cpu,
        generator_cpu_pct=generator_cpu,
        machine_busy_pct=machine,
        server_cpu_us_per_call=per_call(None if server_cpu is None else server_cpu + (workers_cpu or 0.0)),
        generator_cpu_us_per_call=per_call(generator_cpu),
        users_used=cursor.used if args.fresh else None,
        user_wraps=cursor.wraps if args.fresh else None,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.content_load", description=__doc__)
    sub = parser.add_subparsers(dest="method", required=True)
    content = sub.add_parser("content", help="GetContent")
    content.add_argument("--blocks", default="cart,recommendations,recently_viewed,offers")
    render = sub.add_parser("render", help="RenderEmail")
    render.add_argument("--template", default="abandoned_cart")
    for p in (content, render):
        p.add_argument("--target", required=True, help="HOST:PORT")
        p.add_argument("--label", required=True)
        p.add_argument("--deadline-ms", type=float, default=200.0, help="the caller's gRPC deadline")
        p.add_argument("--duration", type=float, default=8.0)
        p.add_argument("--warmup", type=float, default=2.0)
        p.add_argument("--concurrency", type=int, default=64, help="calls in flight")
        p.add_argument("--users", type=int, default=400, help="users bench-user-00000 ... to cycle through")
        p.add_argument("--degraded", default=None, help="every answer's block NAME must be stale or fallback")
        p.add_argument("--server-pid", type=int, default=None, help="report this process's CPU use")
        p.add_argument("--prime", action="store_true", help="send every request once before the warm-up")
        p.add_argument("--first-user", type=int, default=0, help="the first user's number")
        p.add_argument(
            "--fresh",
            action="store_true",
            help="every call the next user, none asked twice until all have been (first touch)",
        )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    result = uvloop.run(run(args))
    print(msgspec.json.encode(result).decode(), flush=True)


if __name__ == "__main__":
    main()
