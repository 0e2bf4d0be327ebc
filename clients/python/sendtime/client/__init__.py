"""Typed Python client for sendtime's gRPC API.

    from sendtime.client import AsyncClient

    async with AsyncClient("127.0.0.1:50051", "dev-key") as client:
        await client.identify("u1", email="ada@example.com", consent={"marketing": True})
        await client.track("Product Added", {"product_id": "p1", "price": 9.5}, user_id="u1")
        async with client.stream() as stream:          # high volume, with backpressure
            for event in events:
                await stream.send(event)
        profile = await client.get_profile("u1")
        content = await client.get_content("u1", blocks=["cart"], timeout=0.2)  # 200 ms budget
        email = await client.render_email("abandoned_cart", "u1", timeout=0.3)
        # one key, one email: asking again with "u1-order-42" returns this delivery
        sent = await client.send_email("post_purchase", user_id="u1", idempotency_key="u1-order-42")
        sent = await client.get_delivery(sent.id)           # sent.status: a DeliveryStatus
        page = await client.list_deliveries(user_id="u1")   # newest first; page.next_page_token
        await client.create_segment("germany", 'traits.locale == "de-DE"')
        print((await client.count_segment(segment="germany")).count)
        b = await client.create_broadcast("winter_sale", idempotency_key="winter-2026", segment="germany",
                                          local_time="2026-12-04T19:00", fallback_time_zone="Europe/Berlin")
        b = await client.get_broadcast(b.id)                 # b.state, b.progress.sent, ...

``Client`` is the blocking twin of ``AsyncClient`` (unary calls only).
Everything public is re-exported here; the underscored modules are private.
"""

from sendtime.client._async_client import AsyncClient
from sendtime.client._broadcasts import (
    Broadcast,
    BroadcastProgress,
    BroadcastState,
    Segment,
    SegmentCount,
    SegmentMember,
)
from sendtime.client._content import BlockSource, Content, ContentBlock, FallbackReason, RenderedEmail
from sendtime.client._delivery import Delivery, DeliveryPage, DeliveryStatus, FlowSummary
from sendtime.client._errors import (
    Cancelled,
    DeadlineExceeded,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SendtimeError,
    Unauthenticated,
    Unavailable,
)
from sendtime.client._events import Ack, Outcome, identify_event, track_event
from sendtime.client._retry import RetryPolicy
from sendtime.client._stream import EventStream
from sendtime.client._sync_client import Client

__all__ = [
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
