"""An aiocache backend over the Rust MemoryCache, so aiocache's API (and, later,
its multi-tier setups with the Redis backend as L2) works on sendtime's L1.

It implements the private methods aiocache 0.12's BaseCache delegates to
(_get, _gets, _multi_get, _set, _multi_set, _add, _exists, _increment,
_expire, _delete, _clear, _raw, _redlock_release), the way its
SimpleMemoryBackend does: values stored as given (NullSerializer by default),
a ttl of None or 0 meaning no expiry, a missing key reading as None. It can
share one MemoryCache with the content pipeline, which then bounds both by the
same byte budget; give it a namespace to keep its keys apart.

Differences from SimpleMemoryCache: the default operation timeout is None
rather than 5 s (every operation here completes without awaiting anything, and
aiocache's asyncio.wait_for costs more than the operation); values are subject
to the byte bound and LRU eviction; clear() with no namespace argument clears
only the backend's own namespace when it has one.

Speed: a get through aiocache's API costs about 4.5 us here (its decorators
read an environment variable, run plugin hooks and format a debug log line on
every call) against 13-14 us for SimpleMemoryCache with its defaults; the
content pipeline's hot path is MemoryCache.lookup, at about 150 ns.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from aiocache.base import BaseCache
from aiocache.serializers import NullSerializer

from sendtime.server.cache._memory import Freshness, MemoryCache

DEFAULT_MAX_BYTES = 64 * 1024 * 1024


def _ttl(ttl: float | None) -> float:
    return ttl if ttl else math.inf


class RustCacheBackend(BaseCache):  # type: ignore[misc]  # aiocache ships no type information
    """aiocache.BaseCache over a MemoryCache (a new one of ``max_bytes`` unless
    ``store`` is given). Other keyword arguments are BaseCache's: namespace,
    key_builder, ttl, plugins, serializer, timeout."""

    NAME = "sendtime-rust-memory"

    def __init__(
        self,
        store: MemoryCache[Any] | None = None,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        serializer: Any = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(serializer=serializer or NullSerializer(), timeout=timeout, **kwargs)
        self.store: MemoryCache[Any] = store if store is not None else MemoryCache(max_bytes=max_bytes)

    @classmethod
    def parse_uri_path(cls, path: str) -> dict[str, Any]:
        return {}

    def _fresh_value(self, key: str) -> Any:
        entry = self.store.lookup(key)
        if entry is None or entry.state is not Freshness.FRESH:
            return None
        return entry.value

    async def _get(self, key: str, encoding: str | None = "utf-8", _conn: Any = None) -> Any:
        return self._fresh_value(key)

    async def _gets(self, key: str, encoding: str | None = "utf-8", _conn: Any = None) -> Any:
        return self._fresh_value(key)

    async def _multi_get(
        self, keys: Iterable[str], encoding: str | None = "utf-8", _conn: Any = None
    ) -> list[Any]:
        return [self._fresh_value(key) for key in keys]

    async def _set(
        self, key: str, value: Any, ttl: float | None = None, _cas_token: Any = None, _conn: Any = None
    ) -> bool | int:
        if _cas_token is not None and _cas_token != self._peek_value(key):
            return 0
        return self.store.put(key, value, ttl=_ttl(ttl))

    async def _multi_set(
        self, pairs: Sequence[tuple[str, Any]], ttl: float | None = None, _conn: Any = None
    ) -> bool:
        for key, value in pairs:
            self.store.put(key, value, ttl=_ttl(ttl))
        return True

    async def _add(self, key: str, value: Any, ttl: float | None = None, _conn: Any = None) -> bool:
        if self._peek_value(key) is not None:
            raise ValueError(f"Key {key} already exists, use .set to update the value")
        self.store.put(key, value, ttl=_ttl(ttl))
        return True

    async def _exists(self, key: str, _conn: Any = None) -> bool:
        return self._peek_value(key) is not None

    async def _increment(self, key: str, delta: int, _conn: Any = None) -> int:
        store = self.store
        entry = store.peek(key)
        if entry is None or entry.state is not Freshness.FRESH:
            store.put(key, delta, ttl=math.inf)
            return delta
        try:
            value = int(entry.value) + delta
        except (TypeError, ValueError):
            raise TypeError("Value is not an integer") from None
        # Keep the key's expiry: the remaining ttl from now.
        store.put(key, value, ttl=max(0.0, entry.fresh_until - store.now()))
        return value

    async def _expire(self, key: str, ttl: float | None, _conn: Any = None) -> bool:
        if self._peek_value(key) is None:
            return False
        return self.store.set_ttl(key, _ttl(ttl))

    async def _delete(self, key: str, _conn: Any = None) -> int:
        return 1 if self.store.delete(key) else 0

    async def _clear(self, namespace: str | None = None, _conn: Any = None) -> bool:
        namespace = namespace or self.namespace
        if namespace:
            self.store.delete_prefix(namespace)
        else:
            self.store.clear()
        return True

    async def _raw(
        self, command: str, *args: Any, encoding: str | None = "utf-8", _conn: Any = None, **kwargs: Any
    ) -> Any:
        return getattr(self.store, command)(*args, **kwargs)

    async def _redlock_release(self, key: str, value: Any) -> int:
        if self._peek_value(key) == value:
            return 1 if self.store.delete(key) else 0
        return 0

    def _peek_value(self, key: str) -> Any:
        entry = self.store.peek(key)
        if entry is None or entry.state is not Freshness.FRESH:
            return None
        return entry.value
