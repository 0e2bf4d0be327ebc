"""The product catalog: what a product costs and whether it is in stock now.

Loaded from a JSON or CSV file at start, then kept current by the catalog API
(and stored, so updates survive a restart). Blocks read it to re-check carts
and recommendations against live price and stock at render time.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Final, TypeVar

import msgspec

from sendtime.server.domain.errors import FieldViolation, InvalidInput

NonNegative = Annotated[float, msgspec.Meta(ge=0)]
MAX_PRODUCTS_PER_UPDATE: Final = 10_000
#: Values derived from products kept (Catalog.derived): a catalog of this many
#: products, each shown one way, fits.
MAX_DERIVED: Final = 200_000
T = TypeVar("T")


class Product(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    name: str
    price: NonNegative
    currency: Annotated[str, msgspec.Meta(pattern="^[A-Z]{3}$")]
    url: str = ""
    image_url: str = ""
    category: str = ""
    #: None: stock is not tracked (always available).
    stock: Annotated[int, msgspec.Meta(ge=0)] | None = None

    @property
    def in_stock(self) -> bool:
        return self.stock is None or self.stock > 0


_products_decoder: Final = msgspec.json.Decoder(list[Product])


def parse_products(data: bytes, *, source: str = "products") -> list[Product]:
    """A JSON array of products; errors name the product and field at fault."""
    try:
        products = _products_decoder.decode(data)
    except msgspec.ValidationError as exc:
        path = str(exc).rpartition(" - at `$")[2].rstrip("`")
        raise InvalidInput(
            f"{source}: {exc}", [FieldViolation(f"{source}{path}", str(exc).partition(" - at")[0])]
        ) from None
    except msgspec.DecodeError as exc:
        raise InvalidInput.field(source, f"is not a JSON array of products: {exc}") from None
    if len(products) > MAX_PRODUCTS_PER_UPDATE:
        raise InvalidInput.field(
            source, f"holds {len(products)} products; the limit is {MAX_PRODUCTS_PER_UPDATE}"
        )
    return products


def _csv_products(text: str, source: str) -> list[Product]:
    rows: list[Product] = []
    for line, row in enumerate(csv.DictReader(io.StringIO(text)), start=2):
        clean: dict[str, Any] = {
            k.strip(): v.strip() for k, v in row.items() if k and v is not None and v.strip()
        }
        try:
            rows.append(msgspec.convert(clean, Product, strict=False))
        except msgspec.ValidationError as exc:
            raise InvalidInput.field(f"{source}:{line}", str(exc)) from None
    return rows


def load_products(path: Path) -> list[Product]:
    """Products from a .json (array) or .csv (header row with the field names) file."""
    if path.suffix.lower() == ".csv":
        return _csv_products(path.read_text(encoding="utf-8"), str(path))
    return parse_products(path.read_bytes(), source=str(path))


class Catalog:
    """In-memory view of the catalog; single writer (the event loop)."""

    def __init__(self, products: Iterable[Product] = ()) -> None:
        self._products: dict[str, Product] = {}
        #: (product id, variant) -> (the product it was made from, what was made)
        self._derived: dict[tuple[str, str], tuple[Product, Any]] = {}
        self.version = 0
        self.upsert(products)

    def derived(self, product: Product, variant: str, make: Callable[[Product, str], T]) -> T:
        """``make(product, variant)``, made once per version of the product:
        blocks show the same products to user after user. What is returned is
        shared by every caller and must not be changed. An upsert replaces the
        product object, and a value made from another object is made anew."""
        key = (product.id, variant)
        found = self._derived.get(key)
        if found is not None and found[0] is product:
            made: T = found[1]
            return made
        made = make(product, variant)
        if len(self._derived) >= MAX_DERIVED:
            self._derived.clear()  # many variants (public addresses): start over, bounded
        self._derived[key] = (product, made)
        return made

    def upsert(self, products: Iterable[Product]) -> int:
        count = 0
        for product in products:
            self._products[product.id] = product
            count += 1
        if count:
            self.version += 1
        return count

    def get(self, product_id: str) -> Product | None:
        return self._products.get(product_id)

    def __len__(self) -> int:
        return len(self._products)

    def __iter__(self) -> Iterator[Product]:
        return iter(self._products.values())


class CatalogUpdater:
    """Catalog updates from the API: validated whole, stored, then applied, so
    a bad product changes nothing and an applied one survives a restart."""

    def __init__(
        self,
        catalog: Catalog,
        save: Callable[[Sequence[Product]], Awaitable[None]],
        on_change: Callable[[], None],
    ) -> None:
        self._catalog = catalog
        self._save = save
        self._on_change = on_change

    async def upsert(self, body: bytes) -> int:
        products = parse_products(body)
        if not products:
            return 0
        await self._save(products)
        count = self._catalog.upsert(products)
        self._on_change()
        return count
