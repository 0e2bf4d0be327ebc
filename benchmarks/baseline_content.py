"""The content benchmark's baseline: sendtime's HTTP content endpoint written
the plain way, FastAPI + aiocache + python-liquid + mjml-python, one process,
over the same data (the same catalog file, the same Segment batches).

- ``POST /v1/batch``: Segment messages, validated by pydantic, folded into
  profiles held in a dict (identify: first name, email, locale; Product
  Viewed / Added / Removed; Order Completed closes the cart and marks the
  products bought). Not stored: only the content side is compared here.
- ``GET /v1/content/{user_id}?blocks=cart,recently_viewed,recommendations``:
  the blocks, each as ``{"data": ..., "source": "fresh" | "cached"}``, cached
  per user and request in aiocache's SimpleMemoryCache for 60 s. cart: the
  open cart re-checked against the catalog (price now, price dropped, in
  stock, total); recently_viewed: the last 4 viewed; recommendations: the most
  viewed products of the cart's and views' categories, not in the cart, not
  bought, in stock, topped up with the most viewed overall; offers: 10% off
  carts over 50 EUR.
- ``GET /v1/content/{user_id}?template=abandoned_cart``: the whole email.
  The template is sendtime's own templates/abandoned_cart.mjml.liquid (its
  TOML front matter read with tomllib), rendered by python-liquid (autoescape
  on), then MJML by mjml-python, then a text part from the HTML with lxml:
  subject, preheader, html and text, and its blocks; cached like the blocks.

No deadlines, no fallbacks, no invalidation on events (the 60 s TTL is the
only freshness): what an afternoon's version does.

    python -m benchmarks.baseline_content --catalog FILE [--templates DIR] [--port 0]

prints "baseline content serving HTTP on http://HOST:PORT" when ready;
SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final

import lxml.html
from aiocache import SimpleMemoryCache
from fastapi import Depends, FastAPI, HTTPException
from liquid import Environment
from mjml import mjml2html

from benchmarks.baseline_http import SegmentBatch, check_key, serve

TTL_S: Final = 60
RECOMMENDATIONS: Final = 4
RECENTLY_VIEWED: Final = 4
OFFER_MIN_TOTAL: Final = 50.0
LINKS: Final = {"unsubscribe_url": "#", "preferences_url": "#", "view_in_browser_url": "#"}


@dataclass
class CartLine:
    quantity: int
    added_price: float


@dataclass
class Profile:
    first_name: str = ""
    email: str = ""
    locale: str = ""
    cart_id: str = ""
    cart: dict[str, CartLine] = field(default_factory=dict)
    viewed: list[str] = field(default_factory=list)
    bought: set[str] = field(default_factory=set)


def money(value: object, currency: object = "") -> str:
    try:
        return f"{float(value):,.2f} {currency}".strip()  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""


def safe_url(value: object) -> str:
    url = str(value or "").strip()
    return url if url.startswith(("https://", "http://", "mailto:")) else "#"


class Template:
    """A sendtime template file: TOML front matter between ``+++`` lines, then
    the Liquid + MJML body."""

    def __init__(self, env: Environment, path: Path) -> None:
        _, front, body = path.read_text().split("+++", 2)
        meta = tomllib.loads(front)
        self.subject = env.from_string(meta["subject"])
        self.preheader = env.from_string(meta["preheader"])
        self.body = env.from_string(body)
        self.vars: dict[str, Any] = meta.get("vars", {})
        self.blocks: list[str] = list(meta.get("blocks", {}))

    def render(self, user: dict[str, Any], blocks: dict[str, Any]) -> dict[str, str]:
        context = {"user": user, "vars": self.vars, "links": LINKS, **blocks}
        subject = self.subject.render(**context)
        preheader = self.preheader.render(**context)
        mjml = self.body.render(**context, email={"subject": subject, "preheader": preheader})
        html = mjml2html(mjml)
        body = lxml.html.fromstring(html).find("body")
        text = " ".join((body.text_content() if body is not None else "").split())
        return {"subject": subject, "preheader": preheader, "html": html, "text": text}


class Shop:
    def __init__(self, catalog: list[dict[str, Any]]) -> None:
        self.products = {p["id"]: p for p in catalog}
        self.by_category: dict[str, list[str]] = collections.defaultdict(list)
        for p in catalog:
            self.by_category[p.get("category", "")].append(p["id"])
        self.popularity: collections.Counter[str] = collections.Counter()
        self.profiles: dict[str, Profile] = {}

    def apply(self, batch: SegmentBatch) -> int:
        for m in batch.batch:
            if not m.userId:
                continue
            profile = self.profiles.setdefault(m.userId, Profile())
            if m.type == "identify":
                profile.first_name = str(m.traits.get("firstName", profile.first_name))
                profile.email = str(m.traits.get("email", profile.email))
                profile.locale = str(m.context.get("locale", profile.locale))
                continue
            props = m.properties
            product_id = str(props.get("product_id", ""))
            if m.event == "Product Viewed" and product_id:
                if product_id in profile.viewed:
                    profile.viewed.remove(product_id)
                profile.viewed.insert(0, product_id)
                del profile.viewed[20:]
                self.popularity[product_id] += 1
            elif m.event == "Product Added" and product_id:
                profile.cart_id = str(props.get("cart_id", profile.cart_id))
                line = profile.cart.get(product_id)
                quantity = int(props.get("quantity", 1))
                if line:
                    line.quantity += quantity
                else:
                    profile.cart[product_id] = CartLine(quantity, float(props.get("price", 0.0)))
                self.popularity[product_id] += 1
            elif m.event == "Product Removed" and product_id:
                profile.cart.pop(product_id, None)
            elif m.event == "Order Completed":
                for line in props.get("products", []):
                    profile.bought.add(str(line.get("product_id", "")))
                profile.cart.clear()
        return len(batch.batch)

    def _card(self, product_id: str) -> dict[str, Any]:
        p = self.products[product_id]
        return {k: p.get(k) for k in ("id", "name", "url", "image_url", "price", "currency")}

    def cart(self, profile: Profile) -> dict[str, Any]:
        lines = []
        total = 0.0
        out_of_stock = 0
        for product_id, line in profile.cart.items():
            product = self.products.get(product_id)
            if product is None:
                continue
            price = float(product["price"])
            in_stock = int(product.get("stock", 0)) > 0
            if in_stock:
                total += price * line.quantity
            else:
                out_of_stock += 1
            lines.append(
                {
                    "product": self._card(product_id),
                    "quantity": line.quantity,
                    "unit_price": price,
                    "added_price": line.added_price,
                    "price_dropped": price < line.added_price,
                    "in_stock": in_stock,
                }
            )
        return {
            "cart_id": profile.cart_id,
            "lines": lines,
            "total": round(total, 2),
            "currency": "EUR",
            "item_count": sum(line["quantity"] for line in lines if line["in_stock"]),
            "out_of_stock_lines": out_of_stock,
        }

    def recently_viewed(self, profile: Profile) -> dict[str, Any]:
        return {"products": [self._card(p) for p in profile.viewed[:RECENTLY_VIEWED] if p in self.products]}

    def recommendations(self, profile: Profile) -> dict[str, Any]:
        seen = set(profile.cart) | profile.bought
        categories = {
            self.products[p].get("category", "")
            for p in (*profile.cart, *profile.viewed)
            if p in self.products
        }
        candidates = [p for c in categories for p in self.by_category[c]]
        candidates.sort(key=self.popularity.__getitem__, reverse=True)
        picks: list[str] = []
        for product_id in [*candidates, *(p for p, _ in self.popularity.most_common(50))]:
            if (
                product_id in seen
                or product_id in picks
                or int(self.products[product_id].get("stock", 0)) <= 0
            ):
                continue
            picks.append(product_id)
            if len(picks) == RECOMMENDATIONS:
                break
        return {"products": [self._card(p) for p in picks], "strategy": "category_popularity"}

    def offers(self, profile: Profile) -> dict[str, Any]:
        total = self.cart(profile)["total"]
        if total >= OFFER_MIN_TOTAL:
            return {"offers": [{"id": "cart50", "code": "SAVE10", "text": "10% off carts over EUR 50"}]}
        return {"offers": []}

    def block(self, name: str, profile: Profile) -> dict[str, Any]:
        make = {
            "cart": self.cart,
            "recently_viewed": self.recently_viewed,
            "recommendations": self.recommendations,
            "offers": self.offers,
        }.get(name)
        if make is None:
            raise HTTPException(400, f"unknown block {name!r}")
        return make(profile)


def build_app(catalog: list[dict[str, Any]], templates_dir: Path) -> FastAPI:
    shop = Shop(catalog)
    env = Environment(autoescape=True)
    env.filters["money"] = money
    env.filters["safe_url"] = safe_url
    templates: dict[str, Template] = {}
    cache = SimpleMemoryCache()
    app = FastAPI()

    def load_template(template_id: str) -> Template:
        if template_id not in templates:
            path = templates_dir / f"{template_id}.mjml.liquid"
            if not path.is_file():
                raise HTTPException(404, f"no template {template_id!r}")
            templates[template_id] = Template(env, path)
        return templates[template_id]

    @app.post("/v1/batch")
    async def batch(body: SegmentBatch, _: Annotated[None, Depends(check_key)]) -> dict[str, Any]:
        return {"success": True, "accepted": shop.apply(body)}

    @app.get("/v1/content/{user_id}")
    async def content(
        user_id: str,
        _: Annotated[None, Depends(check_key)],
        blocks: str = "",
        template: str = "",
    ) -> dict[str, Any]:
        started = time.perf_counter()
        key = f"{user_id}|{blocks}|{template}"
        cached = await cache.get(key)
        if cached is not None:
            return {**cached, "source": "cached", "server_time_ms": (time.perf_counter() - started) * 1000}
        profile = shop.profiles.get(user_id)
        if profile is None:
            raise HTTPException(404, f"no user {user_id!r}")
        if template:
            email_template = load_template(template)
            data = {name: shop.block(name, profile) for name in email_template.blocks}
            user = {
                "id": user_id,
                "first_name": profile.first_name,
                "email": profile.email,
                "locale": profile.locale,
            }
            answer: dict[str, Any] = {"email": email_template.render(user, data), "blocks": data}
        else:
            answer = {"blocks": {name: shop.block(name, profile) for name in blocks.split(",") if name}}
        await cache.set(key, answer, ttl=TTL_S)
        return {**answer, "source": "fresh", "server_time_ms": (time.perf_counter() - started) * 1000}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.baseline_content", description=__doc__)
    parser.add_argument("--catalog", required=True, help="the catalog (JSON array), as sendtime loads it")
    parser.add_argument("--templates", default="templates", help="sendtime's templates folder")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    catalog = json.loads(Path(args.catalog).read_text())
    serve(build_app(catalog, Path(args.templates).resolve()), "baseline content", port=args.port)


if __name__ == "__main__":
    main()
