"""Recommendations: the same picks as the original all-candidates-sorted
algorithm for the same learned data (pinned below, computed with that code
before the bounded selection replaced it, and compared with a reference copy
of it on many shoppers), never a product in the cart or bought, and topped up
from the catalog when learned popularity runs out."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

import pytest

from sendtime.server.domain import blocks, recommend
from sendtime.server.domain.catalog import Catalog, Product
from sendtime.server.domain.profile import CartView, Line, OrderView, ProfileView, ViewedView
from sendtime.server.domain.recommend import Recommendation, Recommender

PRODUCTS = [f"p{i:03d}" for i in range(200)]


def learned(max_popular: int = 1_000) -> Recommender:
    """3,000 shoppers over 200 products, low numbers the most popular (so
    neighbour weights differ and also tie), some orders."""
    rng = random.Random(10)
    recommender = Recommender(max_popular=max_popular)

    def pick() -> str:
        return PRODUCTS[min(int(rng.expovariate(1 / 40)), 199)]

    for shopper in range(3000):
        for _ in range(rng.randint(2, 9)):
            recommender.viewed(f"s{shopper}", pick())
        if rng.random() < 0.3:
            recommender.bought(pick() for _ in range(rng.randint(1, 4)))
    return recommender


def in_stock(product_id: str) -> bool:
    return int(product_id[1:]) % 7 != 3


# (seeds, exclude, size) -> (picks, strategy), as the original code answered.
PINNED = [
    ((["p001", "p010", "p050"], ["p001"], 4), (["p000", "p006", "p012", "p007"], "bought_together")),
    ((["p120", "p007"], ["p120", "p033"], 4), (["p000", "p002", "p008", "p006"], "bought_together")),
    ((["p199"], [], 6), (["p000", "p013", "p007", "p002", "p001", "p028"], "viewed_together")),
    (
        (["p002", "p003", "p004", "p005", "p006", "p007", "p008", "p009"], ["p002", "p003"], 4),
        (["p000", "p001", "p006", "p011"], "bought_together"),
    ),
    (([], [], 4), (["p000", "p002", "p006", "p001"], "popular")),
    (
        (["p077", "p015", "p150", "p001"], ["p077", "p015", "p001"], 10),
        (
            ["p000", "p002", "p006", "p005", "p008", "p011", "p009", "p007", "p012", "p014"],
            "bought_together",
        ),
    ),
]


@pytest.mark.parametrize(("call", "expected"), PINNED)
def test_the_same_picks_as_before_for_the_same_data(
    call: tuple[list[str], list[str], int], expected: tuple[list[str], str]
) -> None:
    seeds, exclude, size = call
    got = learned().recommend(seeds=seeds, exclude=exclude, size=size, available=in_stock)
    assert (got.product_ids, got.strategy) == expected


def reference(
    recommender: Recommender,
    *,
    seeds: Iterable[str],
    exclude: Iterable[str],
    size: int,
    available: Callable[[str], bool],
) -> Recommendation:
    """The original algorithm, verbatim: every candidate scored and sorted,
    availability asked of all, popularity sorted on each call."""
    excluded = set(exclude)
    scores: dict[str, float] = {}
    drivers: dict[str, str] = {}
    for rank, seed in enumerate(dict.fromkeys(seeds)):
        damping = 1.0 / (1 + rank * 0.25)
        for graph, label in (
            (recommender._bought_with, "bought_together"),
            (recommender._viewed_with, "viewed_together"),
        ):
            for candidate, weight in graph.get(seed, {}).items():
                if candidate in excluded:
                    continue
                scores[candidate] = scores.get(candidate, 0.0) + weight * damping
                if label == "bought_together":
                    drivers[candidate] = label
                else:
                    drivers.setdefault(candidate, label)
    ranked = sorted(scores, key=lambda p: (-scores[p], p))
    picks = [p for p in ranked if available(p)][:size]
    strategy = drivers[picks[0]] if picks else "popular"
    if len(picks) < size:
        chosen = set(picks) | excluded
        for product_id, _ in sorted(recommender._popularity.items(), key=lambda kv: (-kv[1], kv[0])):
            if len(picks) >= size:
                break
            if product_id not in chosen and available(product_id):
                picks.append(product_id)
    return Recommendation(product_ids=picks, strategy=strategy)


@pytest.mark.parametrize("max_popular", [1_000, 40])  # 40: the popularity table is cut as it grows
# 0: candidates numbered by sorting the neighbours, as for a catalog far larger than them
@pytest.mark.parametrize("direct_scores_factor", [recommend._DIRECT_SCORES_FACTOR, 0])
def test_the_same_picks_as_the_original_algorithm_for_many_shoppers(
    max_popular: int, direct_scores_factor: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recommend, "_DIRECT_SCORES_FACTOR", direct_scores_factor)
    recommender = learned(max_popular)
    rng = random.Random(3)
    for _ in range(500):
        seeds = rng.sample(PRODUCTS, rng.randint(0, 12))
        exclude = rng.sample(seeds, min(len(seeds), rng.randint(0, 4))) + rng.sample(PRODUCTS, 2)
        size = rng.randint(1, 12)
        got = recommender.recommend(seeds=seeds, exclude=exclude, size=size, available=in_stock)
        assert got == reference(recommender, seeds=seeds, exclude=exclude, size=size, available=in_stock)


def test_never_recommends_what_is_in_the_cart_or_was_bought() -> None:
    recommender = learned()
    for seeds in (PRODUCTS[:3], PRODUCTS[5:15], PRODUCTS[100:104]):
        excluded = set(seeds[:2])
        got = recommender.recommend(seeds=seeds, exclude=excluded, size=50, available=in_stock)
        assert len(got.product_ids) == 50
        assert not excluded & set(got.product_ids)
        assert all(in_stock(p) for p in got.product_ids)
        assert len(set(got.product_ids)) == 50


def product(product_id: str, *, stock: int | None = None) -> Product:
    return Product(id=product_id, name=product_id.title(), price=10.0, currency="EUR", stock=stock)


def shopper(*, cart: list[str], viewed: list[str], bought: list[str]) -> ProfileView:
    return ProfileView(
        user_id="ada",
        anonymous_id="",
        traits={},
        extra_traits={},
        consent={},
        carts=[CartView(cart_id="c", lines=[Line(product_id=p, quantity=1) for p in cart], updated_at=None)],
        recently_viewed=[ViewedView(product=Line(product_id=p), viewed_at=None) for p in viewed],  # type: ignore[arg-type]
        orders=[
            OrderView(
                order_id="o1",
                total=10.0,
                currency="EUR",
                product_ids=bought,
                completed_at=None,
                refunded_at=None,
                refunded_total=None,
            )
        ],
        first_seen_at=None,
        last_activity_at=None,
        event_count=3,
    )


def test_recommendations_are_topped_up_from_the_catalog_when_popularity_runs_out() -> None:
    # A fresh data folder: one shopper viewed two products, nothing else is learned.
    catalog = Catalog(
        [
            product("kettle"),
            product("mug"),
            product("teapot", stock=0),
            product("spoon"),
            product("tray"),
            product("cosy"),
            product("sugar"),
        ]
    )
    recommender = Recommender()
    recommender.viewed("ada", "kettle")
    recommender.viewed("ada", "mug")
    profile = shopper(cart=["kettle"], viewed=["mug", "kettle"], bought=["spoon"])
    data = blocks.recommendations(profile, catalog, recommender, size=4)
    ids = [p["id"] for p in data["products"]]
    # mug (viewed with the kettle), then the catalog in its order: not the
    # cart's kettle, not the sold-out teapot, not the bought spoon
    assert ids == ["mug", "tray", "cosy", "sugar"]
    assert data["strategy"] == "viewed_together"


def test_the_same_picks_when_most_of_the_best_are_unavailable() -> None:
    # Only one product in 5 can be taken: the picks come from past the
    # shortlist of the best candidates, in the same order as ever.
    recommender = learned()
    rng = random.Random(4)

    def rare(product_id: str) -> bool:
        return int(product_id[1:]) % 5 == 4

    for _ in range(300):
        seeds = rng.sample(PRODUCTS[:60], rng.randint(1, 10))
        size = rng.randint(1, 8)
        got = recommender.recommend(seeds=seeds, exclude=seeds[:2], size=size, available=rare)
        assert got == reference(recommender, seeds=seeds, exclude=seeds[:2], size=size, available=rare)
