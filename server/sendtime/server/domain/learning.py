"""What the content side learns from each stored event.

``domain.commits.AfterCommit`` calls ``EventLearner.learned`` with every round
of newly stored events once they are folded into profiles, before their acks go
out: the recommender learns from views and orders.
"""

from __future__ import annotations

from collections.abc import Sequence

from sendtime.server.domain.events import (
    CartChange,
    Event,
    EventKind,
    OrderCompleted,
    ProductViewed,
    product_key,
)
from sendtime.server.domain.recommend import Recommender

#: Events that teach the recommender something.
LEARNED_EVENTS = ("Product Viewed", "Product Clicked", "Product Added", "Order Completed")


class EventLearner:
    def __init__(self, recommender: Recommender) -> None:
        self._recommender = recommender

    def learned(self, events: Sequence[Event]) -> None:
        for event in events:
            if event.kind is EventKind.TRACK:
                self.learn(event.profile_key, event.payload)

    def learn(self, shopper: str, payload: object) -> None:
        if (
            isinstance(payload, ProductViewed | CartChange)
            and (payload.product_id or payload.sku) is not None
        ):
            self._recommender.viewed(shopper, product_key(payload))
        elif isinstance(payload, OrderCompleted):
            self._recommender.bought(product_key(p) for p in payload.products)
