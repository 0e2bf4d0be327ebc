"""The built-in content blocks, computed from a profile and the live catalog.

Each function returns the block's data as plain JSON-able values (the shape
templates and HTTP callers see), or None when there is nothing to show, which
the pipeline turns into the block's fallback with reason MISSING_DATA.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from sendtime.server.domain.catalog import Catalog, Product
from sendtime.server.domain.profile import CartView, Line, ProfileView
from sendtime.server.domain.recommend import Recommender


class BlockName(enum.StrEnum):
    """The built-in blocks, by the names templates and callers ask for."""

    CART = "cart"
    RECOMMENDATIONS = "recommendations"
    RECENTLY_VIEWED = "recently_viewed"
    OFFERS = "offers"
    LAST_ORDER = "last_order"


#: What a content call without names gets, in this order.
BUILT_IN_BLOCKS: Final = tuple(BlockName)


@dataclass(frozen=True, slots=True)
class OfferRule:
    id: str
    code: str
    text: str
    min_cart_total: float = 0.0
    #: Only for these campaigns; empty: any.
    campaigns: tuple[str, ...] = ()


def _money(amount: float) -> float:
    return round(amount + 0.0, 2)


def absolute_url(url: str, base_url: str) -> str:
    """A catalog URL that is a path ("/demo/images/mug.png") is on this
    server: made absolute against ``base_url`` (its public address), since a
    mail client has no page to resolve it against. Any other URL is kept."""
    if base_url and url.startswith("/") and not url.startswith("//"):
        return base_url + url
    return url


def product_data(product: Product, base_url: str, catalog: Catalog) -> dict[str, Any]:
    """How blocks show a product: made once per product version and base URL,
    and shared by every block that shows it (never changed after)."""
    return catalog.derived(product, base_url, _product_data)


def _product_data(product: Product, base_url: str) -> dict[str, Any]:
    return {
        "id": product.id,
        "name": product.name,
        "url": product.url,
        "image_url": absolute_url(product.image_url, base_url),
        "price": _money(product.price),
        "currency": product.currency,
        "category": product.category,
        "in_stock": product.in_stock,
    }


def _line_product(line: Line, live: Product | None, base_url: str, catalog: Catalog) -> dict[str, Any]:
    if live is not None:
        return product_data(live, base_url, catalog)
    return {
        "id": line.product_id,
        "name": line.name,
        "url": line.url,
        "image_url": line.image_url,
        "price": _money(line.price) if line.price is not None else None,
        "currency": line.currency,
        "category": line.category,
        # not in the catalog: nothing says it is gone
        "in_stock": True,
    }


def _pick_cart(profile: ProfileView, cart_id: str) -> CartView | None:
    if cart_id:
        return next((c for c in profile.carts if c.cart_id == cart_id), None)
    return profile.carts[0] if profile.carts else None  # newest first


def cart(
    profile: ProfileView,
    catalog: Catalog,
    *,
    cart_id: str = "",
    drop_out_of_stock: bool = False,
    base_url: str = "",
) -> Any:
    """The open cart re-checked against the catalog: current price and stock,
    price drops marked, out-of-stock lines flagged (or dropped)."""
    chosen = _pick_cart(profile, cart_id)
    if chosen is None:
        return None
    lines = []
    total = 0.0
    currency = ""
    for line in chosen.lines:
        live = catalog.get(line.product_id)
        product = _line_product(line, live, base_url, catalog)
        unit_price = product["price"]
        in_stock = bool(product["in_stock"])
        if not in_stock and drop_out_of_stock:
            continue
        added_price = _money(line.price) if line.price is not None else unit_price
        line_total = _money(unit_price * line.quantity) if unit_price is not None else None
        if in_stock and line_total is not None:
            total += line_total
        currency = currency or product["currency"]
        lines.append(
            {
                "product": product,
                "quantity": line.quantity,
                "unit_price": unit_price,
                "added_price": added_price,
                "price_dropped": unit_price is not None
                and added_price is not None
                and unit_price < added_price,
                "in_stock": in_stock,
                "line_total": line_total,
            }
        )
    if not lines:
        return None
    return {
        "cart_id": chosen.cart_id,
        "lines": lines,
        "total": _money(total),
        "currency": currency,
        "item_count": sum(line["quantity"] for line in lines if line["in_stock"]),
        #: Lines left out of the total (out of stock), for wording it honestly.
        "out_of_stock_lines": sum(1 for line in lines if not line["in_stock"]),
    }


#: How far into the catalog a top-up looks for products in stock: the catalog
#: tops up only while learned popularity is short (a fresh data folder), and
#: this bounds that call's work whatever the catalog's size.
CATALOG_TOP_UP_SCAN: Final = 256


def recommendations(
    profile: ProfileView,
    catalog: Catalog,
    recommender: Recommender,
    *,
    size: int,
    shown_beside: Sequence[str] = (),
    base_url: str = "",
) -> Any:
    """Up to ``size`` products for the shopper: learned picks, then the
    catalog. Never what is in the cart or was bought. ``shown_beside`` are
    products the same email shows already (its recently viewed block): they are
    left out while enough other products remain, and fill the last places,
    most recent first, only when too few do (a fresh shop, a tiny catalog)."""
    cart_ids = [line.product_id for c in profile.carts for line in c.lines]
    bought = [p for order in profile.orders for p in order.product_ids]
    viewed = [v.product.product_id for v in profile.recently_viewed]
    excluded = {*cart_ids, *bought}
    avoided = excluded.union(shown_beside) if shown_beside else excluded

    def available(product_id: str) -> bool:
        product = catalog.get(product_id)
        return product is not None and product.in_stock

    picked = recommender.recommend(
        seeds=[*cart_ids, *viewed, *bought], exclude=avoided, size=size, available=available
    )
    products = [
        product_data(p, base_url, catalog) for p in map(catalog.get, picked.product_ids) if p is not None
    ]
    if len(products) < size:
        # Learned popularity ran out: top up from the catalog, in its order.
        chosen = {p["id"] for p in products}
        for product in itertools.islice(catalog, CATALOG_TOP_UP_SCAN):
            if len(products) >= size:
                break
            if product.in_stock and product.id not in chosen and product.id not in avoided:
                products.append(product_data(product, base_url, catalog))
    if len(products) < size and shown_beside:
        # Too few others: a product shown beside beats an empty place.
        chosen = {p["id"] for p in products}
        for product_id in dict.fromkeys(shown_beside):
            if len(products) >= size:
                break
            beside = catalog.get(product_id)
            if (
                beside is not None
                and beside.in_stock
                and beside.id not in chosen
                and beside.id not in excluded
            ):
                products.append(product_data(beside, base_url, catalog))
    if not products:
        return None
    return {"products": products, "strategy": picked.strategy}


def recently_viewed(profile: ProfileView, catalog: Catalog, *, size: int, base_url: str = "") -> Any:
    products = []
    for seen in profile.recently_viewed[:size]:
        product = _line_product(seen.product, catalog.get(seen.product.product_id), base_url, catalog)
        products.append({**product, "viewed_at": seen.viewed_at.isoformat()})
    return {"products": products} if products else None


def last_order(profile: ProfileView, catalog: Catalog, *, base_url: str = "") -> Any:
    completed = [o for o in profile.orders if o.completed_at is not None]
    if not completed:
        return None
    order = completed[0]  # newest first
    products = [
        product_data(p, base_url, catalog) for p in map(catalog.get, order.product_ids) if p is not None
    ]
    return {
        "order_id": order.order_id,
        "total": order.total,
        "currency": order.currency,
        "products": products,
    }


def offers(rules: Sequence[OfferRule], cart_data: Any, *, campaign: str) -> Any:
    cart_total = float(cart_data["total"]) if cart_data else 0.0
    chosen = [
        {"id": rule.id, "code": rule.code, "text": rule.text}
        for rule in rules
        if cart_total >= rule.min_cart_total and (not rule.campaigns or campaign in rule.campaigns)
    ]
    return {"offers": chosen} if chosen else None
