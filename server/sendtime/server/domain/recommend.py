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
import math
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
#: Candidates are scored in an array indexed by product number when the
#: products numbered are at most this many times the neighbours summed (a
#: bincount, no sort); beyond, numbered by sorting the neighbours, so a call's
#: work stays bounded by the neighbour lists whatever the catalog's size.
_DIRECT_SCORES_FACTOR: Final = 8
#: The best candidates ranked first, per pick asked for: enough that the
#: picks are nearly always among them (only an unavailable one costs one).
_SHORTLIST_PER_PICK: Final = 4


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
        unique_seeds = list(dict.fromkeys(seeds))
        numbers: list[npt.NDArray[np.intp]] = []
        weights: list[npt.NDArray[np.float64]] = []
        dampings: list[float] = []
        lengths: list[int] = []
        for rank, seed in enumerate(unique_seeds):
            damping = 1.0 / (1 + rank * 0.25)  # earlier seeds say more
            # Bought-with before viewed-with, per seed, each in the graph's
            # order: a candidate's score adds up in that order (float sums
            # depend on it), as it always has.
            for graph in (self._bought_with, self._viewed_with):
                neighbours, weight = self._neighbours(graph, seed)
                if len(neighbours):
                    numbers.append(neighbours)
                    weights.append(weight)
                    dampings.append(damping)
                    lengths.append(len(neighbours))
        picks: list[str] = []
        strategy = "popular"
        if numbers:
            # A handful of numpy calls for all seeds at once: on arrays this
            # short a call costs more than its arithmetic. Each weight times
            # its seed's damping, as before, and bincount adds each
            # candidate's weights in array order, as before (float sums
            # depend on the order).
            named = np.concatenate(numbers)
            scaled = np.concatenate(weights) * np.repeat(np.array(dampings), lengths)
            if len(self._names) <= _DIRECT_SCORES_FACTOR * len(named):
                # Scored by product number directly (every weight is > 0, so
                # a score > 0 is a candidate): no sort to number them.
                by_number = np.bincount(named, weights=scaled)
                candidates = np.flatnonzero(by_number > 0)
                scores = by_number[candidates]
            else:  # a catalog much larger than the neighbour lists: numbered by a sort
                candidates, where = np.unique(named, return_inverse=True)
                scores = np.bincount(where, weights=scaled)
            known = [n for n in map(self._number.get, excluded) if n is not None]
            if known:
                wanted = np.array(known, dtype=np.intp)
                at = np.minimum(np.searchsorted(candidates, wanted), len(candidates) - 1)
                scores[at[candidates[at] == wanted]] = -np.inf
            # Taken best first, ties by id, only until `size` are available:
            # first from the few best (every candidate scoring at least the
            # SHORTLIST-th best score, ties kept whole), from all only when
            # too few of those could be taken.
            negated = -scores
            shortlist = _SHORTLIST_PER_PICK * size
            if len(negated) > shortlist:
                bound = np.partition(negated, shortlist - 1)[shortlist - 1]
                tops = [np.flatnonzero(negated <= bound), None]
            else:
                tops = [None]
            names = self._names
            for top in tops:
                chosen_numbers = candidates if top is None else candidates[top]
                chosen_scores = negated if top is None else negated[top]
                ranked = sorted(
                    zip(chosen_scores.tolist(), map(names.__getitem__, chosen_numbers.tolist()), strict=True)
                )
                picks = []
                for negative_score, product_id in ranked:
                    if negative_score == math.inf or len(picks) >= size:
                        break
                    if available is None or available(product_id):
                        picks.append(product_id)
                if len(picks) >= size:
                    break
            if picks:
                bought_with = self._bought_with
                strategy = (
                    "bought_together"
                    if any(picks[0] in bought_with.get(seed, ()) for seed in unique_seeds)
                    else "viewed_together"
                )
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
