"""The content benchmark's shoppers: realistic Segment e-commerce histories
for a few hundred users over the demo catalog, loaded with IngestEvents before
any content is asked for, and the requests the load generator sends.

Each user is identified (email, first name, locale), has viewed a handful of
products, most have an open cart (some lines added at a higher price than
today's, so price drops show), and some have an earlier completed order. The
products come from the demo catalog the server loads (demo/catalog.json), so
the cart, recommendations and recently viewed blocks are all non-empty.

The histories are recent (the last quarter hour): the server's default flows
schedule an abandoned-cart email 30 minutes after a Product Added and a
browse-abandonment email an hour after a view, so no flow send falls due while
the benchmark runs. (Older histories make hundreds of sends due at once; their
rendering and MIME building then share the event loop with the content calls.)
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import grpc
import grpc.aio
import msgspec
from google.protobuf.timestamp_pb2 import Timestamp

from sendtime.v1 import event_pb2, event_service_pb2

API_KEY: Final = "dev-key"
METADATA: Final = (("authorization", f"Bearer {API_KEY}"),)
INGEST_METHOD: Final = "/sendtime.v1.EventService/IngestEvents"
GET_CONTENT_METHOD: Final = "/sendtime.v1.ContentService/GetContent"
RENDER_EMAIL_METHOD: Final = "/sendtime.v1.ContentService/RenderEmail"
BUILT_IN_BLOCKS: Final = ("cart", "recommendations", "recently_viewed", "offers")

_FIRST_NAMES: Final = (
    "Ada",
    "Grace",
    "Linus",
    "Margaret",
    "Ken",
    "Barbara",
    "Dennis",
    "Frances",
    "Jon",
    "Mia",
)
_LOCALES: Final = ("en-US", "en-GB", "de-DE", "fr-FR", "nl-NL")


def user_ids(count: int) -> list[str]:
    return [f"bench-user-{n:05d}" for n in range(count)]


def load_catalog(path: Path) -> list[dict[str, Any]]:
    products: list[dict[str, Any]] = json.loads(path.read_text())
    if not products:
        raise ValueError(f"{path} holds no products")
    return products


def _stamp(at: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(at)
    return stamp


def _track(user_id: str, name: str, at: datetime, properties: dict[str, Any]) -> event_pb2.Event:
    return event_pb2.Event(
        message_id=str(uuid.uuid4()),
        user_id=user_id,
        timestamp=_stamp(at),
        track=event_pb2.TrackPayload(name=name, properties_json=msgspec.json.encode(properties)),
    )


def _product(product: dict[str, Any]) -> dict[str, Any]:
    return {
        "product_id": product["id"],
        "name": product["name"],
        "price": product["price"],
        "currency": product.get("currency", "EUR"),
        "url": product.get("url", ""),
        "image_url": product.get("image_url", ""),
        "category": product.get("category", ""),
    }


def user_events(
    user_id: str, catalog: Sequence[dict[str, Any]], rng: random.Random, now: datetime
) -> list[event_pb2.Event]:
    """One shopper's history, oldest first, within the quarter hour before ``now``
    (at most 14 events, 5 to 60 s apart)."""
    at = now - timedelta(minutes=15, seconds=rng.randrange(60))

    def tick() -> datetime:
        nonlocal at
        at += timedelta(seconds=rng.randrange(5, 60))
        return at

    n = int(user_id.rsplit("-", 1)[1])
    events = [
        event_pb2.Event(
            message_id=str(uuid.uuid4()),
            user_id=user_id,
            timestamp=_stamp(tick()),
            identify=event_pb2.IdentifyPayload(
                traits=event_pb2.Traits(
                    email=f"{user_id}@example.com",
                    first_name=_FIRST_NAMES[n % len(_FIRST_NAMES)],
                    locale=_LOCALES[n % len(_LOCALES)],
                )
            ),
        )
    ]
    # a past order for some, before this visit
    if rng.random() < 0.35:
        bought = rng.sample(list(catalog), rng.randint(1, 3))
        lines = [{**_product(p), "quantity": rng.randint(1, 2)} for p in bought]
        total = round(sum(line["price"] * line["quantity"] for line in lines), 2)
        events.append(
            _track(
                user_id,
                "Order Completed",
                tick(),
                {
                    "order_id": f"order-{user_id}",
                    "total": total,
                    "currency": "EUR",
                    "products": lines,
                },
            )
        )
    # this visit: views, then (for most) adds to the cart
    viewed = rng.sample(list(catalog), rng.randint(3, min(8, len(catalog))))
    events += [_track(user_id, "Product Viewed", tick(), _product(p)) for p in viewed]
    if rng.random() < 0.85:
        for product in rng.sample(viewed, rng.randint(1, min(3, len(viewed)))):
            # now and then added at a higher price than today's: a price drop to show
            price = product["price"] * (1.15 if rng.random() < 0.2 else 1.0)
            properties = {
                **_product(product),
                "price": round(price, 2),
                "cart_id": f"cart-{user_id}",
                "quantity": rng.randint(1, 2),
            }
            events.append(_track(user_id, "Product Added", tick(), properties))
    return events


def seed_events(
    users: Sequence[str], catalog: Sequence[dict[str, Any]], *, seed: int = 7
) -> list[event_pb2.Event]:
    rng = random.Random(seed)
    now = datetime.now(UTC)
    return [event for user in users for event in user_events(user, catalog, rng, now)]


def _batches(events: Sequence[event_pb2.Event], size: int) -> Iterator[Sequence[event_pb2.Event]]:
    for start in range(0, len(events), size):
        yield events[start : start + size]


async def seed(target: str, events: Sequence[event_pb2.Event], batch: int = 500) -> dict[str, int]:
    """IngestEvents in batches; returns the count of each outcome. Read-your-writes:
    once acked, the profiles are folded."""
    outcomes = {"accepted": 0, "duplicate": 0, "rejected": 0}
    names = {
        event_pb2.EVENT_OUTCOME_ACCEPTED: "accepted",
        event_pb2.EVENT_OUTCOME_DUPLICATE: "duplicate",
        event_pb2.EVENT_OUTCOME_REJECTED: "rejected",
    }
    async with grpc.aio.insecure_channel(target) as channel:
        ingest = channel.unary_unary(
            INGEST_METHOD,
            request_serializer=event_service_pb2.IngestEventsRequest.SerializeToString,
            response_deserializer=event_service_pb2.IngestEventsResponse.FromString,
        )
        for chunk in _batches(events, batch):
            response = await ingest(
                event_service_pb2.IngestEventsRequest(events=chunk), metadata=METADATA, timeout=30.0
            )
            for ack in response.acks:
                outcomes[names.get(ack.outcome, "rejected")] += 1
    return outcomes
