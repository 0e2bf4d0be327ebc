"""Counters and histograms for the hot paths, cheaper than prometheus_client's.

prometheus_client guards every value with a lock and walks a histogram's
buckets in Python: on this machine Counter.inc costs about 0.8 us and
Histogram.observe 1.2-1.5 us, several per content request. Everything here is
updated and read on the one event loop (sendtime's single thread of work; the
scrape handler runs there too), so no lock is needed: an increment is an
attribute add (about 0.05 us) and an observation a bisect (about 0.16 us).
Do not update these from another thread.

prometheus_client still does the rest: the registry, the metric families, the
text and OpenMetrics formats.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily


class Counter:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class Histogram:
    """Per-bucket counts (not cumulative: one increment an observation), and their sum."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = list(bounds)
        self.counts = [0] * (len(self._bounds) + 1)  # the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # buckets are "le": bisect_left finds the first bound >= value
        self.counts[bisect.bisect_left(self._bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[int]:
        total = 0
        out = []
        for count in self.counts:
            total += count
            out.append(total)
        return out


class CounterFamily:
    """Children by label values, made on first use; hold on to a child (``labels``
    once) on a hot path rather than looking it up per call."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Counter] = {}

    def labels(self, *values: str) -> Counter:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            child = self._children[values] = Counter()
        return child

    def values(self) -> dict[tuple[str, ...], float]:
        return {labels: child.value for labels, child in self._children.items()}

    def family(self, extra: dict[tuple[str, ...], float] | None = None) -> CounterMetricFamily:
        """The family to expose; ``extra`` adds counts kept elsewhere (same labels)."""
        totals = self.values()
        for labels, value in (extra or {}).items():
            totals[labels] = totals.get(labels, 0.0) + value
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, value in totals.items():
            family.add_metric(labels, value)
        return family


class HistogramFamily:
    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]
    ) -> None:
        if list(buckets) != sorted(buckets) or not buckets or math.isinf(buckets[-1]):
            raise ValueError(f"{name}: buckets must be finite and ascending")
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.buckets = tuple(float(b) for b in buckets)
        self._children: dict[tuple[str, ...], Histogram] = {}

    def labels(self, *values: str) -> Histogram:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            child = self._children[values] = Histogram(self.buckets)
        return child

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        bounds = [_bound(b) for b in self.buckets] + ["+Inf"]
        for labels, child in self._children.items():
            family.add_metric(
                list(labels), list(zip(bounds, child.cumulative(), strict=True)), sum_value=child.sum
            )
        return family


def _bound(value: float) -> str:
    # the format Prometheus clients use for "le": 0.005, 1.0, 300.0
    return repr(float(value))
