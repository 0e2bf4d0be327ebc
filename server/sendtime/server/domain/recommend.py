"""Recommendations learned from ingested events.

Item-to-item co-occurrence, the workhorse of e-commerce email: two products
viewed by the same shopper close together are "viewed together"; two products
in one order are "bought together" (weighted higher). A user's candidates are
the neighbours of what they have in their cart, viewed and bought, minus what
they already have or bought, topped up with the most popular products.

Everything is bounded: neighbours per product, shoppers remembered, popular
products kept.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

VIEW_WEIGHT: Final = 1.0
BOUGHT_WEIGHT: Final = 3.0
#: How many of a shopper's latest views a new view is paired with.
VIEW_WINDOW: Final = 10


@dataclass(frozen=True, slots=True)
class Recommendation:
    product_ids: list[str]
    #: "bought_together", "viewed_together" or "popular": what drove the top pick.
    strategy: str


class Recommender:
    def __init__(
        self, *, max_neighbours: int = 50, max_shoppers: int = 100_000, max_popular: int = 1_000
    ) -> None:
        self._max_neighbours = max_neighbours
        self._max_shoppers = max_shoppers
        self._max_popular = max_popular
        self._viewed_with: dict[str, dict[str, float]] = {}
        self._bought_with: dict[str, dict[str, float]] = {}
        self._popularity: dict[str, float] = {}
        self._recent_views: OrderedDict[str, list[str]] = OrderedDict()

    # -- learning ---------------------------------------------------------------

    def viewed(self, shopper: str, product_id: str) -> None:
        recent = self._recent_views.get(shopper)
        if recent is None:
            recent = self._recent_views[shopper] = []
            if len(self._recent_views) > self._max_shoppers:
                self._recent_views.popitem(last=False)
        else:
            self._recent_views.move_to_end(shopper)
        for other in recent:
            if other != product_id:
                self._link(self._viewed_with, product_id, other, VIEW_WEIGHT)
        if product_id in recent:
            recent.remove(product_id)
        recent.append(product_id)
        del recent[:-VIEW_WINDOW]
        self._bump(product_id, VIEW_WEIGHT)

    def bought(self, product_ids: Iterable[str]) -> None:
        products = list(dict.fromkeys(product_ids))
        for i, first in enumerate(products):
            self._bump(first, BOUGHT_WEIGHT)
            for second in products[i + 1 :]:
                self._link(self._bought_with, first, second, BOUGHT_WEIGHT)

    def _link(self, graph: dict[str, dict[str, float]], a: str, b: str, weight: float) -> None:
        for x, y in ((a, b), (b, a)):
            neighbours = graph.setdefault(x, {})
            neighbours[y] = neighbours.get(y, 0.0) + weight
            if len(neighbours) > 2 * self._max_neighbours:
                keep = sorted(neighbours.items(), key=lambda kv: kv[1], reverse=True)[: self._max_neighbours]
                graph[x] = dict(keep)

    def _bump(self, product_id: str, weight: float) -> None:
        self._popularity[product_id] = self._popularity.get(product_id, 0.0) + weight
        if len(self._popularity) > 2 * self._max_popular:
            keep = sorted(self._popularity.items(), key=lambda kv: kv[1], reverse=True)[: self._max_popular]
            self._popularity = dict(keep)

    # -- recommending -----------------------------------------------------------

    def recommend(
        self,
        *,
        seeds: Iterable[str],
        exclude: Iterable[str],
        size: int,
        available: Callable[[str], bool] | None = None,
    ) -> Recommendation:
        """Up to ``size`` products for a shopper whose interest is ``seeds``
        (cart, views, purchases; most telling first), never one in ``exclude``
        or one ``available`` says no to (out of stock, unknown)."""
        excluded = set(exclude)
        scores: dict[str, float] = {}
        drivers: dict[str, str] = {}
        for rank, seed in enumerate(dict.fromkeys(seeds)):
            damping = 1.0 / (1 + rank * 0.25)  # earlier seeds say more
            for graph, label in (
                (self._bought_with, "bought_together"),
                (self._viewed_with, "viewed_together"),
            ):
                for candidate, weight in graph.get(seed, {}).items():
                    if candidate in excluded:
                        continue
                    score = weight * damping
                    scores[candidate] = scores.get(candidate, 0.0) + score
                    if label == "bought_together":
                        drivers[candidate] = label  # the stronger signal names the strategy
                    else:
                        drivers.setdefault(candidate, label)
        ranked = sorted(scores, key=lambda p: (-scores[p], p))
        picks = [p for p in ranked if available is None or available(p)][:size]
        strategy = drivers[picks[0]] if picks else "popular"
        if len(picks) < size:
            chosen = set(picks) | excluded
            for product_id, _ in sorted(self._popularity.items(), key=lambda kv: (-kv[1], kv[0])):
                if len(picks) >= size:
                    break
                if product_id not in chosen and (available is None or available(product_id)):
                    picks.append(product_id)
        return Recommendation(product_ids=picks, strategy=strategy)
