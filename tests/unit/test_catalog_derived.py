"""Catalog.derived: what blocks make from a product is made once per version
of the product, and a catalog update is seen at once."""

from __future__ import annotations

from sendtime.server.domain.blocks import product_data
from sendtime.server.domain.catalog import Catalog, Product


def test_a_product_is_shown_from_one_shared_value_until_it_changes() -> None:
    catalog = Catalog([Product(id="mug", name="Mug", price=12.0, currency="EUR", stock=3)])
    mug = catalog.get("mug")
    assert mug is not None
    first = product_data(mug, "", catalog)
    assert product_data(mug, "", catalog) is first
    assert first["price"] == 12.0
    assert first["in_stock"] is True

    catalog.upsert([Product(id="mug", name="Mug", price=9.5, currency="EUR", stock=0)])
    updated = catalog.get("mug")
    assert updated is not None
    shown = product_data(updated, "", catalog)
    assert shown["price"] == 9.5
    assert shown["in_stock"] is False
    # the value made from the old version is left as it was, for whoever holds it
    assert first["price"] == 12.0


def test_each_base_url_is_its_own_variant() -> None:
    catalog = Catalog([Product(id="mug", name="Mug", price=1.0, currency="EUR", image_url="/img/mug.png")])
    mug = catalog.get("mug")
    assert mug is not None
    assert product_data(mug, "", catalog)["image_url"] == "/img/mug.png"
    assert (
        product_data(mug, "https://shop.example", catalog)["image_url"] == "https://shop.example/img/mug.png"
    )
