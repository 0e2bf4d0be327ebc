"""RustCacheBackend through aiocache's public API (aiocache.base.BaseCache),
with ttls on the injected clock."""

from __future__ import annotations

import aiocache
import pytest
from aiocache.lock import OptimisticLock, OptimisticLockError, RedLock

from sendtime.server.cache import MemoryCache, RustCacheBackend


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> MemoryCache[object]:
    return MemoryCache(max_bytes=1_000_000, clock=clock)


@pytest.fixture
def backend(store: MemoryCache[object]) -> RustCacheBackend:
    return RustCacheBackend(store)


def test_it_is_an_aiocache_backend(backend: RustCacheBackend) -> None:
    assert isinstance(backend, aiocache.BaseCache)
    assert backend.timeout is None


async def test_get_set_round_trip(backend: RustCacheBackend) -> None:
    value = {"items": [{"sku": "A1", "qty": 2}]}
    assert await backend.set("cart", value) is True
    assert await backend.get("cart") == value
    assert await backend.get("missing") is None
    assert await backend.get("missing", default="d") == "d"


async def test_set_with_ttl_expires_on_the_clock(backend: RustCacheBackend, clock: FakeClock) -> None:
    await backend.set("k", "v", ttl=5)
    clock.now += 4.9
    assert await backend.get("k") == "v"
    clock.now += 0.1
    assert await backend.get("k") is None
    assert not await backend.exists("k")


async def test_default_ttl_of_the_backend(store: MemoryCache[object], clock: FakeClock) -> None:
    backend = RustCacheBackend(store, ttl=2)
    await backend.set("k", "v")
    clock.now += 2
    assert await backend.get("k") is None


async def test_add_refuses_an_existing_key(backend: RustCacheBackend, clock: FakeClock) -> None:
    assert await backend.add("k", 1, ttl=1)
    with pytest.raises(ValueError, match="already exists"):
        await backend.add("k", 2)
    clock.now += 1
    assert await backend.add("k", 3)
    assert await backend.get("k") == 3


async def test_exists_and_delete(backend: RustCacheBackend) -> None:
    await backend.set("k", "v")
    assert await backend.exists("k")
    assert await backend.delete("k") == 1
    assert await backend.delete("k") == 0
    assert not await backend.exists("k")


async def test_increment(backend: RustCacheBackend, clock: FakeClock) -> None:
    assert await backend.increment("n") == 1
    assert await backend.increment("n", 5) == 6
    assert await backend.increment("n", -2) == 4
    await backend.set("s", "not a number")
    with pytest.raises(TypeError):
        await backend.increment("s")
    await backend.set("t", 10, ttl=5)
    clock.now += 3
    assert await backend.increment("t") == 11
    clock.now += 2  # the increment kept the original expiry
    assert await backend.get("t") is None


async def test_expire(backend: RustCacheBackend, clock: FakeClock) -> None:
    await backend.set("k", "v")
    assert await backend.expire("k", 3)
    clock.now += 3
    assert await backend.get("k") is None
    assert not await backend.expire("k", 3)
    await backend.set("k", "v", ttl=1)
    assert await backend.expire("k", 0)  # 0: no expiry any more
    clock.now += 1000
    assert await backend.get("k") == "v"


async def test_multi_get_and_multi_set(backend: RustCacheBackend, clock: FakeClock) -> None:
    assert await backend.multi_set([("a", 1), ("b", 2)], ttl=10)
    assert await backend.multi_get(["a", "missing", "b"]) == [1, None, 2]
    clock.now += 10
    assert await backend.multi_get(["a", "b"]) == [None, None]


async def test_namespaces_and_clear(store: MemoryCache[object]) -> None:
    blocks = RustCacheBackend(store, namespace="blocks:")
    other = RustCacheBackend(store, namespace="other:")
    await blocks.set("a", 1)
    await other.set("a", 2)
    assert store.peek("blocks:a") is not None
    assert await blocks.get("a") == 1
    assert await other.get("a") == 2

    assert await blocks.clear()  # only its own namespace
    assert await blocks.get("a") is None
    assert await other.get("a") == 2

    await RustCacheBackend(store).clear()
    assert len(store) == 0


async def test_shares_the_store_and_its_byte_bound(store: MemoryCache[object]) -> None:
    store.put("block:cart:u:1", {"items": []}, ttl=60, tags=["u:1"])
    backend = RustCacheBackend(store)
    assert await backend.get("block:cart:u:1") == {"items": []}
    await backend.set("big", "x" * 10_000)
    assert store.stats().size_bytes > 10_000
    assert await backend.raw("invalidate_tag", "u:1") == 1


async def test_stale_pipeline_entries_read_as_missing(store: MemoryCache[object], clock: FakeClock) -> None:
    store.put("k", "v", ttl=1, stale_ttl=100)
    clock.now += 2
    assert await RustCacheBackend(store).get("k") is None


async def test_own_store_and_close() -> None:
    async with RustCacheBackend(max_bytes=10_000) as backend:
        await backend.set("k", "v")
        assert await backend.get("k") == "v"
        assert backend.store.max_bytes == 10_000


async def test_aiocache_locks_work_on_it(backend: RustCacheBackend) -> None:
    async with RedLock(backend, "resource", lease=5):
        assert await backend.exists("resource-lock")
    assert not await backend.exists("resource-lock")

    await backend.set("doc", "v1")
    async with OptimisticLock(backend, "doc") as lock:
        await lock.cas("v2")
    assert await backend.get("doc") == "v2"
    async with OptimisticLock(backend, "doc") as lock:
        await backend.set("doc", "changed meanwhile")
        with pytest.raises(OptimisticLockError):
            await lock.cas("v3")
    assert await backend.get("doc") == "changed meanwhile"
