"""A user's profile and how events fold into it.

Events arrive late and out of order (mobile clients batch, webhooks retry), so
the fold is built to give the same profile whatever the arrival order:

- traits and consent are last-writer-wins registers, stamped with the event's
  (timestamp, message_id), so two writes at the same instant still resolve the
  same way everywhere;
- a cart keeps its recent operations and is computed by replaying them in
  event-time order; an order clears a cart by raising a "cleared before" mark,
  which is a max and so commutes with everything (the operations it closed are
  dropped then, and late ones before it are never kept: they cannot count);
- recently viewed products and orders keep the newest entries by event time.

``fold`` is the only writer; ``view`` derives what callers see. Nothing here does
I/O.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final, Literal

import msgspec

from sendtime.server.domain.events import (
    CartChange,
    CartSnapshot,
    Event,
    EventKind,
    OrderCompleted,
    OrderRefunded,
    ProductFields,
    ProductListViewed,
    ProductViewed,
    TraitsUpdate,
    product_key,
)

MAX_CART_OPS: Final = 200
MAX_CARTS: Final = 20
MAX_VIEWED: Final = 50
MAX_ORDERS: Final = 100
#: Cart key for cart events that name no cart_id.
DEFAULT_CART: Final = "default"

#: (event timestamp, message_id): a total order on events, the same everywhere.
Stamp = tuple[datetime, str]


# The profile Structs are gc=False: a profile is a tree of plain values that
# can never be part of a reference cycle, and the garbage collector would
# otherwise walk every one of the many profiles kept in memory on each full run.


class Stamped(msgspec.Struct, gc=False, array_like=True):
    value: Any
    at: datetime
    message_id: str

    @property
    def stamp(self) -> Stamp:
        return (self.at, self.message_id)


class Line(msgspec.Struct, gc=False, kw_only=True, omit_defaults=True):
    product_id: str
    sku: str = ""
    name: str = ""
    price: float | None = None
    currency: str = ""
    quantity: int = 0
    url: str = ""
    image_url: str = ""
    category: str = ""


class CartOp(msgspec.Struct, gc=False, array_like=True):
    at: datetime
    message_id: str
    op: Literal["add", "remove", "set"]
    # For add and remove, one line whose quantity is the amount added or
    # removed (None on remove: the whole line). For set, the whole cart. A
    # tuple: the garbage collector stops tracking a tuple of untracked values
    # (a list it tracks for ever), and profiles hold many of these.
    lines: tuple[Line, ...]
    remove_all: bool = False

    @property
    def stamp(self) -> Stamp:
        return (self.at, self.message_id)


class CartState(msgspec.Struct, gc=False, kw_only=True):
    cart_id: str
    ops: list[CartOp] = []
    # Operations at or before this time no longer count (an order closed the
    # cart). A time, not a stamp: an item added in the same instant as the
    # order (clients send millisecond timestamps) belongs to that order.
    cleared_through: datetime | None = None
    updated_at: datetime | None = None


class Viewed(msgspec.Struct, gc=False, kw_only=True):
    line: Line
    viewed_at: datetime


class OrderState(msgspec.Struct, gc=False, kw_only=True):
    order_id: str
    total: float | None = None
    currency: str = ""
    product_ids: list[str] = []
    completed: Stamp | None = None
    refunded: Stamp | None = None
    refunded_total: float | None = None


class Profile(msgspec.Struct, gc=False, kw_only=True):
    user_id: str = ""
    anonymous_id: str = ""
    traits: dict[str, Stamped] = {}
    extra_traits: dict[str, Stamped] = {}
    consent: dict[str, Stamped] = {}
    carts: dict[str, CartState] = {}
    # An order that names no cart closes every cart it came after.
    all_carts_cleared_through: datetime | None = None
    viewed: dict[str, Viewed] = {}
    orders: dict[str, OrderState] = {}
    first_seen_at: datetime | None = None
    last_activity_at: datetime | None = None
    event_count: int = 0


_TRAIT_FIELDS: Final = ("email", "first_name", "last_name", "locale", "timezone")


def fold(profile: Profile, event: Event) -> None:
    """Apply ``event`` to ``profile`` in place. Deterministic and commutative
    across events (within the bounds above)."""
    stamp: Stamp = (event.timestamp, event.message_id)
    profile.user_id = profile.user_id or event.identity.user_id
    profile.anonymous_id = profile.anonymous_id or event.identity.anonymous_id
    profile.event_count += 1
    at = event.timestamp
    if profile.first_seen_at is None or at < profile.first_seen_at:
        profile.first_seen_at = at
    if profile.last_activity_at is None or at > profile.last_activity_at:
        profile.last_activity_at = at

    payload = event.payload
    if event.kind is EventKind.IDENTIFY and isinstance(payload, TraitsUpdate):
        _fold_traits(profile, payload, stamp)
    elif event.kind is not EventKind.TRACK or payload is None:
        return
    elif isinstance(payload, CartChange):
        op: Literal["add", "remove"] = "add" if event.name == "Product Added" else "remove"
        quantity = payload.quantity if payload.quantity is not None else (1 if op == "add" else 0)
        line = _line(payload, quantity=quantity, currency=payload.currency)
        cart = _cart(profile, payload.cart_id)
        cart_op = CartOp(at, event.message_id, op, (line,), remove_all=payload.quantity is None)
        _add_cart_op(cart, cart_op, profile.all_carts_cleared_through)
    elif isinstance(payload, CartSnapshot):
        lines = tuple(_line(p, quantity=p.quantity or 1, currency=payload.currency) for p in payload.products)
        cart_op = CartOp(at, event.message_id, "set", lines)
        _add_cart_op(_cart(profile, payload.cart_id), cart_op, profile.all_carts_cleared_through)
    elif isinstance(payload, OrderCompleted):
        _fold_order_completed(profile, payload, stamp)
    elif isinstance(payload, OrderRefunded):
        order = profile.orders.setdefault(str(payload.order_id), OrderState(order_id=str(payload.order_id)))
        if order.refunded is None or stamp > order.refunded:
            order.refunded = stamp
            order.refunded_total = payload.total
        _trim_orders(profile)
    elif isinstance(payload, ProductViewed):
        _fold_viewed(profile, [payload], at, payload.currency)
    elif isinstance(payload, ProductListViewed):
        pass  # a list view says little about intent; stored, not folded


def _fold_traits(profile: Profile, traits: TraitsUpdate, stamp: Stamp) -> None:
    for name in _TRAIT_FIELDS:
        value = getattr(traits, name)
        if value is not None:
            _set_register(profile.traits, name, value, stamp)
    for group, state in traits.consent.items():
        _set_register(profile.consent, group, str(state), stamp)
    for name, value in traits.extra.items():
        _set_register(profile.extra_traits, name, value, stamp)


def _set_register(registers: dict[str, Stamped], key: str, value: Any, stamp: Stamp) -> None:
    current = registers.get(key)
    if current is None or stamp > current.stamp:
        registers[key] = Stamped(value, stamp[0], stamp[1])


def _line(product: ProductFields, *, quantity: int, currency: str | None) -> Line:
    return Line(
        product_id=product_key(product),
        sku=str(product.sku) if product.sku is not None else "",
        name=product.name or "",
        price=product.price,
        currency=(currency or "").upper(),
        quantity=quantity,
        url=product.url or "",
        image_url=product.image_url or "",
        category=product.category or "",
    )


def _cart(profile: Profile, cart_id: str | int | None) -> CartState:
    key = str(cart_id) if cart_id is not None else DEFAULT_CART
    cart = profile.carts.get(key)
    if cart is None:
        if len(profile.carts) >= MAX_CARTS:
            oldest = min(profile.carts.values(), key=lambda c: (c.updated_at is not None, c.updated_at))
            del profile.carts[oldest.cart_id]
        cart = profile.carts[key] = CartState(cart_id=key)
    return cart


def _add_cart_op(cart: CartState, op: CartOp, all_cleared_through: datetime | None) -> None:
    if cart.updated_at is None or op.at > cart.updated_at:
        cart.updated_at = op.at
    cleared = _latest(cart.cleared_through, all_cleared_through)
    if cleared is not None and op.at <= cleared:
        return  # a late operation on a cart an order already closed: it never counts
    cart.ops.append(op)
    if len(cart.ops) > MAX_CART_OPS:
        # Collapse the older half into one "set": bounded memory, at the price
        # that an event older than the collapse point, arriving later still,
        # is applied after it rather than in its place.
        cart.ops.sort(key=lambda o: o.stamp)
        keep = MAX_CART_OPS // 2
        old, recent = cart.ops[:-keep], cart.ops[-keep:]
        last = old[-1]
        cart.ops = [CartOp(last.at, last.message_id, "set", tuple(_replay(old, None))), *recent]


def _fold_order_completed(profile: Profile, order: OrderCompleted, stamp: Stamp) -> None:
    order_id = str(order.order_id)
    state = profile.orders.setdefault(order_id, OrderState(order_id=order_id))
    if state.completed is None or stamp > state.completed:
        state.completed = stamp
        state.total = order.total if order.total is not None else order.revenue
        state.currency = (order.currency or "").upper()
        state.product_ids = [product_key(p) for p in order.products]
    at = stamp[0]
    if order.cart_id is not None:
        cart = _cart(profile, order.cart_id)
        if cart.cleared_through is None or at > cart.cleared_through:
            cart.cleared_through = at
            _drop_cleared_ops(cart, at)
    elif profile.all_carts_cleared_through is None or at > profile.all_carts_cleared_through:
        profile.all_carts_cleared_through = at
        for cart in profile.carts.values():
            _drop_cleared_ops(cart, at)
    _trim_orders(profile)


def _drop_cleared_ops(cart: CartState, cleared_through: datetime) -> None:
    """Forget the operations an order closed: the clear mark alone keeps them
    from counting (and keeps late ones out), and a profile whose user orders
    often would otherwise carry every closed cart's history up to the bounds."""
    if any(op.at <= cleared_through for op in cart.ops):
        cart.ops = [op for op in cart.ops if op.at > cleared_through]


def _trim_orders(profile: Profile) -> None:
    if len(profile.orders) > MAX_ORDERS:
        newest = sorted(profile.orders.values(), key=_order_sort_key, reverse=True)[:MAX_ORDERS]
        profile.orders = {o.order_id: o for o in newest}


def _order_sort_key(order: OrderState) -> Stamp:
    stamp = order.completed or order.refunded
    assert stamp is not None  # every stored order was completed or refunded
    return stamp


def _fold_viewed(profile: Profile, products: list[ProductViewed], at: datetime, currency: str | None) -> None:
    for product in products:
        line = _line(product, quantity=0, currency=currency)
        current = profile.viewed.get(line.product_id)
        if current is None or at > current.viewed_at:
            profile.viewed[line.product_id] = Viewed(line=line, viewed_at=at)
    if len(profile.viewed) > MAX_VIEWED:
        newest = sorted(profile.viewed.values(), key=lambda v: (v.viewed_at, v.line.product_id))
        profile.viewed = {v.line.product_id: v for v in newest[-MAX_VIEWED:]}


def _replay(ops: list[CartOp], cleared_through: datetime | None) -> list[Line]:
    """The cart's lines: its operations after the clear mark, in event-time order."""
    lines: dict[str, Line] = {}
    for op in sorted(ops, key=lambda o: o.stamp):
        if cleared_through is not None and op.at <= cleared_through:
            continue
        if op.op == "set":
            lines = {line.product_id: msgspec.structs.replace(line) for line in op.lines}
            continue
        change = op.lines[0]
        current = lines.get(change.product_id)
        if op.op == "add":
            if current is None:
                lines[change.product_id] = msgspec.structs.replace(change)
            else:
                # details (name, price, ...) from the latest add win
                quantity = current.quantity + change.quantity
                lines[change.product_id] = msgspec.structs.replace(change, quantity=quantity)
        elif current is not None:
            current.quantity = 0 if op.remove_all else current.quantity - change.quantity
        lines = {key: line for key, line in lines.items() if line.quantity > 0}
    return list(lines.values())


# --------------------------------------------------------------------------
# One person, several ids


def merge(into: Profile, other: Profile) -> None:
    """Fold everything ``other`` holds into ``into``, in place: the profile of
    one person known under two ids (an anonymous id linked to a user id).

    Every part of a profile is a join of the events it saw (last-writer-wins
    registers, cart operations replayed by event time under a max clear mark,
    newest views, orders by id), so merging the profiles of two disjoint sets of
    events gives the profile of their union, whichever is merged into which and
    in whatever order several are merged (within the bounds above). The ids
    stay ``into``'s; ``other`` is left as it was.
    """
    into.user_id = into.user_id or other.user_id
    into.anonymous_id = into.anonymous_id or other.anonymous_id
    for mine, theirs in (
        (into.traits, other.traits),
        (into.extra_traits, other.extra_traits),
        (into.consent, other.consent),
    ):
        for key, register in theirs.items():
            _set_register(mine, key, register.value, register.stamp)
    into.all_carts_cleared_through = _latest(into.all_carts_cleared_through, other.all_carts_cleared_through)
    if into.all_carts_cleared_through is not None:
        for cart in into.carts.values():
            _drop_cleared_ops(cart, into.all_carts_cleared_through)
    for cart in other.carts.values():
        _merge_cart(_cart(into, cart.cart_id), cart, into.all_carts_cleared_through)
    for seen in other.viewed.values():
        current = into.viewed.get(seen.line.product_id)
        if current is None or seen.viewed_at > current.viewed_at:
            into.viewed[seen.line.product_id] = Viewed(line=seen.line, viewed_at=seen.viewed_at)
    if len(into.viewed) > MAX_VIEWED:
        newest = sorted(into.viewed.values(), key=lambda v: (v.viewed_at, v.line.product_id))
        into.viewed = {v.line.product_id: v for v in newest[-MAX_VIEWED:]}
    for order in other.orders.values():
        _merge_order(into.orders.setdefault(order.order_id, OrderState(order_id=order.order_id)), order)
    _trim_orders(into)
    into.first_seen_at = _earliest(into.first_seen_at, other.first_seen_at)
    into.last_activity_at = _latest(into.last_activity_at, other.last_activity_at)
    into.event_count += other.event_count


def restrict(profile: Profile, since: datetime | None, until: datetime | None) -> Profile:
    """What ``profile`` holds of the events from ``since`` (included) until
    ``until`` (excluded): the part of a shared device's anonymous profile
    that was one person's (domain.identity.Identities.spans). A new profile;
    ``profile`` is left as it was. Its event count is unknown and left at 0:
    the fold keeps no per-event record to count."""

    def inside(moment: datetime | None) -> bool:
        return moment is not None and (since is None or moment >= since) and (until is None or moment < until)

    part = Profile(user_id=profile.user_id, anonymous_id=profile.anonymous_id)
    for mine, theirs in (
        (part.traits, profile.traits),
        (part.extra_traits, profile.extra_traits),
        (part.consent, profile.consent),
    ):
        mine.update((key, register) for key, register in theirs.items() if inside(register.at))
    if inside(profile.all_carts_cleared_through):
        part.all_carts_cleared_through = profile.all_carts_cleared_through
    for cart in profile.carts.values():
        ops = [op for op in cart.ops if inside(op.at)]
        cleared = cart.cleared_through if inside(cart.cleared_through) else None
        if ops or cleared is not None:
            part.carts[cart.cart_id] = CartState(
                cart_id=cart.cart_id,
                ops=ops,
                cleared_through=cleared,
                updated_at=max((op.at for op in ops), default=cleared),
            )
    part.viewed = {key: seen for key, seen in profile.viewed.items() if inside(seen.viewed_at)}
    part.orders = {
        key: order
        for key, order in profile.orders.items()
        if inside(order.completed[0] if order.completed else None)
        or inside(order.refunded[0] if order.refunded else None)
    }
    moments = [
        *(register.at for register in (*part.traits.values(), *part.consent.values())),
        *(op.at for cart in part.carts.values() for op in cart.ops),
        *(seen.viewed_at for seen in part.viewed.values()),
        *(stamp[0] for order in part.orders.values() for stamp in (order.completed, order.refunded) if stamp),
    ]
    part.first_seen_at = min(moments, default=None)
    part.last_activity_at = max(moments, default=None)
    return part


def _merge_cart(into: CartState, other: CartState, all_cleared_through: datetime | None) -> None:
    into.cleared_through = _latest(into.cleared_through, other.cleared_through)
    # other's closed operations are gone, but they still date the cart
    into.updated_at = _latest(into.updated_at, other.updated_at)
    if into.cleared_through is not None:
        _drop_cleared_ops(into, into.cleared_through)
    known = {(op.at, op.message_id) for op in into.ops}
    for op in other.ops:
        if (op.at, op.message_id) not in known:
            _add_cart_op(into, op, all_cleared_through)


def _merge_order(into: OrderState, other: OrderState) -> None:
    if other.completed is not None and (into.completed is None or other.completed > into.completed):
        into.completed = other.completed
        into.total, into.currency, into.product_ids = other.total, other.currency, list(other.product_ids)
    if other.refunded is not None and (into.refunded is None or other.refunded > into.refunded):
        into.refunded, into.refunded_total = other.refunded, other.refunded_total


def _latest(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None or (b is not None and b > a) else a


def _earliest(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None or (b is not None and b < a) else a


# --------------------------------------------------------------------------
# What callers see


class CartView(msgspec.Struct, kw_only=True):
    cart_id: str
    lines: list[Line]
    updated_at: datetime | None


class OrderView(msgspec.Struct, kw_only=True):
    order_id: str
    total: float | None
    currency: str
    product_ids: list[str]
    completed_at: datetime | None
    refunded_at: datetime | None
    refunded_total: float | None


class ViewedView(msgspec.Struct, kw_only=True):
    product: Line
    viewed_at: datetime


class ProfileView(msgspec.Struct, kw_only=True):
    user_id: str
    anonymous_id: str
    traits: dict[str, Any]
    extra_traits: dict[str, Any]
    consent: dict[str, str]
    carts: list[CartView]
    recently_viewed: list[ViewedView]
    orders: list[OrderView]
    first_seen_at: datetime | None
    last_activity_at: datetime | None
    event_count: int
    #: The person's ids other than the one asked for (profiles.Person).
    linked_user_ids: list[str] = []
    linked_anonymous_ids: list[str] = []


def open_carts(profile: Profile) -> list[CartView]:
    """The carts with lines in them, the most recently updated first."""
    carts = []
    for cart in profile.carts.values():
        clears = [s for s in (cart.cleared_through, profile.all_carts_cleared_through) if s is not None]
        lines = _replay(cart.ops, max(clears) if clears else None)
        if lines:
            carts.append(CartView(cart_id=cart.cart_id, lines=lines, updated_at=cart.updated_at))
    carts.sort(key=lambda c: (c.updated_at is not None, c.updated_at), reverse=True)
    return carts


def view(profile: Profile) -> ProfileView:
    carts = open_carts(profile)
    orders = sorted(profile.orders.values(), key=_order_sort_key, reverse=True)
    viewed = sorted(profile.viewed.values(), key=lambda v: v.viewed_at, reverse=True)
    return ProfileView(
        user_id=profile.user_id,
        anonymous_id=profile.anonymous_id,
        traits={k: v.value for k, v in profile.traits.items()},
        extra_traits={k: v.value for k, v in profile.extra_traits.items()},
        consent={k: str(v.value) for k, v in profile.consent.items()},
        carts=carts,
        recently_viewed=[ViewedView(product=v.line, viewed_at=v.viewed_at) for v in viewed],
        orders=[
            OrderView(
                order_id=o.order_id,
                total=o.total,
                currency=o.currency,
                product_ids=o.product_ids,
                completed_at=o.completed[0] if o.completed else None,
                refunded_at=o.refunded[0] if o.refunded else None,
                refunded_total=o.refunded_total,
            )
            for o in orders
        ],
        first_seen_at=profile.first_seen_at,
        last_activity_at=profile.last_activity_at,
        event_count=profile.event_count,
    )
