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
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

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
        #: Every product the graphs name, numbered in the order first seen.
        self._number: dict[str, int] = {}
        self._names: list[str] = []
        #: Each product's neighbours as arrays (numbers, weights), in the
        #: graph's order, made when first asked for and dropped when they change.
        self._arrays: dict[tuple[int, str], tuple[npt.NDArray[np.intp], npt.NDArray[np.float64]]] = {}

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
        which = id(graph)
        self._arrays.pop((which, a), None)
        self._arrays.pop((which, b), None)
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
        candidates are scored in one pass, then taken best first until
        ``size`` are available (only those are checked), then the popular ones
        in their kept ranking, again only until ``size``."""
        excluded = exclude if isinstance(exclude, set | frozenset) else set(exclude)
        numbers: list[npt.NDArray[np.intp]] = []
        weights: list[npt.NDArray[np.float64]] = []
        from_bought: list[npt.NDArray[np.float64]] = []
        for rank, seed in enumerate(dict.fromkeys(seeds)):
            damping = 1.0 / (1 + rank * 0.25)  # earlier seeds say more
            # Bought-with before viewed-with, per seed, each in the graph's
            # order: a candidate's score adds up in that order (float sums
            # depend on it), as it always has.
            for graph, bought in ((self._bought_with, 1.0), (self._viewed_with, 0.0)):
                neighbours, weight = self._neighbours(graph, seed)
                if len(neighbours):
                    numbers.append(neighbours)
                    weights.append(weight * damping)
                    from_bought.append(np.full(len(neighbours), bought))
        picks: list[str] = []
        strategy = "popular"
        if numbers:
            # Summed per candidate in C (bincount adds in array order), then
            # taken best first, ties by id, only until `size` are available.
            candidates, where = np.unique(np.concatenate(numbers), return_inverse=True)
            scores = np.bincount(where, weights=np.concatenate(weights))
            bought_together = np.bincount(where, weights=np.concatenate(from_bought)) > 0
            for product_id in excluded:
                number = self._number.get(product_id)
                if number is not None:
                    at = int(np.searchsorted(candidates, number))
                    if at < len(candidates) and candidates[at] == number:
                        scores[at] = -np.inf
            order = np.argsort(-scores, kind="stable")
            descending = -scores[order]
            names = self._names
            start, count = 0, len(order)
            while start < count and len(picks) < size and descending[start] != np.inf:
                end = int(np.searchsorted(descending, descending[start], side="right"))
                tied = sorted((names[candidates[k]], k) for k in order[start:end].tolist())
                for product_id, k in tied:
                    if available is None or available(product_id):
                        if not picks:
                            strategy = "bought_together" if bought_together[k] else "viewed_together"
                        picks.append(product_id)
                        if len(picks) >= size:
                            break
                start = end
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

    def _neighbours(
        self, graph: dict[str, dict[str, float]], product_id: str
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float64]]:
        key = (id(graph), product_id)
        arrays = self._arrays.get(key)
        if arrays is None:
            found = graph.get(product_id, {})
            number = self._number
            for name in found:
                if name not in number:
                    number[name] = len(self._names)
                    self._names.append(name)
            arrays = (
                np.fromiter((number[name] for name in found), np.intp, len(found)),
                np.fromiter(found.values(), np.float64, len(found)),
            )
            self._arrays[key] = arrays
        return arrays
