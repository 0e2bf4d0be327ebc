"""The relay benchmark's load generator, in a process of its own (grpc.aio
under uvloop), run by benchmarks.relay once per run.

    python -m benchmarks.relay_load --target HOST:PORT --prefix RUN --users N \
        --rate R --out FILE [--warmup-users W]

1. Identifies every user (the measured ones and W warm-up ones) through
   IngestEvents, in batches: an email address (``<user id>@bench.example``), a
   first name, and marketing consent; every ack must be "accepted".
2. Opens one StreamEvents stream. Sends one "Product Added" per warm-up user
   (its own cart) at the rate, then pauses --warmup-pause seconds so the
   server's first sends (template compiling, SMTP connections) are behind it.
3. Sends one "Product Added" per measured user, each with a cart id of its
   own, at a fixed rate: event k is due at start + k / rate. Every event is
   serialized before the clock starts; when the loop wakes it writes all the
   events due by then as one message (one event per message at modest rates),
   stamping each with time.time() just before the write.
4. Half-closes the stream and waits for every ack.

Writes a RelayLoadResult as JSON to --out (every event's email and send time,
the acks, how far behind schedule the generator fell) and prints a one-line
summary; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
import uuid
from typing import Final

import grpc
import grpc.aio
import msgspec
import uvloop

from sendtime.v1 import event_pb2, event_service_pb2, event_service_pb2_grpc

API_KEY: Final = "dev-key"
METADATA: Final = (("authorization", f"Bearer {API_KEY}"),)
STREAM_METHOD: Final = "/sendtime.v1.EventService/StreamEvents"
EMAIL_DOMAIN: Final = "bench.example"
IDENTIFY_BATCH: Final = 500
#: At most this many events in one stream message, however far behind the loop is.
MAX_EVENTS_PER_MESSAGE: Final = 200
ACK_TIMEOUT_S: Final = 60.0


class SentEvent(msgspec.Struct, array_like=True):
    email: str
    #: time.time() just before the message holding the event was written
    sent_at: float
    warmup: bool


class RelayLoadResult(msgspec.Struct, kw_only=True):
    prefix: str
    rate_per_s: float
    users: int
    warmup_users: int
    identify_s: float
    #: first and last measured event's send time (time.time())
    first_sent_at: float
    last_sent_at: float
    #: measured events / (last - first send), over the (n - 1) intervals
    achieved_rate_per_s: float
    #: how far behind its schedule the generator wrote events
    p99_lag_ms: float
    max_lag_ms: float
    messages: int
    accepted: int
    not_accepted: int
    unacked: int
    reject_samples: list[str]
    errors: list[str]
    events: list[SentEvent]


def progress(message: str) -> None:
    print(f"relay_load: {message}", file=sys.stderr, flush=True)


def user_id(prefix: str, n: int, *, warmup: bool = False) -> str:
    return f"{prefix}-{'w' if warmup else 'u'}{n:06d}"


def email_of(user: str) -> str:
    return f"{user}@{EMAIL_DOMAIN}"


def identify(user: str) -> event_pb2.Event:
    traits = event_pb2.Traits(
        email=email_of(user),
        first_name="Bench",
        consent={"marketing": event_pb2.CONSENT_STATE_OPTED_IN},
    )
    return event_pb2.Event(
        message_id=str(uuid.uuid4()), user_id=user, identify=event_pb2.IdentifyPayload(traits=traits)
    )


def product_added(user: str) -> bytes:
    properties = {
        "cart_id": f"cart-{user}",
        "product_id": "kettle-steel",
        "name": "Kettle",
        "price": 70,
        "quantity": 1,
    }
    event = event_pb2.Event(
        message_id=str(uuid.uuid4()),
        user_id=user,
        track=event_pb2.TrackPayload(name="Product Added", properties_json=json.dumps(properties).encode()),
    )
    return event.SerializeToString()


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def framed(event: bytes) -> bytes:
    """``event`` as one entry of StreamEventsRequest.events (field 1, length-delimited)."""
    return b"\x0a" + _varint(len(event)) + event


class Acks:
    def __init__(self) -> None:
        self.accepted = 0
        self.not_accepted = 0
        self.received = 0
        self.samples: list[str] = []

    def count(self, response: event_service_pb2.StreamEventsResponse) -> None:
        for ack in response.acks:
            self.received += 1
            if ack.outcome == event_pb2.EVENT_OUTCOME_ACCEPTED:
                self.accepted += 1
            else:
                self.not_accepted += 1
                if len(self.samples) < 5:
                    self.samples.append(f"{ack.message_id}: outcome {ack.outcome}: {ack.reason}")


async def identify_all(channel: grpc.aio.Channel, users: list[str], acks: Acks) -> None:
    stub = event_service_pb2_grpc.EventServiceStub(channel)
    batches = [users[k : k + IDENTIFY_BATCH] for k in range(0, len(users), IDENTIFY_BATCH)]
    slots = asyncio.Semaphore(4)

    async def send(batch: list[str]) -> None:
        request = event_service_pb2.IngestEventsRequest(events=[identify(u) for u in batch])
        async with slots:
            reply = await stub.IngestEvents(request, metadata=METADATA, timeout=60)
        acks.count(event_service_pb2.StreamEventsResponse(acks=reply.acks))

    await asyncio.gather(*(send(batch) for batch in batches))


async def paced(
    call: grpc.aio.StreamStreamCall[bytes, event_service_pb2.StreamEventsResponse],
    users: list[str],
    rate: float,
    warmup: bool,
    sent: list[SentEvent],
    lags: list[float],
) -> int:
    """Writes one Product Added per user, event k at start + k / rate; returns the messages written."""
    bodies = [framed(product_added(u)) for u in users]
    emails = [email_of(u) for u in users]
    interval = 1.0 / rate
    messages = 0
    start = time.perf_counter() + 0.01
    k = 0
    while k < len(bodies):
        now = time.perf_counter()
        due = min(len(bodies), math.floor((now - start) / interval) + 1, k + MAX_EVENTS_PER_MESSAGE)
        if due <= k:
            await asyncio.sleep(start + k * interval - now)
            continue
        stamp = time.time()
        lags.extend(now - (start + j * interval) for j in range(k, due))
        sent.extend(SentEvent(emails[j], stamp, warmup) for j in range(k, due))
        await call.write(b"".join(bodies[k:due]))
        messages += 1
        k = due
    return messages


async def run(args: argparse.Namespace) -> RelayLoadResult:
    users = [user_id(args.prefix, n) for n in range(args.users)]
    warmup_users = [user_id(args.prefix, n, warmup=True) for n in range(args.warmup_users)]
    acks = Acks()
    errors: list[str] = []
    sent: list[SentEvent] = []
    lags: list[float] = []
    messages = 0
    options = [("grpc.max_receive_message_length", 8 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(args.target, options=options) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10.0)
        started = time.perf_counter()
        await identify_all(channel, warmup_users + users, acks)
        identify_s = time.perf_counter() - started
        progress(f"identified {len(warmup_users) + len(users):,} users in {identify_s:.2f} s")

        call = channel.stream_stream(
            STREAM_METHOD,
            request_serializer=None,  # the requests are serialized already
            response_deserializer=event_service_pb2.StreamEventsResponse.FromString,
        )(None, metadata=METADATA)

        async def read_acks() -> None:
            while True:
                response = await call.read()
                if not isinstance(response, event_service_pb2.StreamEventsResponse):
                    return  # grpc.aio.EOF
                acks.count(response)

        reader = asyncio.ensure_future(read_acks())
        try:
            if warmup_users:
                messages += await paced(call, warmup_users, min(args.rate, 100.0), True, sent, [])
                await asyncio.sleep(args.warmup_pause)
                progress(f"warm-up: {len(warmup_users)} events sent, paused {args.warmup_pause:g} s")
            progress(f"sending {len(users):,} Product Added at {args.rate:g}/s")
            messages += await paced(call, users, args.rate, False, sent, lags)
            await call.done_writing()
            await asyncio.wait_for(asyncio.shield(reader), ACK_TIMEOUT_S)
            code = await call.code()
            if code != grpc.StatusCode.OK:
                errors.append(f"stream ended with {code.name}: {await call.details()}")
        except grpc.aio.AioRpcError as exc:
            errors.append(f"stream failed with {exc.code().name}: {exc.details()}")
        except TimeoutError:
            errors.append(f"acks still missing {ACK_TIMEOUT_S:g} s after the last event")
        finally:
            reader.cancel()

    measured = [e for e in sent if not e.warmup]
    first = measured[0].sent_at if measured else 0.0
    last = measured[-1].sent_at if measured else 0.0
    achieved = (len(measured) - 1) / (last - first) if len(measured) > 1 and last > first else 0.0
    lags.sort()
    expected_acks = len(warmup_users) * 2 + len(users) * 2  # identify + Product Added
    return RelayLoadResult(
        prefix=args.prefix,
        rate_per_s=args.rate,
        users=len(users),
        warmup_users=len(warmup_users),
        identify_s=round(identify_s, 3),
        first_sent_at=first,
        last_sent_at=last,
        achieved_rate_per_s=round(achieved, 1),
        p99_lag_ms=round(lags[min(len(lags) - 1, int(0.99 * len(lags)))] * 1000, 2) if lags else 0.0,
        max_lag_ms=round(lags[-1] * 1000, 2) if lags else 0.0,
        messages=messages,
        accepted=acks.accepted,
        not_accepted=acks.not_accepted,
        unacked=max(0, expected_acks - acks.received),
        reject_samples=acks.samples,
        errors=errors,
        events=sent,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--target", required=True, help="sendtime's gRPC HOST:PORT")
    parser.add_argument("--prefix", required=True, help="user ids start with this (unique per run)")
    parser.add_argument("--users", type=int, required=True, help="measured users: one event each")
    parser.add_argument("--rate", type=float, required=True, help="Product Added events per second")
    parser.add_argument("--warmup-users", type=int, default=0)
    parser.add_argument("--warmup-pause", type=float, default=1.0, help="seconds after the warm-up")
    parser.add_argument("--out", required=True, help="file for the RelayLoadResult (JSON)")
    args = parser.parse_args()
    result = uvloop.run(run(args))
    with open(args.out, "wb") as out:
        out.write(msgspec.json.encode(result))
    print(
        f"sent {len(result.events):,} events ({result.warmup_users} warm-up) in {result.messages:,} messages"
        f" at {result.achieved_rate_per_s:,.1f}/s, lag p99 {result.p99_lag_ms} ms,"
        f" accepted {result.accepted:,}, not accepted {result.not_accepted}, errors {len(result.errors)}",
        flush=True,
    )


if __name__ == "__main__":
    main()
