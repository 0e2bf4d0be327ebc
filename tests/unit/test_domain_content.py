"""ContentPipeline over in-memory profiles (tests/fakes), the real block cache
on a manual clock, and in-memory upstreams: where each block comes from and
why, what is cached and when it goes stale, shedding, whole emails. No
sockets, no sleeps: time moves when the test moves it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import pytest

from sendtime.server.cache import CacheFetcher
from sendtime.server.domain.blocks import BUILT_IN_BLOCKS, BlockName
from sendtime.server.domain.catalog import Product
from sendtime.server.domain.content import (
    Block,
    ContentContext,
    ContentPipeline,
)
from sendtime.server.domain.errors import InvalidInput, Overloaded
from sendtime.server.domain.events import Identity
from sendtime.server.domain.provenance import Reason, Source
from tests.fakes import (
    IngestRig,
    MemoryUpstream,
    PlainTemplate,
    Templates,
    content_pipeline,
    identify,
    track,
)

ADA = Identity("ada")
PRODUCTS = [
    Product(id="p1", name="Socks", price=8.0, currency="EUR", stock=3),
    Product(id="p2", name="Scarf", price=30.0, currency="EUR", stock=0),
    Product(id="p3", name="Hat", price=20.0, currency="EUR"),
]
BUDGET_S = 0.3


@dataclass
class Lag:
    """How late the event loop runs, as a test says."""

    seconds: float = 0.0

    def __call__(self) -> float:
        return self.seconds


@dataclass
class ContentRig:
    rig: IngestRig
    pipeline: ContentPipeline
    fetcher: CacheFetcher
    loyalty: MemoryUpstream
    lag: Lag
    template: PlainTemplate
    shed: list[str] = field(default_factory=list)

    async def content(self, *names: str, budget_s: float = BUDGET_S) -> dict[str, Block]:
        answer = await self.pipeline.content(ADA, names, ContentContext(), budget_s)
        return {block.name: block for block in answer.blocks}

    def advance(self, seconds: float) -> None:
        self.rig.clock.advance(seconds)


def state(block: Block) -> tuple[Source, Reason | None]:
    return block.source, block.reason


@pytest.fixture
async def content() -> AsyncIterator[ContentRig]:
    async with IngestRig() as rig:
        await rig.ingest(
            identify("m1", tier="gold"),
            track("m2", "Product Added", {"product_id": "p1", "cart_id": "c1", "price": 10.0, "quantity": 2}),
            track("m3", "Product Viewed", {"product_id": "p3"}),
        )
        loyalty = MemoryUpstream("loyalty", answer={"points": 1200}, ttl_s=60, stale_ttl_s=600)
        lag = Lag()
        template = PlainTemplate("cart_email", {"cart": {}, "loyalty": {}})
        shed: list[str] = []

        class Observer:
            def answered(self, call: str, blocks: Sequence[Block], budget_s: float, elapsed_s: float) -> None:
                pass

            def shed(self, call: str) -> None:
                shed.append(call)

            def late(self, call: str) -> None:
                pass

        pipeline, fetcher = content_pipeline(
            rig,
            Templates(template),
            products=PRODUCTS,
            upstreams=[loyalty],
            loop_lag=lag,
            observer=Observer(),
        )
        yield ContentRig(rig, pipeline, fetcher, loyalty, lag, template, shed)
        await fetcher.aclose()


async def test_built_in_blocks_are_computed_then_served_from_the_cache(content: ContentRig) -> None:
    first = await content.content("cart", "recently_viewed")
    assert state(first["cart"]) == (Source.FRESH, None)
    (line,) = first["cart"].data["lines"]
    # the live catalog price, and the price when it was added
    assert (line["product"]["id"], line["unit_price"], line["added_price"]) == ("p1", 8.0, 10.0)
    assert [p["id"] for p in first["recently_viewed"].data["products"]] == ["p3"]
    content.advance(5)
    second = await content.content("cart")
    assert state(second["cart"]) == (Source.CACHED, None)
    assert second["cart"].age_s == 5
    assert second["cart"].data == first["cart"].data


async def test_an_event_for_the_user_drops_the_cached_blocks(content: ContentRig) -> None:
    await content.content("cart")
    await content.rig.ingest(
        track("m4", "Product Added", {"product_id": "p3", "cart_id": "c1", "price": 20.0, "quantity": 1})
    )
    blocks = await content.content("cart")
    assert state(blocks["cart"]) == (Source.FRESH, None)
    assert sorted(line["product"]["id"] for line in blocks["cart"].data["lines"]) == ["p1", "p3"]


async def test_a_user_with_nothing_to_show_and_an_unknown_block_fall_back_saying_why(
    content: ContentRig,
) -> None:
    answer = await content.pipeline.content(
        Identity("nobody"), ["cart", "no_such_block"], ContentContext(), BUDGET_S
    )
    cart, unknown = answer.blocks
    assert state(cart) == (Source.FALLBACK, Reason.MISSING_DATA)
    assert state(unknown) == (Source.FALLBACK, Reason.MISSING_DATA)
    assert unknown.detail == "no block is named 'no_such_block'"


async def test_too_many_blocks_is_a_bad_request_naming_the_field(content: ContentRig) -> None:
    with pytest.raises(InvalidInput) as caught:
        await content.content(*(f"block{n}" for n in range(21)))
    assert [v.field for v in caught.value.violations] == ["blocks"]


async def test_an_upstream_block_is_fetched_once_then_cached_then_stale_when_the_source_fails(
    content: ContentRig,
) -> None:
    fresh = await content.content("loyalty")
    assert state(fresh["loyalty"]) == (Source.FRESH, None)
    assert fresh["loyalty"].data == {"points": 1200}
    assert content.loyalty.fetched == ["https://loyalty.example.com/v1/ada"]
    content.advance(30)
    assert state((await content.content("loyalty"))["loyalty"]) == (Source.CACHED, None)
    assert len(content.loyalty.fetched) == 1
    # past its TTL, and the source now fails: the last good value, stale
    content.advance(40)
    content.loyalty.answers = [RuntimeError("503 from loyalty")]
    stale = (await content.content("loyalty"))["loyalty"]
    assert (stale.source, stale.data, stale.age_s) == (Source.STALE, {"points": 1200}, 70)
    assert stale.reason is not None


async def test_an_upstream_that_fails_with_nothing_cached_falls_back_with_its_words(
    content: ContentRig,
) -> None:
    content.loyalty.answers = [RuntimeError("503 from loyalty")]
    block = (await content.content("loyalty"))["loyalty"]
    assert state(block) == (Source.FALLBACK, Reason.UPSTREAM_ERROR)
    assert "503 from loyalty" in block.detail
    # remembered for a while: the next call does not knock again
    again = (await content.content("loyalty"))["loyalty"]
    assert state(again) == (Source.FALLBACK, Reason.UPSTREAM_ERROR)
    assert len(content.loyalty.fetched) == 1


async def test_an_upstream_url_that_needs_a_missing_trait_falls_back_as_missing_data(
    content: ContentRig,
) -> None:
    content.loyalty.needs = "member_number"
    block = (await content.content("loyalty"))["loyalty"]
    assert state(block) == (Source.FALLBACK, Reason.MISSING_DATA)
    assert block.detail == "the profile has no member_number"
    content.loyalty.needs = "tier"  # a trait the profile has
    assert state((await content.content("loyalty"))["loyalty"]) == (Source.FRESH, None)
    assert content.loyalty.fetched == ["https://loyalty.example.com/v1/gold"]


async def test_a_shed_call_serves_what_is_cached_upstream_blocks_too(content: ContentRig) -> None:
    await content.content("cart", "loyalty")
    content.advance(90)  # both past their TTLs, within their stale windows
    content.lag.seconds = 1.0  # the loop runs a second late: the call cannot be answered in time
    blocks = await content.content("cart", "loyalty")
    assert content.shed == ["content"]
    assert state(blocks["cart"]) == (Source.STALE, Reason.OVERLOADED)
    # the upstream block's last good value, not an empty block: it is cached
    # under its URL, not under a built-in block's key
    loyalty = blocks["loyalty"]
    assert (loyalty.source, loyalty.reason, loyalty.data) == (
        Source.STALE,
        Reason.OVERLOADED,
        {"points": 1200},
    )
    assert len(content.loyalty.fetched) == 1  # and nothing was fetched


async def test_a_budget_too_short_to_fetch_serves_what_is_cached(content: ContentRig) -> None:
    await content.content("cart", "loyalty")
    content.advance(1)
    blocks = await content.content("cart", "loyalty", "offers", budget_s=0.004)
    assert state(blocks["cart"]) == (Source.CACHED, None)
    assert (blocks["loyalty"].source, blocks["loyalty"].data) == (Source.CACHED, {"points": 1200})
    assert state(blocks["offers"]) == (Source.FALLBACK, Reason.DEADLINE_TOO_SHORT)


async def test_a_whole_email_renders_its_blocks_and_says_which_fell_back(content: ContentRig) -> None:
    answer = await content.pipeline.email("cart_email", ADA, ContentContext(), BUDGET_S)
    assert answer.email.subject == "for ada"
    assert {b.name: b.source for b in answer.blocks} == {"cart": Source.FRESH, "loyalty": Source.FRESH}
    (rendered,) = content.template.contexts
    assert rendered["user"]["email"] == "ada@example.com"
    assert rendered["loyalty"] == {"points": 1200}
    # a block whose data the template cannot render is reported as fallen back
    content.template.unrenderable = ("loyalty",)
    again = await content.pipeline.email("cart_email", ADA, ContentContext(), BUDGET_S)
    loyalty = next(b for b in again.blocks if b.name == "loyalty")
    assert (loyalty.source, loyalty.reason, loyalty.detail) == (
        Source.FALLBACK,
        Reason.UPSTREAM_ERROR,
        "the template could not render its data",
    )


async def test_an_email_that_cannot_be_made_in_time_is_refused_unless_it_must_be_sent(
    content: ContentRig,
) -> None:
    content.lag.seconds = 1.0
    with pytest.raises(Overloaded, match="cannot be made in time"):
        await content.pipeline.email("cart_email", ADA, ContentContext(), BUDGET_S)
    assert content.shed == ["email"]
    assert content.template.contexts == []  # refused before any work
    # a flow send has no caller waiting: it is made whatever the lag
    answer = await content.pipeline.email("cart_email", ADA, ContentContext(), BUDGET_S, may_shed=False)
    assert answer.email.template_id == "cart_email"


async def test_a_shed_call_finds_recommendations_cached_beside_recently_viewed(content: ContentRig) -> None:
    await content.content("recently_viewed", "recommendations")
    content.lag.seconds = 1.0
    blocks = await content.content("recently_viewed", "recommendations")
    assert content.shed == ["content"]
    # cached apart from recommendations alone (they leave out what is shown beside them)
    assert state(blocks["recommendations"]) == (Source.CACHED, None)
    assert state(blocks["recently_viewed"]) == (Source.CACHED, None)


def test_every_built_in_block_name_is_computed_and_asked_for_by_default() -> None:
    from sendtime.server.domain import content as module

    assert set(module._BUILT_IN) == set(BlockName)
    assert tuple(BlockName) == BUILT_IN_BLOCKS
