"""Small findings of the outside probe (issue 16, item 7), against a real
sendtime on 127.0.0.1:0: each input that answered 500 is now a clear 4xx, an
old signed SendGrid request is refused, and the dev key stops working once
real keys are configured."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import grpc.aio
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sendtime.server.app import Sendtime
from sendtime.server.edge.http_server import sign
from sendtime.server.settings import hash_key
from sendtime.v1 import delivery_service_pb2, delivery_service_pb2_grpc
from tests.conftest import DEV_AUTH, SettingsFactory

SECRET = "a-webhook-secret-of-some-length"


@pytest.fixture
def sendgrid_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
async def app(
    make_settings: SettingsFactory, sendgrid_key: ec.EllipticCurvePrivateKey
) -> AsyncIterator[Sendtime]:
    public_der = sendgrid_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    config = f"""
[[webhooks]]
name = "shop"
secret = "{SECRET}"

[delivery.feedback]
sendgrid_public_key = "{base64.b64encode(public_der).decode()}"
"""
    async with Sendtime(make_settings(config)) as server:
        yield server


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def _post(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    async with session.post(url, data=body, headers=headers) as response:
        return response.status, await response.json()


async def test_a_webhook_timestamp_of_400_digits_is_refused_not_a_crash(
    app: Sendtime, session: aiohttp.ClientSession
) -> None:
    body = b'{"batch": []}'
    stamp = 10**399
    header = f"t={stamp},v1={sign(SECRET, body, stamp).partition(',v1=')[2]}"
    status, answer = await _post(
        session,
        f"http://127.0.0.1:{app.http_port}/v1/webhooks/shop",
        body,
        {"Sendtime-Signature": header, "Content-Type": "application/json"},
    )
    assert (status, answer["error"]["code"]) == (401, "UNAUTHENTICATED")
    assert "400 digits" in answer["error"]["message"]


async def test_a_deflate_body_that_is_not_deflate_is_refused(
    app: Sendtime, session: aiohttp.ClientSession
) -> None:
    status, answer = await _post(
        session,
        f"http://127.0.0.1:{app.http_port}/v1/batch",
        b"\x00garbage, not deflate" * 10,
        {
            "Authorization": "Bearer dev-key",
            "Content-Encoding": "deflate",
            "Content-Type": "application/json",
        },
    )
    assert (status, answer["error"]["code"]) == (400, "INVALID_ARGUMENT")
    # the header is what the body does not match (see test_http_ingest_limits)
    assert answer["error"]["fieldViolations"][0]["field"] == "Content-Encoding"


async def test_a_write_key_of_invalid_utf8_is_refused(app: Sendtime, session: aiohttp.ClientSession) -> None:
    body = b'{"writeKey": "\xff\xfe", "userId": "u", "event": "E"}'
    status, answer = await _post(
        session,
        f"http://127.0.0.1:{app.http_port}/v1/track",
        body,
        {"Content-Type": "application/json"},
    )
    assert (status, answer["error"]["code"]) == (400, "INVALID_ARGUMENT")
    assert answer["error"]["fieldViolations"][0] == {"field": "body", "description": "is not valid UTF-8"}


async def test_a_page_token_past_64_bits_is_invalid_argument(app: Sendtime) -> None:
    token = base64.urlsafe_b64encode(f"before:{10**30}".encode()).decode()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = delivery_service_pb2_grpc.DeliveryServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ListDeliveries(
                delivery_service_pb2.ListDeliveriesRequest(page_token=token), metadata=DEV_AUTH
            )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in (refused.value.details() or "")


def _sendgrid_headers(key: ec.EllipticCurvePrivateKey, body: bytes, stamp: str) -> dict[str, str]:
    signature = key.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return {
        "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
        "X-Twilio-Email-Event-Webhook-Timestamp": stamp,
    }


async def test_a_validly_signed_sendgrid_request_a_year_old_is_refused(
    app: Sendtime, session: aiohttp.ClientSession, sendgrid_key: ec.EllipticCurvePrivateKey
) -> None:
    url = f"http://127.0.0.1:{app.http_port}/v1/feedback/sendgrid"
    body = json.dumps([{"email": "ada@example.com", "event": "bounce"}]).encode()
    year_ago = str(int(time.time()) - 365 * 86400)
    status, answer = await _post(session, url, body, _sendgrid_headers(sendgrid_key, body, year_ago))
    assert (status, answer["error"]["code"]) == (401, "UNAUTHENTICATED")
    assert "the tolerance is 600 s" in answer["error"]["message"]
    status, answer = await _post(session, url, body, _sendgrid_headers(sendgrid_key, body, "9" * 400))
    assert status == 401
    # the same request signed now is taken
    status, answer = await _post(
        session, url, body, _sendgrid_headers(sendgrid_key, body, str(int(time.time())))
    )
    assert (status, answer["suppressed"]) == (200, 1)


async def test_the_dev_key_stops_working_once_keys_are_configured(
    make_settings: SettingsFactory, session: aiohttp.ClientSession
) -> None:
    config = f'[[auth.keys]]\nname = "ops"\nhash = "{hash_key("ops-key")}"\nscopes = ["ingest", "content", "admin"]\n'
    async with Sendtime(make_settings(config)) as app:
        url = f"http://127.0.0.1:{app.http_port}/v1/track"
        event = json.dumps({"userId": "u", "event": "E"}).encode()
        json_type = {"Content-Type": "application/json"}
        status, _ = await _post(session, url, event, {"Authorization": "Bearer dev-key", **json_type})
        assert status == 401
        status, _ = await _post(session, url, event, {"Authorization": "Bearer ops-key", **json_type})
        assert status == 200
