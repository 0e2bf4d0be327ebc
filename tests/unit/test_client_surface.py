"""Pins the public surface of ``sendtime.client``: what it exports, the call
signatures users write against, and that the package stands on its own."""

from __future__ import annotations

import datetime as dt
import decimal
import inspect
import json
import subprocess
import sys

import grpc
import pytest

import sendtime.client
from sendtime.client import (
    AsyncClient,
    Client,
    DeliveryStatus,
    EventStream,
    InvalidArgument,
    RetryPolicy,
    SendtimeError,
    identify_event,
    track_event,
)
from sendtime.client._delivery import delivery_from_proto
from sendtime.v1 import delivery_service_pb2, event_pb2

PUBLIC = [
    "Ack",
    "AsyncClient",
    "BlockSource",
    "Broadcast",
    "BroadcastProgress",
    "BroadcastState",
    "Cancelled",
    "Client",
    "Content",
    "ContentBlock",
    "DeadlineExceeded",
    "Delivery",
    "DeliveryPage",
    "DeliveryStatus",
    "EventStream",
    "FallbackReason",
    "FieldViolation",
    "FlowSummary",
    "InvalidArgument",
    "NotFound",
    "Outcome",
    "PermissionDenied",
    "RenderedEmail",
    "ResourceExhausted",
    "RetryPolicy",
    "Segment",
    "SegmentCount",
    "SegmentMember",
    "SendtimeError",
    "Unauthenticated",
    "Unavailable",
    "identify_event",
    "track_event",
]


def test_all_is_the_public_surface() -> None:
    assert sorted(sendtime.client.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(sendtime.client, name) is not None
    exported = {n for n in vars(sendtime.client) if not n.startswith("_")}
    assert exported == set(PUBLIC)


def test_errors_form_one_hierarchy_with_their_status_codes() -> None:
    for name in (
        "InvalidArgument",
        "Unauthenticated",
        "PermissionDenied",
        "NotFound",
        "ResourceExhausted",
        "Unavailable",
        "DeadlineExceeded",
        "Cancelled",
    ):
        cls = getattr(sendtime.client, name)
        assert issubclass(cls, SendtimeError)
        assert cls.code.name == "".join(f"_{c}" if c.isupper() else c.upper() for c in name).lstrip("_")


def _params(function: object) -> list[str]:
    return list(inspect.signature(function).parameters)  # type: ignore[arg-type]


@pytest.mark.parametrize("cls", [AsyncClient, Client])
def test_client_signatures(cls: type[object]) -> None:
    assert _params(cls) == ["target", "api_key", "tls", "default_timeout", "retry", "channel_options"]
    assert inspect.signature(cls).parameters["default_timeout"].default == 5.0
    assert _params(cls.track) == [  # type: ignore[attr-defined]
        "self",
        "name",
        "properties",
        "user_id",
        "anonymous_id",
        "message_id",
        "timestamp",
        "timeout",
    ]
    assert _params(cls.identify) == [  # type: ignore[attr-defined]
        "self",
        "user_id",
        "anonymous_id",
        "email",
        "first_name",
        "last_name",
        "locale",
        "timezone",
        "consent",
        "traits",
        "message_id",
        "timestamp",
        "timeout",
    ]
    assert _params(cls.ingest) == ["self", "events", "timeout"]  # type: ignore[attr-defined]
    assert _params(cls.get_profile) == ["self", "user_id", "anonymous_id", "timeout"]  # type: ignore[attr-defined]
    assert _params(cls.send_event) == ["self", "event", "timeout"]  # type: ignore[attr-defined]
    assert _params(cls.get_content) == [  # type: ignore[attr-defined]
        "self",
        "user_id",
        "anonymous_id",
        "blocks",
        "campaign",
        "locale",
        "cart_id",
        "timeout",
    ]
    assert _params(cls.render_email) == [  # type: ignore[attr-defined]
        "self",
        "template_id",
        "user_id",
        "anonymous_id",
        "campaign",
        "locale",
        "cart_id",
        "timeout",
    ]
    assert _params(cls.send_email) == [  # type: ignore[attr-defined]
        "self",
        "template_id",
        "user_id",
        "anonymous_id",
        "idempotency_key",
        "transactional",
        "subscription_group",
        "timeout",
    ]
    send = inspect.signature(cls.send_email).parameters  # type: ignore[attr-defined]
    assert send["idempotency_key"].default is inspect.Parameter.empty  # no send without a key
    assert all(send[name].kind is inspect.Parameter.KEYWORD_ONLY for name in list(send)[2:])
    assert _params(cls.get_delivery) == ["self", "id", "idempotency_key", "timeout"]  # type: ignore[attr-defined]
    assert _params(cls.list_deliveries) == [  # type: ignore[attr-defined]
        "self",
        "user_id",
        "flow_id",
        "page_size",
        "page_token",
        "timeout",
    ]
    assert _params(cls.list_flows) == ["self", "timeout"]  # type: ignore[attr-defined]
    assert _params(cls.create_segment) == ["self", "name", "expression", "description", "timeout"]  # type: ignore[attr-defined]
    assert _params(cls.count_segment) == ["self", "segment", "expression", "timeout"]  # type: ignore[attr-defined]
    assert _params(cls.sample_segment) == ["self", "segment", "expression", "limit", "timeout"]  # type: ignore[attr-defined]
    assert _params(cls.create_broadcast) == [  # type: ignore[attr-defined]
        "self",
        "template_id",
        "idempotency_key",
        "segment",
        "expression",
        "name",
        "transactional",
        "subscription_group",
        "sender",
        "send_time",
        "local_time",
        "fallback_time_zone",
        "rate_limit",
        "end_time",
        "require_blocks",
        "timeout",
    ]
    create = inspect.signature(cls.create_broadcast).parameters  # type: ignore[attr-defined]
    assert create["idempotency_key"].default is inspect.Parameter.empty  # no broadcast without a key
    for method in ("get_broadcast", "pause_broadcast", "resume_broadcast", "cancel_broadcast"):
        assert _params(getattr(cls, method)) == ["self", "id", "timeout"], method
    assert _params(cls.list_broadcasts) == ["self", "active_only", "page_size", "timeout"]  # type: ignore[attr-defined]


def test_async_only_parts() -> None:
    assert inspect.iscoroutinefunction(AsyncClient.track)
    assert inspect.iscoroutinefunction(AsyncClient.get_content)
    assert inspect.iscoroutinefunction(AsyncClient.render_email)
    assert not inspect.iscoroutinefunction(Client.render_email)
    assert not inspect.iscoroutinefunction(Client.track)
    for method in ("send_email", "get_delivery", "list_deliveries", "list_flows"):
        assert inspect.iscoroutinefunction(getattr(AsyncClient, method)), method
        assert not inspect.iscoroutinefunction(getattr(Client, method)), method
    assert _params(AsyncClient.stream) == [
        "self",
        "max_in_flight",
        "batch_size",
        "linger",
        "max_batch_bytes",
        "reconnect_timeout",
        "retry",
    ]
    for method in ("send", "send_many", "flush", "close", "abort", "__aenter__", "__aexit__"):
        assert inspect.iscoroutinefunction(getattr(EventStream, method)), method


def test_track_event_encodes_properties_as_json() -> None:
    when = dt.datetime(2024, 5, 1, 10, 0, tzinfo=dt.UTC)
    event = track_event(
        "Order Completed", {"order_id": "o1", "total": 9.5}, user_id="u1", message_id="m1", timestamp=when
    )
    assert (event.message_id, event.user_id, event.WhichOneof("kind")) == ("m1", "u1", "track")
    assert event.track.name == "Order Completed"
    assert json.loads(event.track.properties_json) == {"order_id": "o1", "total": 9.5}
    assert event.timestamp.ToDatetime(tzinfo=dt.UTC) == when


def test_properties_may_hold_dates_and_decimals() -> None:
    event = track_event(
        "Order Completed",
        {"order_id": "o1", "total": decimal.Decimal("19.90"), "placed": dt.date(2024, 5, 1), "note": "é"},
        user_id="u1",
    )
    assert json.loads(event.track.properties_json) == {
        "order_id": "o1",
        "total": 19.9,
        "placed": "2024-05-01",
        "note": "é",
    }
    with pytest.raises(TypeError, match="cannot encode set"):
        track_event("Custom", {"tags": {"a"}}, user_id="u1")


def test_track_event_defaults_a_fresh_id_and_now() -> None:
    first, second = track_event("Signed Up", user_id="u1"), track_event("Signed Up", user_id="u1")
    assert first.message_id != second.message_id
    assert len(first.message_id) == 36
    assert first.track.properties_json == b""
    age = dt.datetime.now(dt.UTC) - first.timestamp.ToDatetime(tzinfo=dt.UTC)
    assert dt.timedelta(0) <= age < dt.timedelta(seconds=5)
    with pytest.raises(ValueError, match="timezone-aware"):
        track_event("Signed Up", user_id="u1", timestamp=dt.datetime(2024, 1, 1))


def test_identify_event_maps_consent_and_extra_traits() -> None:
    event = identify_event(
        anonymous_id="a1",
        email="x@example.com",
        consent={"marketing": True, "sms": False},
        traits={"plan": "pro"},
    )
    assert event.anonymous_id == "a1"
    traits = event.identify.traits
    assert traits.email == "x@example.com"
    assert dict(traits.consent) == {
        "marketing": event_pb2.CONSENT_STATE_OPTED_IN,
        "sms": event_pb2.CONSENT_STATE_OPTED_OUT,
    }
    assert json.loads(event.identify.extra_traits_json) == {"plan": "pro"}


def test_delivery_status_is_a_str_enum_whose_last_five_are_final() -> None:
    assert isinstance(DeliveryStatus.SENT, str)
    assert json.dumps([DeliveryStatus.SENT]) == '["sent"]'
    assert DeliveryStatus("skipped") is DeliveryStatus.SKIPPED
    assert [s.value for s in DeliveryStatus if s.final] == [
        "sent",
        "failed",
        "cancelled",
        "skipped",
        "uncertain",
    ]
    assert not DeliveryStatus.UNKNOWN.final


def test_a_delivery_reads_times_latency_and_unknown_statuses() -> None:
    created = dt.datetime(2024, 5, 1, 10, 0, tzinfo=dt.UTC)
    proto = delivery_service_pb2.Delivery(id=7, status=delivery_service_pb2.DELIVERY_STATUS_RELAYING)
    proto.create_time.FromDatetime(created)
    delivery = delivery_from_proto(proto)
    assert (delivery.id, delivery.status, delivery.final) == (7, DeliveryStatus.RELAYING, False)
    assert delivery.create_time == created
    assert delivery.create_time.tzinfo is dt.UTC
    assert (delivery.accept_time, delivery.latency) == (None, None)  # unset: not yet accepted

    proto.status = delivery_service_pb2.DELIVERY_STATUS_SENT
    proto.latency.FromMilliseconds(1500)
    proto.accept_time.FromDatetime(created + dt.timedelta(seconds=2))
    sent = delivery_from_proto(proto)
    assert (sent.status, sent.final, sent.latency) == ("sent", True, dt.timedelta(milliseconds=1500))
    assert sent.accept_time == created + dt.timedelta(seconds=2)

    proto.status = 99  # type: ignore[assignment]  # a status from a newer server
    assert delivery_from_proto(proto).status is DeliveryStatus.UNKNOWN


def test_retry_policy_backs_off_exponentially_with_jitter() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, multiplier=2.0, jitter=0.2)
    for retry, ceiling in [(0, 0.1), (1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (10, 1.0)]:
        waits = {policy.backoff(retry) for _ in range(50)}
        assert all(ceiling * 0.8 <= w <= ceiling * 1.2 for w in waits)
        assert len(waits) > 1
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


def test_invalid_argument_reads_well() -> None:
    error = InvalidArgument(
        "invalid event", field_violations=(sendtime.client.FieldViolation("event.user_id", "required"),)
    )
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "INVALID_ARGUMENT"
    assert str(error) == "INVALID_ARGUMENT: invalid event (event.user_id: required)"


def sendtime_modules_imported_by(module: str) -> list[str]:
    """The sendtime modules a fresh interpreter holds after ``import module``."""
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith('sendtime.')))"
    return list(
        json.loads(
            subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
            .stdout.strip()
            .replace("'", '"')
        )
    )


def test_the_client_does_not_import_the_server() -> None:
    modules = sendtime_modules_imported_by("sendtime.client")
    assert not [m for m in modules if m.startswith("sendtime.server")]
    assert "sendtime.v1.event_pb2" in modules
