"""The content benchmark's data: a 1,000-product catalog and shoppers with
realistic Segment e-commerce histories, loaded through ``POST /v1/batch`` (into
sendtime and into the plain baseline alike) before any content is asked for;
and the names the load generators use.

Every shopper is identified (email, first name, locale), has viewed 5
products, holds a 3-line cart of 3 of them (now and then added at a higher
price than today's, so price drops show), and about a third have an earlier
completed order. A few products are out of stock.

The histories are recent (the last quarter hour): the server's default flows
schedule an abandoned-cart email 30 minutes after a Product Added and a
browse-abandonment email an hour after a view, so no flow send falls due while
the benchmark runs.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import sys
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import aiohttp
import msgspec

API_KEY: Final = "dev-key"
METADATA: Final = (("authorization", f"Bearer {API_KEY}"),)
GET_CONTENT_METHOD: Final = "/sendtime.v1.ContentService/GetContent"
RENDER_EMAIL_METHOD: Final = "/sendtime.v1.ContentService/RenderEmail"
#: The blocks a first-touch content call asks for (the issue's shape).
CONTENT_BLOCKS: Final = ("cart", "recently_viewed", "recommendations")
TEMPLATE: Final = "abandoned_cart"
CATALOG_SIZE: Final = 1000
VIEWS: Final = 5
CART_LINES: Final = 3
ORDER_SHARE: Final = 0.35
EVENTS_PER_BATCH: Final = 500

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
_CATEGORIES: Final = {
    "mugs": "Mug",
    "kettles": "Kettle",
    "teapots": "Teapot",
    "plates": "Plate",
    "bowls": "Bowl",
    "glasses": "Glass",
    "linen": "Tea Towel",
    "knives": "Knife",
}
_ADJECTIVES: Final = ("Stoneware", "Enamel", "Glazed", "Brushed", "Hand-thrown", "Matte", "Classic", "Nordic")
_COLOURS: Final = ("Sea Green", "Slate", "Sand", "Ink Blue", "Terracotta", "Chalk", "Moss", "Rust")


def user_id(n: int) -> str:
    return f"bench-user-{n:06d}"


def user_ids(count: int, first: int = 0) -> list[str]:
    return [user_id(n) for n in range(first, first + count)]


def make_catalog(size: int = CATALOG_SIZE, *, seed: int = 11) -> list[dict[str, Any]]:
    """``size`` products in 8 categories, prices 4-250 EUR, about 3% out of stock."""
    rng = random.Random(seed)
    products = []
    for n in range(size):
        category, noun = list(_CATEGORIES.items())[n % len(_CATEGORIES)]
        product_id = f"p-{n:05d}"
        products.append(
            {
                "id": product_id,
                "name": f"{rng.choice(_ADJECTIVES)} {noun}, {rng.choice(_COLOURS)}",
                "price": round(rng.uniform(4.0, 250.0), 2),
                "currency": "EUR",
                "url": f"https://shop.example.com/p/{product_id}",
                "image_url": f"https://shop.example.com/img/{product_id}.jpg",
                "category": category,
                "stock": 0 if rng.random() < 0.03 else rng.randint(1, 200),
            }
        )
    return products


def write_catalog(path: Path, catalog: Sequence[dict[str, Any]]) -> Path:
    path.write_text(json.dumps(list(catalog)))
    return path


def _product(product: dict[str, Any]) -> dict[str, Any]:
    return {
        "product_id": product["id"],
        "name": product["name"],
        "price": product["price"],
        "currency": product["currency"],
        "url": product["url"],
        "image_url": product["image_url"],
        "category": product["category"],
    }


def user_history(
    n: int, catalog: Sequence[dict[str, Any]], rng: random.Random, now: datetime
) -> list[dict[str, Any]]:
    """One shopper's Segment messages, oldest first, within the quarter hour before ``now``."""
    uid = user_id(n)
    at = now - timedelta(minutes=15, seconds=rng.randrange(60))

    def message(kind: str, **fields: Any) -> dict[str, Any]:
        nonlocal at
        at += timedelta(seconds=rng.randrange(5, 60))
        return {
            "type": kind,
            "messageId": str(uuid.uuid4()),
            "userId": uid,
            "timestamp": at.isoformat(),
            **fields,
        }

    history = [
        message(
            "identify",
            traits={"email": f"{uid}@example.com", "firstName": _FIRST_NAMES[n % len(_FIRST_NAMES)]},
            context={"locale": _LOCALES[n % len(_LOCALES)]},
        )
    ]
    if rng.random() < ORDER_SHARE:
        bought = rng.sample(catalog, rng.randint(1, 3))
        lines = [{**_product(p), "quantity": rng.randint(1, 2)} for p in bought]
        total = round(sum(line["price"] * line["quantity"] for line in lines), 2)
        history.append(
            message(
                "track",
                event="Order Completed",
                properties={"order_id": f"order-{uid}", "total": total, "currency": "EUR", "products": lines},
            )
        )
    viewed = rng.sample(catalog, VIEWS)
    history += [message("track", event="Product Viewed", properties=_product(p)) for p in viewed]
    for product in rng.sample(viewed, CART_LINES):
        price = product["price"] * (1.15 if rng.random() < 0.2 else 1.0)
        properties = {
            **_product(product),
            "price": round(price, 2),
            "cart_id": f"cart-{uid}",
            "quantity": rng.randint(1, 2),
        }
        history.append(message("track", event="Product Added", properties=properties))
    return history


def batch_bodies(
    users: int, catalog: Sequence[dict[str, Any]], *, seed: int = 7, size: int = EVENTS_PER_BATCH
) -> tuple[list[bytes], int]:
    """Segment ``/v1/batch`` bodies of about ``size`` events holding the
    histories of users 0 .. users-1 (one user's history never split), and the
    number of events in them."""
    rng = random.Random(seed)
    now = datetime.now(UTC)
    bodies: list[bytes] = []
    pending: list[dict[str, Any]] = []
    events = 0
    for n in range(users):
        pending += user_history(n, catalog, rng, now)
        if len(pending) >= size:
            bodies.append(msgspec.json.encode({"batch": pending}))
            events += len(pending)
            pending = []
    if pending:
        bodies.append(msgspec.json.encode({"batch": pending}))
        events += len(pending)
    return bodies, events


def _chunks(items: Sequence[bytes], workers: int) -> Iterator[Sequence[bytes]]:
    for k in range(workers):
        yield items[k::workers]


async def load_batches(base_url: str, bodies: Sequence[bytes], *, connections: int = 8) -> dict[str, int]:
    """POSTs every body to ``base_url``/v1/batch, ``connections`` at a time;
    returns how many requests were answered with each status."""
    basic = base64.b64encode(f"{API_KEY}:".encode()).decode()
    headers = {"Authorization": f"Basic {basic}", "Content-Type": "application/json"}
    statuses: dict[str, int] = {}
    url = f"{base_url.rstrip('/')}/v1/batch"
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        done = 0

        async def post(chunk: Sequence[bytes]) -> None:
            nonlocal done
            for body in chunk:
                async with session.post(url, data=body) as response:
                    await response.read()
                    statuses[str(response.status)] = statuses.get(str(response.status), 0) + 1
                done += 1
                if done % max(1, len(bodies) // 10) == 0:
                    print(f"bench: loaded {done:,} of {len(bodies):,} batches", file=sys.stderr, flush=True)

        await asyncio.gather(*(post(chunk) for chunk in _chunks(bodies, connections)))
    return statuses


async def prime(base_url: str, paths: Sequence[str], *, connections: int = 16) -> dict[str, int]:
    """GETs every path once (``connections`` at a time): fills a server's cache
    for the warm runs; returns how many were answered with each status."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    statuses: dict[str, int] = {}
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(base_url=base_url, headers=headers, timeout=timeout) as session:

        async def get(chunk: Sequence[str]) -> None:
            for path in chunk:
                async with session.get(path) as response:
                    await response.read()
                    statuses[str(response.status)] = statuses.get(str(response.status), 0) + 1

        await asyncio.gather(*(get(paths[k::connections]) for k in range(connections)))
    return statuses
