"""High-volume ingest over the StreamEvents bidirectional stream.

    async with client.stream() as stream:
        for event in events:
            ack = await stream.send(event)   # a future, resolved once the event is durable
        await stream.flush()                 # every event sent so far is acked

One task owns the connection: a writer sends queued events in batches (up to
``batch_size`` events, waiting at most ``linger`` seconds for a batch to fill)
while the connection task reads acks and resolves each event's future by
message id. ``send`` waits while ``max_in_flight`` events are un-acked: that
is the backpressure, so memory stays bounded however fast the caller produces.

A disconnect or UNAVAILABLE (the server shuts down, restarts, the network
drops) is not an error the caller sees: the stream reconnects with backoff and
resends every un-acked event. That is safe because the message id is the
server's idempotency key; an event the server had stored before the drop is
acked DUPLICATE. Any other failure (bad API key, missing scope) fails the
stream and every un-acked event with its typed error.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self

import grpc
import grpc.aio

from sendtime.client._errors import Cancelled, SendtimeError, Unavailable, error_from_rpc
from sendtime.client._events import Ack, ack_from_proto
from sendtime.client._retry import RetryPolicy
from sendtime.v1 import event_pb2, event_service_pb2

StreamCall = grpc.aio.StreamStreamCall[
    event_service_pb2.StreamEventsRequest, event_service_pb2.StreamEventsResponse
]

DEFAULT_MAX_IN_FLIGHT: Final = 10_000
DEFAULT_BATCH_SIZE: Final = 500
DEFAULT_LINGER: Final = 0.005
#: Below the server's default 8 MiB message limit with room to spare.
DEFAULT_MAX_BATCH_BYTES: Final = 2 * 1024 * 1024
DEFAULT_RECONNECT_TIMEOUT: Final = 60.0


@dataclass(slots=True, eq=False)
class _Pending:
    seq: int
    event: event_pb2.Event
    ack: asyncio.Future[Ack]


class EventStream:
    """Sends events over one long-lived stream; see the module docstring.
    Made by ``AsyncClient.stream()``; use it as an async context manager, or
    call ``close()`` (flush and end) or ``abort()`` (stop now) yourself."""

    def __init__(
        self,
        open_call: Callable[[], StreamCall],
        *,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        batch_size: int = DEFAULT_BATCH_SIZE,
        linger: float = DEFAULT_LINGER,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        reconnect_timeout: float | None = DEFAULT_RECONNECT_TIMEOUT,
        retry: RetryPolicy | None = None,
        on_finish: Callable[[EventStream], None] | None = None,
    ) -> None:
        if max_in_flight < 1 or batch_size < 1 or max_batch_bytes < 1:
            raise ValueError("max_in_flight, batch_size and max_batch_bytes must be at least 1")
        if linger < 0:
            raise ValueError("linger must not be negative")
        if reconnect_timeout is not None and reconnect_timeout <= 0:
            raise ValueError("reconnect_timeout must be positive (or None to retry forever)")
        self._open_call = open_call
        self._max_in_flight = max_in_flight
        self._batch_size = batch_size
        self._linger = linger
        self._max_batch_bytes = max_batch_bytes
        self._reconnect_timeout = reconnect_timeout
        self._retry = retry or RetryPolicy(initial_backoff=0.1, max_backoff=5.0)
        self._on_finish = on_finish

        # Un-acked events by sequence number; dict order is send order, so the
        # first key is the oldest un-acked event.
        self._pending: dict[int, _Pending] = {}
        # Sequence numbers per message id, oldest first: acks are matched by
        # message id, and the same id may be in flight twice.
        self._by_id: dict[str, deque[int]] = {}
        self._next_seq = 0
        self._outbox: deque[_Pending] = deque()  # not yet written on the current connection

        self._wake = asyncio.Event()  # new events to write, or closing
        self._progress = asyncio.Event()  # acks arrived, or the stream finished
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._aborted = False
        self._error: SendtimeError | None = None
        self.reconnects = 0
        """How many times the stream connected again after losing its connection."""

    # ------------------------------------------------------------------ public

    @property
    def in_flight(self) -> int:
        """Events sent and not yet acked."""
        return len(self._pending)

    async def send(self, event: event_pb2.Event) -> asyncio.Future[Ack]:
        """Queue ``event`` and return a future of its ack. Waits first while
        ``max_in_flight`` events are un-acked. Raises the stream's error if it
        failed, RuntimeError if it was closed."""
        self._check_open()
        while len(self._pending) >= self._max_in_flight:
            self._progress.clear()
            await self._progress.wait()
            self._check_open()
        entry = _Pending(self._next_seq, event, asyncio.get_running_loop().create_future())
        self._next_seq += 1
        self._pending[entry.seq] = entry
        seqs = self._by_id.get(event.message_id)
        if seqs is None:
            self._by_id[event.message_id] = deque((entry.seq,))
        else:
            seqs.append(entry.seq)
        self._outbox.append(entry)
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="sendtime-event-stream")
        return entry.ack

    async def send_many(self, events: Iterable[event_pb2.Event]) -> list[asyncio.Future[Ack]]:
        return [await self.send(event) for event in events]

    async def flush(self) -> None:
        """Wait until every event sent before this call is acked (bound the wait
        with ``asyncio.timeout``). Raises the stream's error if it failed."""
        horizon = self._next_seq
        while self._pending and next(iter(self._pending)) < horizon and self._error is None:
            self._progress.clear()
            await self._progress.wait()
        if self._error is not None:
            raise self._error

    async def close(self) -> None:
        """Flush, then end the stream. Raises the stream's error if it failed;
        does nothing after ``abort()``."""
        if self._aborted:
            return
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await asyncio.wait([self._task])  # like shield: a cancelled close leaves the stream running
        else:
            self._finish()
        if self._error is not None:
            raise self._error

    async def abort(self) -> None:
        """End the stream now. Un-acked events fail with ``Cancelled``; they
        may or may not have been stored (resending them is safe)."""
        self._closing = self._aborted = True
        if self._task is None:
            self._finish()
            return
        self._task.cancel()
        await asyncio.wait([self._task])

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            await self.close()
        else:
            await self.abort()

    # ----------------------------------------------------------- the machinery

    def _check_open(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closing:
            raise RuntimeError("the event stream is closed")

    async def _run(self) -> None:
        retry = 0
        give_up_at: float | None = None
        try:
            while True:
                while not self._pending:  # connect only when there is something to send
                    if self._closing:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                progressed, error = await self._connect_once()
                if error is None:
                    if not self._pending:
                        if self._closing:
                            return
                        continue
                    # The server ended the stream cleanly with events un-acked: resend them.
                    error = Unavailable("the server ended the stream before acking every event")
                if not _is_disconnect(error):
                    self._fail(error)
                    return
                if progressed:
                    retry, give_up_at = 0, None
                delay = self._retry.backoff(retry)
                retry += 1
                now = time.monotonic()
                if give_up_at is None and self._reconnect_timeout is not None:
                    give_up_at = now + self._reconnect_timeout
                if give_up_at is not None and now + delay > give_up_at:
                    self._fail(error)
                    return
                await asyncio.sleep(delay)
                self.reconnects += 1
        except asyncio.CancelledError:
            self._fail(Cancelled("the event stream was aborted before the event was acked"))
            raise
        except Exception as exc:  # a bug of ours must not leave senders waiting forever
            error = SendtimeError(f"the event stream failed: {exc!r}")
            error.__cause__ = exc
            self._fail(error)
        finally:
            self._finish()

    async def _connect_once(self) -> tuple[bool, SendtimeError | None]:
        """One connection: resend everything un-acked, then write and read until
        the stream ends. Returns whether any ack arrived, and the error."""
        call = self._open_call()
        self._outbox = deque(self._pending.values())
        writer = asyncio.create_task(self._write(call, self._outbox), name="sendtime-event-stream-writer")
        progressed = False
        error: SendtimeError | None = None
        try:
            async for response in call:
                if response.acks:
                    progressed = True
                    self._resolve(response.acks)
        except grpc.aio.AioRpcError as exc:
            error = error_from_rpc(exc)
        finally:
            writer.cancel()
            await asyncio.wait([writer])
            if not call.done():
                call.cancel()
        if not writer.cancelled() and (failure := writer.exception()) is not None:
            raise failure  # the writer's own failure, not the CANCELLED it caused
        return progressed, error

    async def _write(self, call: StreamCall, outbox: deque[_Pending]) -> None:
        pending = self._pending
        try:
            while True:
                if not outbox:
                    if self._closing and not pending:
                        await call.done_writing()
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                if len(outbox) < self._batch_size and self._linger and not self._closing:
                    await asyncio.sleep(self._linger)  # let a batch fill
                batch: list[event_pb2.Event] = []
                size = 0
                while outbox and len(batch) < self._batch_size:
                    entry = outbox[0]
                    if entry.seq not in pending:  # acked meanwhile (by an earlier connection's ack)
                        outbox.popleft()
                        continue
                    event_size = entry.event.ByteSize()
                    if batch and size + event_size > self._max_batch_bytes:
                        break
                    outbox.popleft()
                    batch.append(entry.event)
                    size += event_size
                if batch:
                    await call.write(event_service_pb2.StreamEventsRequest(events=batch))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return  # the call has ended; the reader gets its status
        except Exception:
            call.cancel()  # end the reader's wait too
            raise

    def _resolve(self, acks: Iterable[event_pb2.EventAck]) -> None:
        pending, by_id = self._pending, self._by_id
        for proto in acks:
            seqs = by_id.get(proto.message_id)
            if not seqs:
                continue  # an event acked already: a resend raced its first ack
            seq = seqs.popleft()
            if not seqs:
                del by_id[proto.message_id]
            entry = pending.pop(seq)
            if not entry.ack.done():  # the caller may have cancelled the future
                entry.ack.set_result(ack_from_proto(proto))
        self._progress.set()
        if self._closing and not pending:
            self._wake.set()  # the writer may now end the stream

    def _fail(self, error: SendtimeError) -> None:
        if self._error is None:
            self._error = error
        for entry in self._pending.values():
            if not entry.ack.done():
                entry.ack.set_exception(error)
                # send(), flush() and close() raise the error too, so an ignored
                # future is not worth asyncio's "exception never retrieved" log.
                entry.ack.exception()
        self._pending.clear()
        self._by_id.clear()
        self._outbox.clear()
        self._progress.set()

    def _finish(self) -> None:
        self._closing = True
        self._progress.set()
        if self._on_finish is not None:
            on_finish, self._on_finish = self._on_finish, None
            on_finish(self)


#: What grpc.aio reports, as a local INTERNAL status, when the server ends a
#: stream while we are writing to it: the server's own status (UNAVAILABLE on
#: shutdown) is lost. Only this exact message counts, not any INTERNAL, so that
#: a server that keeps failing an event is not retried forever.
_LOCAL_WRITE_FAILURE: Final = "Internal error from Core"


def _is_disconnect(error: SendtimeError) -> bool:
    # CANCELLED that we did not cause comes from the server (a shutdown past its
    # grace period resets open streams): as retryable as a dropped connection.
    if error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return True
    return error.code is grpc.StatusCode.INTERNAL and error.message == _LOCAL_WRITE_FAILURE
