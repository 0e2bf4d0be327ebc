"""Soak: ten minutes of mixed traffic with a kill -9 in the middle, then an
audit of what the server promised.

    python -m benchmarks.soak [--minutes 10] [--kill-at 0.4] [--json] [--out benchmarks/report]

One ``sendtime serve`` (a child process, on fixed free ports so that the
restarted server answers where the first one did) takes, the whole time:
- events over gRPC (IngestEvents, batches of 50, several senders): identifies
  with an email and marketing consent, product views, carts filled and orders
  (an abandoned-cart flow enters on each cart and exits on an order); a batch
  is resent with the same message ids until it is acked, so the kill costs
  retries, never events;
- content calls (cart, recommendations, recently viewed; a 300 ms deadline);
- the flow's emails, relayed to a real SMTP server (aiosmtpd in a thread).

At ``--kill-at`` of the run the server is killed with SIGKILL and started
again on the same data. At the end the load stops, due sends are given time to
go out, and the audit checks:
- every acked event is stored: all of them are sent again and each must come
  back DUPLICATE (``acked_missing``);
- every send that came due went out once or is reported uncertain: the ledger
  (ListDeliveries) against what the SMTP server received, by the ESP message
  id the ledger keeps and the Message-ID header (``duplicate_emails``,
  ``sent_not_received``, ``lost_sends``);
- memory: the server's RSS (with its render workers) at the start and end of
  the last five minutes (``rss_growth_pct_last_5min`` under 10; a run shorter
  than ten minutes, a smoke test, judges its last half). SQLite's page cache
  and the content cache are given 8 MiB each so that they are full by then:
  what still grows is what no bound holds.

Writes soak.json, soak.png (RSS, events and emails over time) and soak.md to
``--out``. With ``--trace-memory FOLDER`` each server runs under tracemalloc
(benchmarks.tracemem: slower) and writes there, every minute from a minute
after its start, the allocation sites that grew most (tracemem-1.txt before
the kill, tracemem-2.txt after). This measures stability, not speed: the rates are fixed and modest.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import socket
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from email.parser import BytesHeaderParser
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any, Final

from aiosmtpd.controller import Controller

from benchmarks.harness import rss_mib
from benchmarks.servers import ServerProcess, sendtime_server
from sendtime.client import AsyncClient, DeliveryStatus, Outcome, SendtimeError, identify_event, track_event
from sendtime.v1 import event_pb2

USERS: Final = 3000
BATCH: Final = 50
SENDERS: Final = 4
FLOW_DELAY_S: Final = 3.0
CONTENT_DEADLINE_S: Final = 0.3
#: Content calls that fail this close to the kill are the restart's; others are not excused.
RESTART_WINDOW_S: Final = 10.0
#: Sends still not final this long after they came due are counted as lost.
DUE_GRACE_S: Final = 10.0
TARGET_RSS_GROWTH_PCT: Final = 10.0

CONFIG: Final = f"""
# The bounded caches sized to fill in the first minutes, so that growth in the
# last five is what no bound holds (a leak), not a cache still warming up:
# SQLite's page cache and the content cache (their defaults, 128 and 64 MiB,
# take longer than the run to fill at these rates).
[storage]
sqlite_cache_mib = 8

[content]
cache_max_bytes = 8388608

[delivery]
frequency_cap_count = 0
poll_interval_ms = 200

[delivery.relay]
kind = "smtp"
host = "127.0.0.1"
port = {{smtp_port}}
tls = "off"

[[flows]]
id = "abandoned_cart"
template = "abandoned_cart"
entry_event = "Product Added"
entry_key = "cart_id"
delay_s = {FLOW_DELAY_S}
exit_events = ["Order Completed"]
require_blocks = ["cart"]
"""
PRODUCTS: Final = ["mug-ceramic", "kettle-steel", "teapot-cast-iron", "tea-sampler", "french-press"]


# -- the SMTP server ------------------------------------------------------------


@dataclass
class Sink:
    """An aiosmtpd handler that keeps each message's Message-ID and queue id."""

    message_ids: list[str] = field(default_factory=list)
    queue_ids: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    per_second: Counter[int] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        headers = BytesHeaderParser().parsebytes(envelope.original_content or envelope.content)
        with self.lock:
            queue_id = f"S{len(self.message_ids) + 1}"
            self.message_ids.append(str(headers.get("Message-ID", "")))
            self.queue_ids.add(queue_id)
            self.per_second[int(time.monotonic() - self.started)] += 1
        return f"250 2.0.0 Ok: queued as {queue_id}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# -- the load -------------------------------------------------------------------


@dataclass
class Shopper:
    user_id: str
    cart: int = 0


@dataclass
class Tally:
    started: float = field(default_factory=time.monotonic)
    acked: list[event_pb2.Event] = field(default_factory=list)
    acked_per_second: Counter[int] = field(default_factory=Counter)
    retried_batches: int = 0
    content_ms: list[float] = field(default_factory=list)
    #: (seconds into the run, the error's class name) per failed content call
    content_errors: list[tuple[float, str]] = field(default_factory=list)
    rss: list[tuple[float, float]] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.started


class Load:
    def __init__(self, target: str, events_per_s: float, content_per_s: float, tally: Tally) -> None:
        self._client = AsyncClient(target, "dev-key", default_timeout=5.0)
        self._events_per_s = events_per_s
        self._content_per_s = content_per_s
        self._tally = tally
        self._shoppers = [Shopper(f"soak-{i}") for i in range(USERS)]
        self._batches: asyncio.Queue[list[event_pb2.Event]] = asyncio.Queue(maxsize=SENDERS * 4)
        self._random = random.Random(7)
        self._serial = itertools.count()

    async def close(self) -> None:
        await self._client.close()

    async def identify_everyone(self) -> None:
        for start in range(0, USERS, BATCH):
            batch = [
                identify_event(
                    s.user_id,
                    email=f"{s.user_id}@example.com",
                    first_name="Soak",
                    consent={"marketing": True},
                    message_id=f"soak-id-{s.user_id}",
                )
                for s in self._shoppers[start : start + BATCH]
            ]
            await self._send(batch)

    def _event(self) -> event_pb2.Event:
        shopper = self._random.choice(self._shoppers)
        product = self._random.choice(PRODUCTS)
        message_id = f"soak-{next(self._serial)}"
        cart_id = f"cart-{shopper.user_id}-{shopper.cart}"
        roll = self._random.random()
        if roll < 0.55:
            return track_event(
                "Product Viewed", {"product_id": product}, user_id=shopper.user_id, message_id=message_id
            )
        if roll < 0.85:
            properties = {"cart_id": cart_id, "product_id": product, "price": 12.5, "quantity": 1}
            return track_event("Product Added", properties, user_id=shopper.user_id, message_id=message_id)
        shopper.cart += 1  # an order closes the cart; the next add opens another
        properties = {"order_id": f"order-{message_id}", "cart_id": cart_id, "total": 12.5}
        return track_event("Order Completed", properties, user_id=shopper.user_id, message_id=message_id)

    async def produce(self, until: float) -> None:
        interval = BATCH / self._events_per_s
        next_at = time.monotonic()
        while time.monotonic() < until:
            await self._batches.put([self._event() for _ in range(BATCH)])
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def send_batches(self) -> None:
        while True:
            batch = await self._batches.get()
            try:
                await self._send(batch)
            finally:
                self._batches.task_done()

    async def _send(self, batch: list[event_pb2.Event]) -> None:
        """Until acked: the same message ids each time, so a retry is never a second event."""
        while True:
            try:
                acks = await self._client.ingest(batch, timeout=5.0)
            except SendtimeError:
                self._tally.retried_batches += 1
                await asyncio.sleep(0.2)
                continue
            for event, ack in zip(batch, acks, strict=True):
                if ack.outcome in (Outcome.ACCEPTED, Outcome.DUPLICATE):
                    self._tally.acked.append(event)
                else:
                    raise RuntimeError(f"soak event {event.message_id} rejected: {ack.reason}")
            self._tally.acked_per_second[int(self._tally.now())] += len(batch)
            return

    async def ask_content(self, until: float) -> None:
        interval = 1 / self._content_per_s
        calls: set[asyncio.Task[None]] = set()
        while time.monotonic() < until:
            task = asyncio.create_task(self._one_content_call())
            calls.add(task)
            task.add_done_callback(calls.discard)
            await asyncio.sleep(interval)
        await asyncio.gather(*calls)

    async def _one_content_call(self) -> None:
        user = self._random.choice(self._shoppers).user_id
        started = time.perf_counter()
        try:
            await self._client.get_content(
                user, blocks=["cart", "recommendations", "recently_viewed"], timeout=CONTENT_DEADLINE_S
            )
        except SendtimeError as error:
            self._tally.content_errors.append((self._tally.now(), type(error).__name__))
            return
        self._tally.content_ms.append((time.perf_counter() - started) * 1000)

    async def drain(self) -> None:
        await self._batches.join()

    async def audit_events(self) -> int:
        """Sends every acked event again; each must come back DUPLICATE. Returns how many did not."""
        missing = 0
        for start in range(0, len(self._tally.acked), 2500):
            batch = self._tally.acked[start : start + 2500]
            acks = await self._client.ingest(batch, timeout=60.0)
            missing += sum(ack.outcome is not Outcome.DUPLICATE for ack in acks)
        return missing

    async def deliveries(self) -> list[Any]:
        found: list[Any] = []
        token: str | None = None
        while True:
            page = await self._client.list_deliveries(
                flow_id="abandoned_cart", page_size=500, page_token=token
            )
            found.extend(page.deliveries)
            token = page.next_page_token or None
            if token is None:
                return found


# -- memory ---------------------------------------------------------------------


async def sample_rss(server: list[ServerProcess], tally: Tally, until: float) -> None:
    while time.monotonic() < until:
        rss = rss_mib(server[0].pid)
        if rss:  # 0 while the killed server is down
            tally.rss.append((tally.now(), rss))
        await asyncio.sleep(2.0)


# -- the run --------------------------------------------------------------------


def judged_window(duration_s: float) -> float:
    """Memory growth is judged on the last 5 minutes (the last half of a shorter smoke run)."""
    return min(300.0, duration_s / 2)


@dataclass
class Result:
    duration_s: float
    kill_at_s: float
    restart_s: float
    events_acked: int
    events_per_s: float
    retried_batches: int
    acked_missing: int
    content_calls: int
    #: Failed content calls by error, and those more than RESTART_WINDOW_S away from the kill.
    content_errors: dict[str, int]
    content_errors_away_from_kill: int
    content_p50_ms: float
    content_p99_ms: float
    sends: dict[str, int]
    emails_received: int
    duplicate_emails: int
    sent_not_received: int
    lost_sends: int
    rss_start_mib: float
    rss_end_mib: float
    rss_growth_pct_last_5min: float
    meets_targets: dict[str, bool]


async def soak(
    minutes: float,
    kill_at: float,
    events_per_s: float,
    content_per_s: float,
    work: Path,
    trace_memory: Path | None = None,
) -> tuple[Result, Tally, Sink]:
    sink = Sink()
    smtp_port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=smtp_port)
    controller.start()
    grpc_port, http_port = free_port(), free_port()
    config = work / "soak.toml"
    config.write_text(CONFIG.format(smtp_port=smtp_port))
    overrides = {
        "SENDTIME_CONFIG": str(config),
        "SENDTIME_GRPC__PORT": str(grpc_port),
        "SENDTIME_HTTP__PORT": str(http_port),
    }

    starts = itertools.count(1)

    def start() -> ServerProcess:
        python_args: list[str] = []
        if trace_memory is not None:
            trace_memory.mkdir(parents=True, exist_ok=True)
            out = trace_memory / f"tracemem-{next(starts)}.txt"
            python_args = [
                "-m",
                "benchmarks.tracemem",
                "--out",
                str(out),
                "--settle",
                "60",
                "--every",
                "60",
                "--",
            ]
        server = sendtime_server(work / "data", work, overrides, python_args=python_args)
        server.start()
        return server

    server = [start()]
    tally = Tally()
    sink.started = tally.started
    load = Load(f"127.0.0.1:{grpc_port}", events_per_s, content_per_s, tally)
    duration = minutes * 60
    restart_s = 0.0
    try:
        await load.identify_everyone()
        until = time.monotonic() + duration
        senders = [asyncio.create_task(load.send_batches()) for _ in range(SENDERS)]
        running = asyncio.gather(
            load.produce(until), load.ask_content(until), sample_rss(server, tally, until)
        )
        await asyncio.sleep(duration * kill_at)
        print(f"soak: kill -9 at {tally.now():.0f} s", file=sys.stderr, flush=True)
        killed = time.monotonic()
        server[0].kill()
        server[0] = await asyncio.to_thread(start)
        restart_s = time.monotonic() - killed
        print(f"soak: serving again after {restart_s:.1f} s", file=sys.stderr, flush=True)
        await running
        await load.drain()
        for sender in senders:
            sender.cancel()
        ended = tally.now()
        await asyncio.sleep(FLOW_DELAY_S + DUE_GRACE_S)  # the last carts' emails come due and go out
        audited_at = time.time()
        deliveries = await load.deliveries()
        acked_missing = await load.audit_events()
    finally:
        await load.close()
        server[0].stop()
        controller.stop()

    statuses = Counter(d.status.name.lower() for d in deliveries)
    final = {
        DeliveryStatus.SENT,
        DeliveryStatus.SKIPPED,
        DeliveryStatus.CANCELLED,
        DeliveryStatus.FAILED,
        DeliveryStatus.UNCERTAIN,
    }
    # due long enough before the audit to have gone out, and still not final
    lost = sum(
        d.status not in final and d.due_time is not None and d.due_time.timestamp() < audited_at - DUE_GRACE_S
        for d in deliveries
    )
    sent_ids = [d.esp_message_id for d in deliveries if d.status is DeliveryStatus.SENT]
    header_counts = Counter(sink.message_ids)
    window = [(t, r) for t, r in tally.rss if t >= duration - judged_window(duration)]
    edge = min(30.0, judged_window(duration) / 5)  # the window's first and last 30 s
    rss_start = statistics.median(r for t, r in window if t <= window[0][0] + edge)
    rss_end = statistics.median(r for t, r in window if t >= window[-1][0] - edge)
    growth = (rss_end - rss_start) / rss_start * 100
    ordered = sorted(tally.content_ms)
    result = Result(
        duration_s=round(duration, 1),
        kill_at_s=round(duration * kill_at, 1),
        restart_s=round(restart_s, 2),
        events_acked=len(tally.acked),
        events_per_s=round(len(tally.acked) / ended, 1),
        retried_batches=tally.retried_batches,
        acked_missing=acked_missing,
        content_calls=len(ordered) + len(tally.content_errors),
        content_errors=dict(Counter(kind for _, kind in tally.content_errors)),
        content_errors_away_from_kill=sum(
            abs(at - duration * kill_at) > RESTART_WINDOW_S for at, _ in tally.content_errors
        ),
        content_p50_ms=round(ordered[len(ordered) // 2], 2) if ordered else 0.0,
        content_p99_ms=round(ordered[int(len(ordered) * 0.99)], 2) if ordered else 0.0,
        sends=dict(statuses),
        emails_received=len(sink.message_ids),
        duplicate_emails=sum(n - 1 for n in header_counts.values() if n > 1),
        sent_not_received=sum(queue_id not in sink.queue_ids for queue_id in sent_ids),
        lost_sends=lost,
        rss_start_mib=round(rss_start, 1),
        rss_end_mib=round(rss_end, 1),
        rss_growth_pct_last_5min=round(growth, 2),
        meets_targets={},
    )
    result.meets_targets = {
        "acked_missing": result.acked_missing == 0,
        "duplicate_emails": result.duplicate_emails == 0,
        "sent_not_received": result.sent_not_received == 0,
        "lost_sends": result.lost_sends == 0,
        "rss_growth_pct_last_5min": result.rss_growth_pct_last_5min < TARGET_RSS_GROWTH_PCT,
    }
    return result, tally, sink


# -- the report -----------------------------------------------------------------


def plot(result: Result, tally: Tally, sink: Sink, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory, events, emails) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    memory.plot([t for t, _ in tally.rss], [r for _, r in tally.rss], color="tab:purple")
    memory.set_ylabel("RSS (MiB)\nserver + workers")
    seconds = range(int(result.duration_s) + 1)
    events.plot(
        list(seconds), [tally.acked_per_second.get(s, 0) for s in seconds], color="tab:blue", linewidth=0.6
    )
    events.set_ylabel("events acked/s")
    emails.plot(list(seconds), [sink.per_second.get(s, 0) for s in seconds], color="tab:green", linewidth=0.6)
    emails.set_ylabel("emails received/s")
    emails.set_xlabel("seconds into the run")
    for axis in (memory, events, emails):
        axis.axvline(result.kill_at_s, color="tab:red", linestyle="--", linewidth=1)
        axis.axvspan(
            result.duration_s - judged_window(result.duration_s), result.duration_s, color="0.9", zorder=0
        )
        axis.grid(alpha=0.3)
    memory.set_title("soak: kill -9 at the dashed line; the grey band is the window RSS growth is judged on")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def markdown(result: Result) -> str:
    met = all(result.meets_targets.values())
    return "\n".join(
        [
            "# Soak",
            "",
            f"{result.duration_s / 60:.0f} minutes of mixed traffic, `kill -9` at {result.kill_at_s:.0f} s "
            f"(serving again after {result.restart_s:.1f} s). Targets {'met' if met else 'NOT met'}.",
            "",
            "| what | value |",
            "| --- | --- |",
            f"| events acked | {result.events_acked:,} ({result.events_per_s:,.0f}/s, {result.retried_batches} batches resent) |",
            f"| acked events missing after the run | {result.acked_missing} |",
            f"| content calls | {result.content_calls:,}, p50 {result.content_p50_ms} ms, p99 {result.content_p99_ms} ms |",
            f"| content calls that failed | {sum(result.content_errors.values())} ({', '.join(f'{k} {v}' for k, v in sorted(result.content_errors.items())) or 'none'}); {result.content_errors_away_from_kill} of them more than {RESTART_WINDOW_S:.0f} s from the kill |",
            f"| sends by status | {', '.join(f'{k} {v:,}' for k, v in sorted(result.sends.items()))} |",
            f"| emails received by SMTP | {result.emails_received:,} |",
            f"| duplicate emails | {result.duplicate_emails} |",
            f"| sent but not received | {result.sent_not_received} |",
            f"| sends lost (due, not final) | {result.lost_sends} |",
            f"| RSS over the last 5 minutes | {result.rss_start_mib} -> {result.rss_end_mib} MiB ({result.rss_growth_pct_last_5min:+.1f}%) |",
            "",
            "![soak](soak.png)",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the run (default 10)")
    parser.add_argument(
        "--kill-at", type=float, default=0.4, help="share of the run at which to kill -9 (default 0.4)"
    )
    parser.add_argument("--events-per-s", type=float, default=300.0)
    parser.add_argument("--content-per-s", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=None, help="write soak.json, soak.png and soak.md here")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--trace-memory",
        type=Path,
        default=None,
        metavar="FOLDER",
        help="run the server under tracemalloc and write its top growth here every minute (slower)",
    )
    args = parser.parse_args(argv)
    if args.minutes < 1:
        parser.error("--minutes must be at least 1")
    with TemporaryDirectory(prefix="sendtime-soak-") as folder:
        result, tally, sink = asyncio.run(
            soak(
                args.minutes,
                args.kill_at,
                args.events_per_s,
                args.content_per_s,
                Path(folder),
                args.trace_memory,
            )
        )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "soak.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
        plot(result, tally, sink, args.out / "soak.png")
        (args.out / "soak.md").write_text(markdown(result))
    print(json.dumps(asdict(result)) if args.json else markdown(result))
    return 0 if all(result.meets_targets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
