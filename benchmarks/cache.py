"""Benchmark: the cache's hot-path get against the raw Rust store and aiocache.

What it measures, in one process and one run, each as nanoseconds per call
over --rounds passes of 1,000 distinct keys (all hits, values shaped like
content blocks), repeated --repeats times with the variants interleaved in
every repeat, median reported, the garbage collector off while timing (as
timeit does):

1. get: ``MemoryCache.lookup(key, now)`` on a fresh hit, the synchronous hot
   path the content pipeline calls on the event loop. ``now`` is read once
   per batch of lookups, as the pipeline does once per request: on this kind
   of machine a clock read costs about as much as the Rust get itself.
2. get_own_clock: ``MemoryCache.lookup(key)``, reading the clock on every
   call (shown for honesty; not the pipeline's path).
3. raw_get: ``cachebox.LRUCache.get(key)`` on the very store underneath.
4. aiocache_get: ``await SimpleMemoryCache().get(key)`` with aiocache's
   defaults (a 5 s timeout, so asyncio.wait_for on every call), inside a
   running uvloop loop.
5. backend_get: ``await RustCacheBackend(store).get(key)``, the aiocache
   backend over the same MemoryCache, in the same loop (for information).
6. For context: dict.get, time.monotonic(), an empty loop, and put (overwrite).

With --compare-stores it also times moka-py (when installed) next to cachebox:
get, overwrite, and insert-with-eviction, the measurements behind the choice
of store (see sendtime/server/cache/_memory.py).

    python -m benchmarks.cache [--json] [--repeats N] [--rounds N] [--compare-stores]

Progress goes to stderr. With --json the last stdout line is one JSON object
with get_ns, raw_get_ns, aiocache_get_ns, overhead_ratio (= get_ns /
raw_get_ns), speedup_vs_aiocache (= aiocache_get_ns / get_ns), the figures
above, the targets and whether they were met. The machine is small and shared:
compare the ratios, not absolute times, across runs (GUIDE.md section 5).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import platform
import statistics
import sys
import time
from collections.abc import Callable, Coroutine
from importlib import metadata
from typing import Any, Final

import aiocache
import cachebox
import msgspec
import uvloop

from benchmarks.harness import report
from sendtime.server.cache import MemoryCache, RustCacheBackend

TARGETS: Final = {"overhead_ratio_max": 3.0, "speedup_vs_aiocache_min": 20.0}
KEYS: Final = [f"block|u:{i}|spring-sale|" for i in range(1000)]


def _block(i: int) -> dict[str, Any]:
    return {
        "items": [
            {"id": f"sku-{i}-{n}", "name": "Trail shoe", "price": 89.0, "currency": "EUR", "stock": 3}
            for n in range(3)
        ],
        "total": 267.0,
    }


def _log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _timed(loop_body: Callable[[], None], calls: int) -> float:
    """ns per call of one timed run, the collector off."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        started = time.perf_counter_ns()
        loop_body()
        return (time.perf_counter_ns() - started) / calls
    finally:
        if gc_was_enabled:
            gc.enable()


def _calls_1(fn: Callable[[str], object], rounds: int) -> Callable[[], None]:
    def body() -> None:
        for _ in range(rounds):
            for key in KEYS:
                fn(key)

    return body


def _calls_2(fn: Callable[[str, float], object], now: float, rounds: int) -> Callable[[], None]:
    def body() -> None:
        for _ in range(rounds):
            for key in KEYS:
                fn(key, now)

    return body


def _calls_0(fn: Callable[[], object], rounds: int) -> Callable[[], None]:
    def body() -> None:
        for _ in range(rounds):
            for _key in KEYS:
                fn()

    return body


def _empty_loop(rounds: int) -> Callable[[], None]:
    def body() -> None:
        for _ in range(rounds):
            for _key in KEYS:
                pass

    return body


def _calls_async(
    get: Callable[[str], Coroutine[Any, Any, object]], rounds: int
) -> Callable[[], Coroutine[Any, Any, None]]:
    async def body() -> None:
        for _ in range(rounds):
            for key in KEYS:
                await get(key)

    return body


def run(args: argparse.Namespace) -> dict[str, Any]:
    cache: MemoryCache[dict[str, Any]] = MemoryCache(max_bytes=256 * 1024 * 1024)
    values = [_block(i) for i in range(len(KEYS))]
    encoded = msgspec.json.Encoder()
    for key, value in zip(KEYS, values, strict=True):
        cache.put(
            key, value, ttl=3600, stale_ttl=3600, size=len(encoded.encode(value)), tags=[key.split("|")[1]]
        )
    store = cache.store
    plain = dict(zip(KEYS, values, strict=True))
    assert all(cache.lookup(key) is not None for key in KEYS)

    rounds: int = args.rounds
    calls = rounds * len(KEYS)
    async_rounds = max(1, rounds // 10)
    async_calls = async_rounds * len(KEYS)
    sync_variants: dict[str, Callable[[], None]] = {
        "raw_get_ns": _calls_1(store.get, rounds),
        "get_ns": _calls_2(cache.lookup, cache.now(), rounds),
        "get_own_clock_ns": _calls_1(cache.lookup, rounds),
        "dict_get_ns": _calls_1(plain.get, rounds),
        "clock_ns": _calls_0(time.monotonic, rounds),
        "loop_ns": _empty_loop(rounds),
    }
    samples: dict[str, list[float]] = {name: [] for name in sync_variants}
    samples["aiocache_get_ns"] = []
    samples["backend_get_ns"] = []
    samples["put_ns"] = []

    simple = aiocache.SimpleMemoryCache()  # aiocache's defaults: timeout=5, NullSerializer
    backend = RustCacheBackend(cache)

    async def fill_simple() -> None:
        for key, value in zip(KEYS, values, strict=True):
            await simple.set(key, value)
        assert await simple.get(KEYS[0]) is values[0]
        assert await backend.get(KEYS[0]) is values[0]

    async def time_async(get: Callable[[str], Coroutine[Any, Any, object]]) -> float:
        body = _calls_async(get, async_rounds)
        gc.disable()
        try:
            started = time.perf_counter_ns()
            await body()
            return (time.perf_counter_ns() - started) / async_calls
        finally:
            gc.enable()

    def put_round() -> None:
        put = cache.put
        for key, value in zip(KEYS, values, strict=True):
            put(key, value, ttl=3600, stale_ttl=3600, size=500)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(fill_simple())
        for repeat in range(args.repeats):
            for name, body in sync_variants.items():
                samples[name].append(_timed(body, calls))
            samples["aiocache_get_ns"].append(runner.run(time_async(simple.get)))
            samples["backend_get_ns"].append(runner.run(time_async(backend.get)))
            samples["put_ns"].append(_timed(put_round, len(KEYS)))
            _log(
                f"repeat {repeat + 1}/{args.repeats}: "
                + ", ".join(f"{name}={values_[-1]:.0f}" for name, values_ in samples.items())
            )

    medians = {name: statistics.median(values_) for name, values_ in samples.items()}
    get_ns = medians["get_ns"]
    raw_get_ns = medians["raw_get_ns"]
    aiocache_get_ns = medians["aiocache_get_ns"]
    result: dict[str, Any] = {
        "get_ns": round(get_ns, 1),
        "raw_get_ns": round(raw_get_ns, 1),
        "aiocache_get_ns": round(aiocache_get_ns, 1),
        "overhead_ratio": round(get_ns / raw_get_ns, 2),
        "speedup_vs_aiocache": round(aiocache_get_ns / get_ns, 1),
        "get_own_clock_ns": round(medians["get_own_clock_ns"], 1),
        "overhead_ratio_own_clock": round(medians["get_own_clock_ns"] / raw_get_ns, 2),
        "speedup_vs_aiocache_own_clock": round(aiocache_get_ns / medians["get_own_clock_ns"], 1),
        "backend_get_ns": round(medians["backend_get_ns"], 1),
        "dict_get_ns": round(medians["dict_get_ns"], 1),
        "clock_ns": round(medians["clock_ns"], 1),
        "loop_ns": round(medians["loop_ns"], 1),
        "put_ns": round(medians["put_ns"], 1),
        "samples": {name: [round(v, 1) for v in values_] for name, values_ in samples.items()},
        "calls_per_sample": calls,
        "async_calls_per_sample": async_calls,
        "repeats": args.repeats,
        "store": f"cachebox {cachebox.__version__} LRUCache",
        "aiocache": metadata.version("aiocache"),
        "loop": f"uvloop {metadata.version('uvloop')}",
        "python": platform.python_version(),
        "targets": TARGETS,
    }
    result["meets_targets"] = (
        result["overhead_ratio"] <= TARGETS["overhead_ratio_max"]
        and result["speedup_vs_aiocache"] >= TARGETS["speedup_vs_aiocache_min"]
    )
    if args.compare_stores:
        result["stores"] = compare_stores(args.repeats)
    return result


def compare_stores(repeats: int) -> dict[str, dict[str, float]]:
    """get / overwrite / insert-new-with-eviction in ns, cachebox vs moka-py."""
    moka_py: Any = None
    try:
        moka_py = importlib.import_module("moka_py")  # optional: only for this comparison
    except ImportError:
        _log("moka-py is not installed: comparing cachebox alone")
    value = object()
    new_keys = [f"new-{i}" for i in range(100_000)]

    def weigh(_key: object, _value: object) -> int:
        return 100

    makers: dict[str, Callable[[], Any]] = {
        "cachebox.LRUCache": lambda: cachebox.LRUCache(len(KEYS)),
        "cachebox.LRUCache+getsizeof": lambda: cachebox.LRUCache(len(KEYS) * 100, getsizeof=weigh),
    }
    if moka_py is not None:
        makers["moka_py.Moka lru"] = lambda: moka_py.Moka(len(KEYS), policy="lru")
        makers["moka_py.Moka tiny_lfu"] = lambda: moka_py.Moka(len(KEYS))
        makers["moka_py.Moka lru+weigher"] = lambda: moka_py.Moka(
            len(KEYS) * 100, policy="lru", weigher=weigh
        )
    figures: dict[str, dict[str, list[float]]] = {
        name: {"get": [], "set": [], "insert_evict": []} for name in makers
    }
    for _ in range(repeats):
        for name, make in makers.items():
            store = make()
            put = store.insert if hasattr(store, "insert") else store.set
            for key in KEYS:
                put(key, value)
            figures[name]["get"].append(_timed(_calls_1(store.get, 100), 100 * len(KEYS)))

            def overwrite(put: Callable[[str, object], object] = put) -> None:
                for _ in range(20):
                    for key in KEYS:
                        put(key, value)

            figures[name]["set"].append(_timed(overwrite, 20 * len(KEYS)))

            def insert_new(put: Callable[[str, object], object] = put) -> None:
                for key in new_keys:
                    put(key, value)

            figures[name]["insert_evict"].append(_timed(insert_new, len(new_keys)))
    return {
        name: {f"{op}_ns": round(statistics.median(v), 1) for op, v in ops.items()}
        for name, ops in figures.items()
    }


def summary(result: dict[str, Any]) -> str:
    lines = [
        f"hot-path get (lookup, now given) {result['get_ns']:8.1f} ns",
        f"hot-path get (own clock read)    {result['get_own_clock_ns']:8.1f} ns",
        f"raw cachebox get                 {result['raw_get_ns']:8.1f} ns",
        f"aiocache SimpleMemoryCache.get   {result['aiocache_get_ns']:8.1f} ns",
        f"RustCacheBackend.get (aiocache)  {result['backend_get_ns']:8.1f} ns",
        f"dict.get                         {result['dict_get_ns']:8.1f} ns",
        f"time.monotonic()                 {result['clock_ns']:8.1f} ns",
        f"put (overwrite)                  {result['put_ns']:8.1f} ns",
        f"overhead_ratio {result['overhead_ratio']} (own clock {result['overhead_ratio_own_clock']}), "
        f"speedup_vs_aiocache {result['speedup_vs_aiocache']} (own clock {result['speedup_vs_aiocache_own_clock']}), "
        f"meets targets: {result['meets_targets']}",
    ]
    for name, figures in result.get("stores", {}).items():
        lines.append(f"{name:30s} " + "  ".join(f"{op} {ns:7.1f}" for op, ns in figures.items()))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.cache",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved repeats; medians are reported")
    parser.add_argument("--rounds", type=int, default=300, help="passes over the 1,000 keys per sync sample")
    parser.add_argument("--compare-stores", action="store_true", help="also time moka-py against cachebox")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return report(run(args), summary, as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
