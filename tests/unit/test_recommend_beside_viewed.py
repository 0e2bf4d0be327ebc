"""Recommendations shown beside the products a shopper viewed (browse
abandonment) leave those products out while enough others remain, and fall
back to them, most recent first, only when too few do."""

from __future__ import annotations

from sendtime.server.domain import blocks
from sendtime.server.domain.catalog import Catalog
from sendtime.server.domain.recommend import Recommender
from tests.unit.test_recommend import product, shopper


def ids(data: dict[str, list[dict[str, str]]]) -> list[str]:
    return [p["id"] for p in data["products"]]


def co_viewed(*sessions: list[str]) -> Recommender:
    recommender = Recommender()
    for number, session in enumerate(sessions):
        for product_id in session:
            recommender.viewed(f"s{number}", product_id)
    return recommender


def test_plenty_of_others_leaves_the_viewed_products_out() -> None:
    catalog = Catalog(
        [product(p) for p in ("kettle", "teapot", "mug", "cups", "tea", "tray", "scale", "cosy")]
    )
    # Shoppers viewed the kettle and the teapot together (so each is the other's
    # best neighbour), and each beside a few more products.
    recommender = co_viewed(
        ["kettle", "teapot"], ["kettle", "teapot"], ["kettle", "mug"], ["teapot", "cups"], ["teapot", "tea"]
    )
    recommender.viewed("ada", "kettle")
    recommender.viewed("ada", "teapot")
    profile = shopper(cart=[], viewed=["teapot", "kettle"], bought=[])

    alone = blocks.recommendations(profile, catalog, recommender, size=4)
    beside = blocks.recommendations(profile, catalog, recommender, size=4, shown_beside=["teapot", "kettle"])

    # Alone, the block repeats what was viewed (the picks as ever) ...
    assert {"kettle", "teapot"} <= set(ids(alone))
    # ... beside the viewed products, it shows four others, in the learned order
    # less the viewed ones, then the catalog.
    assert ids(beside) == ["cups", "tea", "mug", "tray"]
    assert beside["strategy"] == "viewed_together"


def test_too_few_others_falls_back_to_the_viewed_products_most_recent_first() -> None:
    # A fresh shop: three products, the shopper viewed two, nothing learned.
    catalog = Catalog([product("kettle"), product("teapot"), product("mug"), product("sold-out", stock=0)])
    profile = shopper(cart=[], viewed=["teapot", "kettle"], bought=[])

    data = blocks.recommendations(profile, catalog, Recommender(), size=4, shown_beside=["teapot", "kettle"])

    # the one other product first, then the viewed ones, never a sold-out one
    assert ids(data) == ["mug", "teapot", "kettle"]


def test_the_fallback_never_brings_back_the_cart_or_an_order() -> None:
    catalog = Catalog([product("kettle"), product("teapot"), product("mug")])
    profile = shopper(cart=["kettle"], viewed=["kettle", "teapot", "mug"], bought=["mug"])

    data = blocks.recommendations(
        profile, catalog, Recommender(), size=4, shown_beside=["kettle", "teapot", "mug"]
    )

    assert ids(data) == ["teapot"]
