"""Property tests of every door but event intake (tests/integration/
test_ingest_fuzz.py has those): signed webhooks, the ESP feedback webhooks,
the unsubscribe page and its one-click POST, the content HTTP twin's query
strings, profile and status-page lookups, and raw protobuf bytes at every
other gRPC method. Whatever comes in, the answer is never a 5xx, UNKNOWN or
INTERNAL, errors say why in the documented shape, and the server (a child
process, so a crash fails the test instead of the run) still serves after.
Small example budgets keep ``make test`` to seconds."""

from __future__ import annotations

import base64
import http.client
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote, urlencode

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given
from hypothesis import strategies as st

from sendtime.server.edge.http_server import sign
from sendtime.v1 import content_service_pb2, delivery_service_pb2, profile_service_pb2
from tests.fuzzing import RSS_GROWTH_BOUND_MIB, door_settings
from tests.integration.server_process import ChildServer, child_server

# slow: the fuzzed server runs as a process (make test-fast leaves them out)
pytestmark = pytest.mark.slow

WEBHOOK_SECRET = "a-webhook-secret-of-some-length"
FUZZ = door_settings(30)
#: gRPC codes a caller may get for bad input; UNKNOWN and INTERNAL never.
ALLOWED_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ALREADY_EXISTS,
}


@dataclass
class Door:
    child: ChildServer
    channel: grpc.Channel
    #: after its first answers, before the fuzzing
    rss_before_mib: float = 0.0

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, str, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.child.http_port, timeout=10)
        try:
            connection.request(method, path, body=body, headers=_latin1(headers or {}))
            response = connection.getresponse()
            return response.status, response.getheader("Content-Type", ""), response.read()
        finally:
            connection.close()


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Door]:
    folder = tmp_path_factory.mktemp("surface-fuzz")
    public_der = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    config = folder / "sendtime.toml"
    config.write_text(
        f"""
[delivery.feedback]
sendgrid_public_key = "{base64.b64encode(public_der).decode()}"
postmark_username = "pm"
postmark_password = "secret-pm"

[[webhooks]]
name = "shop"
secret = "{WEBHOOK_SECRET}"
"""
    )
    with child_server(folder / "data", config=config) as child:
        channel = grpc.insecure_channel(f"127.0.0.1:{child.grpc_port}")
        try:
            door = Door(child, channel)
            assert door.request("GET", "/healthz")[0] == 200
            door.rss_before_mib = child.rss_mib()
            yield door
        finally:
            channel.close()


def assert_http_answer(status: int, content_type: str, body: bytes) -> None:
    assert status < 500, (status, body[:300])
    if content_type.startswith("application/json"):
        answer = json.loads(body)
        if status >= 400:
            error = answer["error"]
            assert error["reason"], answer
            assert error["message"], answer


texts = st.text(max_size=40) | st.sampled_from(
    [
        "..",
        ".",
        "%2e%2e",
        "a|b",
        "\u0000",
        "\udfff".encode("utf-8", "surrogatepass").decode("latin-1"),
        "9" * 400,
    ]
)
raw = st.binary(max_size=300)


@FUZZ
@given(
    body=raw, header=texts, timestamp=st.integers(min_value=-(10**30), max_value=10**30), honest=st.booleans()
)
def test_signed_webhooks(door: Door, body: bytes, header: str, timestamp: int, honest: bool) -> None:
    if honest:  # a valid signature over whatever the body is: the body itself is then on trial
        header = sign(WEBHOOK_SECRET, body, int(time.time()))
    elif header == "":
        header = f"t={timestamp},v1={'0' * 64}"
    headers = {"X-Sendtime-Signature": header, "Content-Type": "application/json"}
    assert_http_answer(*door.request("POST", "/v1/webhooks/shop", body, headers))
    assert_http_answer(*door.request("POST", "/v1/webhooks/nobody", body, headers))


@FUZZ
@given(
    body=raw
    | st.lists(st.dictionaries(st.text(max_size=8), st.text(max_size=8)), max_size=3).map(
        lambda v: json.dumps(v).encode()
    ),
    signature=texts,
    timestamp=texts,
    encoding=st.sampled_from([None, "gzip", "deflate", "br"]),
)
def test_sendgrid_feedback(
    door: Door, body: bytes, signature: str, timestamp: str, encoding: str | None
) -> None:
    headers = {
        "X-Twilio-Email-Event-Webhook-Signature": signature,
        "X-Twilio-Email-Event-Webhook-Timestamp": timestamp,
        "Content-Type": "application/json",
    }
    if encoding:
        headers["Content-Encoding"] = encoding
    assert_http_answer(*door.request("POST", "/v1/feedback/sendgrid", body, headers))


@FUZZ
@given(body=raw, credentials=st.sampled_from(["pm:secret-pm", "pm:wrong", "", "x"]))
def test_postmark_feedback(door: Door, body: bytes, credentials: str) -> None:
    headers = {"Content-Type": "application/json"}
    if credentials:
        headers["Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode()
    assert_http_answer(*door.request("POST", "/v1/feedback/postmark", body, headers))


@FUZZ
@given(token=texts, body=raw)
def test_unsubscribe_page_and_one_click(door: Door, token: str, body: bytes) -> None:
    path = "/v1/unsubscribe/" + quote(token, safe="") if token else "/v1/unsubscribe/x"
    assert_http_answer(*door.request("GET", path))
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    assert_http_answer(*door.request("POST", path, body, headers))


@FUZZ
@given(
    user=texts,
    query=st.dictionaries(
        st.sampled_from(
            ["blocks", "template", "campaign", "cart_id", "locale", "anonymous_id", "deadline_ms", "x"]
        ),
        texts,
        max_size=4,
    ),
    deadline=texts,
)
def test_content_twin_query_strings(door: Door, user: str, query: dict[str, str], deadline: str) -> None:
    path = "/v1/content/" + (quote(user, safe="") or "u") + "?" + urlencode(query)
    headers = {"Authorization": "Bearer dev-key", "Sendtime-Deadline-Ms": deadline}
    assert_http_answer(*door.request("GET", path, None, headers))


@FUZZ
@given(user=texts, anonymous=texts, preview=texts, token=texts)
def test_profile_and_status_page_lookups(
    door: Door, user: str, anonymous: str, preview: str, token: str
) -> None:
    auth = {"Authorization": "Bearer dev-key"}
    assert_http_answer(*door.request("GET", "/v1/profiles/" + (quote(user, safe="") or "u"), None, auth))
    assert_http_answer(
        *door.request("GET", "/v1/profiles?" + urlencode({"anonymous_id": anonymous}), None, auth)
    )
    preview_path = "/v1/deliveries/" + (quote(preview, safe="") or "1") + "/preview"
    assert_http_answer(*door.request("GET", preview_path, None, auth))
    assert_http_answer(*door.request("GET", "/?" + urlencode({"page_token": token}), None, auth))


@FUZZ
@given(body=raw)
def test_catalog_upserts(door: Door, body: bytes) -> None:
    headers = {"Authorization": "Bearer dev-key", "Content-Type": "application/json"}
    assert_http_answer(*door.request("POST", "/v1/catalog/products", body, headers))


# -- gRPC: raw bytes at every method but the event intake -------------------------

VALID_REQUESTS = {
    "/sendtime.v1.ProfileService/GetProfile": profile_service_pb2.GetProfileRequest(user_id="fuzz"),
    "/sendtime.v1.ContentService/GetContent": content_service_pb2.GetContentRequest(
        user_id="fuzz", blocks=["cart", "recommendations"]
    ),
    "/sendtime.v1.ContentService/RenderEmail": content_service_pb2.RenderEmailRequest(
        user_id="fuzz", template_id="abandoned_cart"
    ),
    "/sendtime.v1.DeliveryService/SendEmail": delivery_service_pb2.SendEmailRequest(
        user_id="fuzz", template_id="abandoned_cart", idempotency_key="fuzz-1"
    ),
    "/sendtime.v1.DeliveryService/GetDelivery": delivery_service_pb2.GetDeliveryRequest(id=1),
    "/sendtime.v1.DeliveryService/ListDeliveries": delivery_service_pb2.ListDeliveriesRequest(user_id="fuzz"),
    "/sendtime.v1.DeliveryService/ListFlows": delivery_service_pb2.ListFlowsRequest(),
}


@st.composite
def mutated(draw: st.DrawFn, valid: bytes) -> bytes:
    """A valid request with bytes replaced, inserted or cut: wrong wire types,
    unknown fields, lengths that run past the end."""
    data = valid
    for _ in range(draw(st.integers(0, 3))):
        position = draw(st.integers(0, len(data)))
        edit = draw(st.sampled_from(["replace", "insert", "truncate"]))
        if edit == "replace" and position < len(data):
            data = data[:position] + bytes([draw(st.integers(0, 255))]) + data[position + 1 :]
        elif edit == "insert":
            data = data[:position] + draw(st.binary(min_size=1, max_size=6)) + data[position:]
        elif edit == "truncate":
            data = data[:position]
    return data


@st.composite
def method_and_bytes(draw: st.DrawFn) -> tuple[str, bytes]:
    method = draw(st.sampled_from(sorted(VALID_REQUESTS)))
    valid = VALID_REQUESTS[method].SerializeToString()
    return method, draw(st.binary(max_size=200) | mutated(valid))


@FUZZ
@given(call=method_and_bytes())
def test_raw_protobuf_at_every_other_method(door: Door, call: tuple[str, bytes]) -> None:
    method, data = call
    stub = door.channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    code, details = grpc.StatusCode.OK, None
    try:
        stub(data, metadata=(("authorization", "Bearer dev-key"),), timeout=10)
    except grpc.RpcError as error:
        code, details = error.code(), error.details()
    assert code in ALLOWED_CODES, (method, code, details)


def test_the_server_is_healthy_after_the_fuzzing(door: Door) -> None:
    assert door.child.alive(), f"the server died with {door.child.process.returncode}"
    assert door.request("GET", "/healthz")[0] == 200
    health = health_pb2_grpc.HealthStub(door.channel)
    assert (
        health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
        == health_pb2.HealthCheckResponse.SERVING
    )
    rss = door.child.rss_mib()
    print(f"surface fuzz: server RSS {door.rss_before_mib:.1f} -> {rss:.1f} MiB")
    assert rss - door.rss_before_mib < RSS_GROWTH_BOUND_MIB, (door.rss_before_mib, rss)


def _latin1(headers: dict[str, str]) -> dict[str, str]:
    """Header values as http.client can send them (it encodes latin-1)."""
    return {
        k: v.encode("latin-1", "replace").decode("latin-1").replace("\r", "").replace("\n", "")
        for k, v in headers.items()
    }
