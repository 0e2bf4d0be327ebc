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

import bisect
import heapq
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
        #: The popular products ranked as recommend() walks them, most popular
        #: first (ties by id), kept in order as popularity changes: (-score, id).
        self._popular_ranked: list[tuple[float, str]] = []
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
        old = self._popularity.get(product_id)
        new = (old or 0.0) + weight
        self._popularity[product_id] = new
        if len(self._popularity) > 2 * self._max_popular:
            # Rare: the same cut as ever (by score, ties in the order learned), then ranked afresh.
            keep = sorted(self._popularity.items(), key=lambda kv: kv[1], reverse=True)[: self._max_popular]
            self._popularity = dict(keep)
            self._popular_ranked = sorted((-score, p) for p, score in keep)
            return
        # One product moves up the ranking: two binary searches, no sort.
        ranked = self._popular_ranked
        if old is not None:
            del ranked[bisect.bisect_left(ranked, (-old, product_id))]
        bisect.insort(ranked, (-new, product_id))

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
        or one ``available`` says no to (out of stock, unknown).

        The work is bounded by the seeds' neighbour lists (each at most twice
        max_neighbours long), never by the catalog or the number of shoppers:
        candidates are scored in one pass, then taken best first from a heap
        until ``size`` are available (only those are checked), then the
        popular ones in their kept ranking, again only until ``size``."""
        excluded = exclude if isinstance(exclude, set | frozenset) else set(exclude)
        scores: dict[str, float] = {}
        bought_together: set[str] = set()
        bought_with, viewed_with = self._bought_with, self._viewed_with
        for rank, seed in enumerate(dict.fromkeys(seeds)):
            damping = 1.0 / (1 + rank * 0.25)  # earlier seeds say more
            # Bought-with before viewed-with, per seed: a candidate's score adds
            # up in that order (float sums depend on it).
            neighbours = bought_with.get(seed)
            if neighbours:
                for candidate, weight in neighbours.items():
                    if candidate not in excluded:
                        scores[candidate] = scores.get(candidate, 0.0) + weight * damping
                        bought_together.add(candidate)  # the stronger signal names the strategy
            neighbours = viewed_with.get(seed)
            if neighbours:
                for candidate, weight in neighbours.items():
                    if candidate not in excluded:
                        scores[candidate] = scores.get(candidate, 0.0) + weight * damping
        picks: list[str] = []
        if scores:
            # Best first, ties by id: a heap, popped only as far as needed.
            heap = [(-score, candidate) for candidate, score in scores.items()]
            heapq.heapify(heap)
            while heap and len(picks) < size:
                candidate = heapq.heappop(heap)[1]
                if available is None or available(candidate):
                    picks.append(candidate)
        if not picks:
            strategy = "popular"
        else:
            strategy = "bought_together" if picks[0] in bought_together else "viewed_together"
        if len(picks) < size:
            chosen = set(picks)
            for _, product_id in self._popular_ranked:
                if len(picks) >= size:
                    break
                if (
                    product_id not in chosen
                    and product_id not in excluded
                    and (available is None or available(product_id))
                ):
                    picks.append(product_id)
        return Recommendation(product_ids=picks, strategy=strategy)
