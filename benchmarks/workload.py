"""The benchmark's workload: Segment e-commerce spec v2 events from many users,
built before the clock starts so the load generator spends its CPU on sending.

Every event is serialized once, as a template with a placeholder message id,
and cut around the placeholder. A request is then only a join of
(head, fresh message id, tail) pieces, so each event still carries its own new
uuid4-shaped message id (the server de-duplicates by it) at the price of one
string format. Protobuf allows this because a repeated field is the
concatenation of its entries, and the message id is field 1 of each Event.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import msgspec
from google.protobuf.timestamp_pb2 import Timestamp

from sendtime.v1 import event_pb2, event_service_pb2

#: The mix of event names, weighted like a shop's traffic: many views, fewer adds, few orders.
EVENT_MIX: Final = (
    ("Product Viewed", 60),
    ("Product Added", 25),
    ("Checkout Started", 5),
    ("Order Completed", 10),
)
#: A uuid4-shaped placeholder; real ids have the same length.
PLACEHOLDER: Final = "ffffffff-ffff-4fff-bfff-ffffffffffff"
ID_CHARS: Final = len(PLACEHOLDER)

_CATEGORIES: Final = ("Shoes", "Shirts", "Bags", "Outdoor", "Kitchen", "Books", "Toys", "Garden")
_BRANDS: Final = ("Acme", "Northwind", "Globex", "Initech", "Umbrella", "Hooli")
#: The last three hex digits of a counter, precomputed: formatting ":012x" per id costs 0.45 us.
_LOW_HEX: Final = tuple(f"{n:03x}" for n in range(4096))


@dataclass(frozen=True, slots=True)
class EventSpec:
    user_id: str
    name: str
    properties: dict[str, Any]
    timestamp: datetime


@dataclass(frozen=True, slots=True)
class Template:
    """An event's serialized bytes before and after its message id."""

    head: bytes
    tail: bytes


def _catalog(rng: random.Random, size: int) -> list[dict[str, Any]]:
    products = []
    for n in range(size):
        category = rng.choice(_CATEGORIES)
        products.append(
            {
                "product_id": f"p-{n:05d}",
                "sku": f"SKU-{category[:3].upper()}-{n:05d}",
                "name": f"{rng.choice(_BRANDS)} {category} {n}",
                "category": category,
                "brand": rng.choice(_BRANDS),
                "price": round(rng.uniform(4.99, 249.0), 2),
                "url": f"https://shop.example.com/p/{n}",
                "image_url": f"https://cdn.example.com/img/{n}.jpg",
            }
        )
    return products


def make_events(count: int, *, users: int, seed: int, start: datetime | None = None) -> list[EventSpec]:
    """``count`` events from ``users`` users, in event-time order, mixed as in EVENT_MIX."""
    rng = random.Random(seed)
    catalog = _catalog(rng, 500)
    names = [name for name, _ in EVENT_MIX]
    weights = [weight for _, weight in EVENT_MIX]
    start = start or datetime.now(UTC) - timedelta(hours=1)
    specs = []
    for n in range(count):
        user = rng.randrange(users)
        name = rng.choices(names, weights)[0]
        product = rng.choice(catalog)
        cart_id = f"cart-{user:06d}"
        properties: dict[str, Any]
        if name == "Product Viewed":
            properties = {**product, "currency": "USD"}
        elif name == "Product Added":
            properties = {**product, "cart_id": cart_id, "quantity": rng.randint(1, 3), "currency": "USD"}
        else:
            lines = [
                {k: p[k] for k in ("product_id", "sku", "name", "price")} | {"quantity": rng.randint(1, 2)}
                for p in rng.sample(catalog, rng.randint(1, 3))
            ]
            subtotal = round(sum(line["price"] * line["quantity"] for line in lines), 2)
            if name == "Checkout Started":
                properties = {"cart_id": cart_id, "value": subtotal, "currency": "USD", "products": lines}
            else:
                tax = round(subtotal * 0.08, 2)
                properties = {
                    "order_id": f"o-{seed}-{n}",
                    "cart_id": cart_id,
                    "total": round(subtotal + tax + 5.0, 2),
                    "subtotal": subtotal,
                    "tax": tax,
                    "shipping": 5.0,
                    "currency": "USD",
                    "products": lines,
                }
        specs.append(
            EventSpec(
                user_id=f"user-{user:06d}",
                name=name,
                properties=properties,
                timestamp=start + timedelta(milliseconds=20 * n),
            )
        )
    return specs


def _cut(serialized: bytes) -> Template:
    at = serialized.find(PLACEHOLDER.encode())
    if at < 0 or serialized.find(PLACEHOLDER.encode(), at + 1) >= 0:
        raise AssertionError("the placeholder must occur exactly once in a template")
    return Template(serialized[:at], serialized[at + ID_CHARS :])


def grpc_templates(specs: Sequence[EventSpec]) -> list[Template]:
    """Each template is one StreamEventsRequest entry (tag, length, Event)."""
    templates = []
    for spec in specs:
        stamp = Timestamp()
        stamp.FromDatetime(spec.timestamp)
        event = event_pb2.Event(
            message_id=PLACEHOLDER,
            user_id=spec.user_id,
            timestamp=stamp,
            track=event_pb2.TrackPayload(
                name=spec.name, properties_json=msgspec.json.encode(spec.properties)
            ),
        )
        request = event_service_pb2.StreamEventsRequest(events=[event])
        templates.append(_cut(request.SerializeToString()))
    return templates


def segment_templates(specs: Sequence[EventSpec]) -> list[Template]:
    """Each template is one Segment track message as JSON."""
    templates = []
    for spec in specs:
        message = {
            "type": "track",
            "messageId": PLACEHOLDER,
            "userId": spec.user_id,
            "event": spec.name,
            "properties": spec.properties,
            "timestamp": spec.timestamp,
            "context": {"library": {"name": "sendtime-bench", "version": "0.1.0"}},
        }
        templates.append(_cut(msgspec.json.encode(message)))
    return templates


class MessageIds:
    """uuid4-shaped message ids, unique within a run and across runs: a random
    uuid4's first 24 characters, then a 12-hex-digit counter."""

    def __init__(self) -> None:
        self._prefix = str(uuid.uuid4())[:24]
        self._next = 0

    def take(self, count: int) -> list[str]:
        ids: list[str] = []
        n, end = self._next, self._next + count
        while n < end:
            block, low = divmod(n, 4096)
            stop = min(4096, low + end - n)
            ids += map(f"{self._prefix}{block:09x}".__add__, _LOW_HEX[low:stop])
            n += stop - low
        self._next = end
        return ids


class Requests:
    """Builds requests of ``size`` events from templates, cycling through them
    from ``offset``, each event with a fresh message id."""

    def __init__(self, templates: Sequence[Template], size: int, offset: int = 0) -> None:
        self._templates = templates
        self._size = size
        self._cursor = offset % len(templates)
        self._ids = MessageIds()

    def _next_templates(self) -> Sequence[Template]:
        templates, size, cursor = self._templates, self._size, self._cursor
        end = cursor + size
        if end <= len(templates):
            chunk = templates[cursor:end]
        else:
            chunk = [templates[(cursor + k) % len(templates)] for k in range(size)]
        self._cursor = end % len(templates)
        return chunk

    def grpc(self) -> tuple[bytes, list[str]]:
        """A serialized StreamEventsRequest and its message ids."""
        ids = self._ids.take(self._size)
        parts: list[bytes] = []
        for template, message_id in zip(self._next_templates(), ids, strict=True):
            parts += (template.head, message_id.encode(), template.tail)
        return b"".join(parts), ids

    def segment_batch(self) -> tuple[bytes, list[str]]:
        """A Segment batch body and its message ids."""
        ids = self._ids.take(self._size)
        events = [
            b"".join((template.head, message_id.encode(), template.tail))
            for template, message_id in zip(self._next_templates(), ids, strict=True)
        ]
        return b'{"batch":[' + b",".join(events) + b"]}", ids
