"""Optional TLS on both edges, from configured certificate paths."""

from __future__ import annotations

import ssl
from pathlib import Path

import aiohttp
import grpc
import grpc.aio
import pytest
import trustme

from sendtime.server.app import Sendtime
from sendtime.v1 import event_pb2, event_service_pb2
from tests.conftest import DEV_AUTH, SettingsFactory, event_stub


async def test_grpc_and_http_over_tls(tmp_path: Path, make_settings: SettingsFactory) -> None:
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "server.pem", tmp_path / "server.key"
    certificate.cert_chain_pems[0].write_to_path(str(cert_file))
    certificate.private_key_pem.write_to_path(str(key_file))
    tls = f'cert_file = "{cert_file}"\nkey_file = "{key_file}"\n'
    config = f"[grpc.tls]\n{tls}[http.tls]\n{tls}"

    async with Sendtime(make_settings(config)) as app:
        credentials = grpc.ssl_channel_credentials(root_certificates=authority.cert_pem.bytes())
        async with grpc.aio.secure_channel(f"127.0.0.1:{app.grpc_port}", credentials) as channel:
            event = event_pb2.Event(
                message_id="tls-1", user_id="u", track=event_pb2.TrackPayload(name="Custom")
            )
            reply = await event_stub(channel).IngestEvent(
                event_service_pb2.IngestEventRequest(event=event), metadata=DEV_AUTH
            )
            assert reply.ack.outcome == event_pb2.EVENT_OUTCOME_ACCEPTED

        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as plain:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await event_stub(plain).IngestEvent(
                    event_service_pb2.IngestEventRequest(event=event), metadata=DEV_AUTH, timeout=2
                )
            assert refused.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

        client_context = ssl.create_default_context()
        authority.configure_trust(client_context)
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"https://127.0.0.1:{app.http_port}/healthz", ssl=client_context) as response,
        ):
            assert response.status == 200
