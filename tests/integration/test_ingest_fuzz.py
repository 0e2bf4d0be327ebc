"""Property tests of the ingest doors: generated and mutated Segment envelopes
and batches over HTTP, raw bytes to the event RPCs over gRPC. Whatever comes
in, the answer is never a 5xx, UNKNOWN or INTERNAL; an error carries a stable
reason in the documented shape; and the server still serves afterwards.

One real server (a child process, so a crash fails the test instead of the
run) for the module; small example budgets keep `make test` to seconds."""

from __future__ import annotations

import gzip
import http.client
import json
import subprocess
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import given
from hypothesis import strategies as st

from sendtime.v1 import event_pb2, event_service_pb2
from tests.fuzzing import RSS_GROWTH_BOUND_MIB, door_settings
from tests.integration.server_process import ChildServer, child_server

# slow: the fuzzed server runs as a process (make test-fast leaves them out)
pytestmark = pytest.mark.slow

AUTH = {"Authorization": "Bearer dev-key"}
GRPC_AUTH = (("authorization", "Bearer dev-key"),)
#: Every reason an ingest error may carry. A new one is a decision: add it here.
REASONS = {
    "INVALID_ARGUMENT",
    "INVALID_EVENT",
    "INVALID_EVENTS",
    "PAYLOAD_TOO_LARGE",
    "TOO_MANY_EVENTS",
    "UNDECODABLE_REQUEST",
}
FUZZ = door_settings(40)


@dataclass
class Child:
    server: ChildServer
    channel: grpc.Channel
    #: after its first answers, before the fuzzing
    rss_before_mib: float = 0.0

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.server.process

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, str, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.server.http_port, timeout=10)
        try:
            connection.request("POST", path, body=body, headers={**AUTH, **headers})
            response = connection.getresponse()
            return response.status, response.getheader("Content-Type", ""), response.read()
        finally:
            connection.close()


@pytest.fixture(scope="module")
def child(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Child]:
    with child_server(tmp_path_factory.mktemp("fuzz") / "data") as server:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        try:
            child = Child(server, channel)
            assert_healthy(child)
            child.rss_before_mib = server.rss_mib()
            yield child
        finally:
            channel.close()


def assert_healthy(child: Child) -> None:
    assert child.process.poll() is None, f"the server died with {child.process.returncode}"
    status, _, _ = child.post("/v1/track", json.dumps({"userId": "still-ok", "event": "Custom"}).encode(), {})
    assert status == 200
    health = health_pb2_grpc.HealthStub(child.channel)
    assert (
        health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
        == health_pb2.HealthCheckResponse.SERVING
    )


# -- HTTP: Segment envelopes ---------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**300), max_value=2**300)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(
        [
            "9999-12-31T23:59:59Z",
            "0001-01-01T00:00:00Z",
            "2026-12-04T00:00:00",
            "2026-12-04T00:00:00+14:00",
            "a\u0000b",
            "\ud7ff\u0085",
            "Product Added",
            "Order Completed",
        ]
    )
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
ENVELOPE_KEYS = [
    "type",
    "event",
    "name",
    "userId",
    "anonymousId",
    "messageId",
    "properties",
    "traits",
    "context",
    "timestamp",
    "originalTimestamp",
    "sentAt",
    "previousId",
    "groupId",
]
BASE = {
    "type": "track",
    "event": "Product Added",
    "userId": "fuzz",
    "properties": {"cart_id": "c", "product_id": "p", "price": 9.5, "quantity": 1},
}


@st.composite
def envelopes(draw: st.DrawFn) -> dict[str, Any]:
    """A valid event with some fields replaced by anything, or removed."""
    event: dict[str, Any] = dict(BASE)
    for key in draw(st.lists(st.sampled_from(ENVELOPE_KEYS), max_size=4, unique=True)):
        if draw(st.booleans()):
            event[key] = draw(json_values)
        else:
            event.pop(key, None)
    return event


@st.composite
def mutated_bytes(draw: st.DrawFn, body: bytes) -> bytes:
    """``body`` with a few bytes replaced, inserted or cut: broken UTF-8, JSON, nesting."""
    for _ in range(draw(st.integers(0, 3))):
        position = draw(st.integers(0, len(body)))
        edit = draw(st.sampled_from(["replace", "insert", "truncate", "nest"]))
        if edit == "replace" and position < len(body):
            body = body[:position] + bytes([draw(st.integers(0, 255))]) + body[position + 1 :]
        elif edit == "insert":
            body = body[:position] + draw(st.binary(min_size=1, max_size=4)) + body[position:]
        elif edit == "truncate":
            body = body[:position]
        elif edit == "nest":
            depth = draw(st.sampled_from([33, 500, 5000]))
            body = body[:position] + b"[" * depth + b"]" * depth + body[position:]
    return body


@st.composite
def bodies(draw: st.DrawFn, batch: bool) -> tuple[bytes, dict[str, str]]:
    if batch:
        document: Any = {"batch": draw(st.lists(envelopes(), max_size=4))}
        if draw(st.booleans()):
            document[draw(st.sampled_from(["sentAt", "context", "writeKey", "batch"]))] = draw(json_values)
    else:
        document = draw(envelopes())
    body = draw(mutated_bytes(json.dumps(document).encode()))
    coding = draw(st.sampled_from([None, None, "gzip", "deflate", "identity", "br", "foo"]))
    headers = {"Content-Type": "application/json"}
    if coding is not None:
        headers["Content-Encoding"] = coding
        if draw(st.booleans()):  # honestly encoded, or a lie
            body = (
                gzip.compress(body)
                if coding == "gzip"
                else zlib.compress(body)
                if coding == "deflate"
                else body
            )
    return body, headers


def assert_answer(status: int, content_type: str, body: bytes) -> None:
    assert status < 500, body[:500]
    assert content_type.startswith("application/json"), (status, body[:200])
    answer = json.loads(body)
    if status == 200:
        assert answer["success"] is True
        return
    assert status in (400, 413), answer
    assert answer["success"] is False
    assert answer["error"]["reason"] in REASONS, answer
    for result in answer.get("results", ()):
        assert result["outcome"] in ("accepted", "duplicate", "rejected")
        if result["outcome"] == "rejected":
            assert result["message"], result


@FUZZ
@given(body=bodies(batch=False), route=st.sampled_from(["track", "identify", "page", "alias", "group"]))
def test_segment_single_events_never_answer_5xx(
    child: Child, body: tuple[bytes, dict[str, str]], route: str
) -> None:
    assert_answer(*child.post(f"/v1/{route}", *body))


@FUZZ
@given(body=bodies(batch=True))
def test_segment_batches_never_answer_5xx(child: Child, body: tuple[bytes, dict[str, str]]) -> None:
    assert_answer(*child.post("/v1/batch", *body))


# -- gRPC: raw bytes to the event RPCs ----------------------------------------


def _valid_batch() -> bytes:
    events = [
        event_pb2.Event(
            message_id="m",
            user_id="fuzz",
            track=event_pb2.TrackPayload(
                name="Product Added", properties_json=b'{"cart_id":"c","product_id":"p"}'
            ),
        ),
        event_pb2.Event(
            message_id="i",
            user_id="fuzz",
            identify=event_pb2.IdentifyPayload(
                traits=event_pb2.Traits(email="a@example.com"), extra_traits_json=b'{"plan":"pro"}'
            ),
        ),
    ]
    return event_service_pb2.IngestEventsRequest(events=events).SerializeToString()


protobuf_bytes = st.binary(max_size=200) | mutated_bytes(_valid_batch())


def assert_status(error: grpc.RpcError) -> None:
    code = error.code()
    assert code is grpc.StatusCode.INVALID_ARGUMENT, (code, error.details())
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert any(d.Unpack(info) for d in status.details if d.Is(info.DESCRIPTOR))
    assert info.reason in REASONS


@FUZZ
@given(data=protobuf_bytes, method=st.sampled_from(["IngestEvent", "IngestEvents"]))
def test_event_rpcs_answer_raw_bytes_with_ok_or_invalid_argument(
    child: Child, data: bytes, method: str
) -> None:
    call = child.channel.unary_unary(f"/sendtime.v1.EventService/{method}", None, None)
    try:
        call(data, metadata=GRPC_AUTH, timeout=10)
    except grpc.RpcError as error:
        assert_status(error)


@FUZZ
@given(messages=st.lists(protobuf_bytes, min_size=1, max_size=3))
def test_event_streams_answer_raw_bytes_with_ok_or_invalid_argument(
    child: Child, messages: list[bytes]
) -> None:
    call = child.channel.stream_stream("/sendtime.v1.EventService/StreamEvents", None, None)
    try:
        for _ in call(iter(messages), metadata=GRPC_AUTH, timeout=10):
            pass
    except grpc.RpcError as error:
        assert_status(error)


def test_the_server_is_healthy_after_the_fuzzing(child: Child) -> None:
    assert_healthy(child)
    rss = child.server.rss_mib()
    print(f"ingest fuzz: server RSS {child.rss_before_mib:.1f} -> {rss:.1f} MiB")
    assert rss - child.rss_before_mib < RSS_GROWTH_BOUND_MIB, (child.rss_before_mib, rss)
