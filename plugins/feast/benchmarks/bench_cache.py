"""The feature cache on its own: what an entry costs in memory, and the hit and put paths.

Memory: ``tracemalloc`` over a cache filled with ``--entries`` keys of ``--key-len``
characters, each with its own row shaped like the fraud recipe's (nine feast inputs, no
BYTES, none defaulted), and again with every key sharing one row (unknown entities): the
bytes per entry against what the cache counts (``TTLCache.nbytes``). Time: ``get`` of a live
key (the request path's hit), and ``put`` of new keys into a full cache (the miss path, after
a store read), each the median of ``--rounds`` rounds of ``timeit``.

    uv run python plugins/feast/benchmarks/bench_cache.py [--entries 100000] [--key-len 16]

Runs whatever ``infercore_feast.cache`` is importable: to compare with another version, put
its folder first on ``PYTHONPATH``. Numbers vary with the machine's load; compare runs made
one after the other.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import timeit
import tracemalloc
from typing import Any

from infercore_feast import cache as cache_module

TTLCache = cache_module.TTLCache

#: A fraud row as the source caches it: nine feast values, and no input defaulted.
FEATURES = 9


def row(i: int) -> tuple[tuple[Any, ...], tuple[int, ...]]:
    return tuple([float(i + j) + 0.5 for j in range(FEATURES)]), ()


def memory(entries: int, key_len: int, shared: bool) -> tuple[float, float]:
    """Bytes per entry measured, and counted by the cache (0 where it counts none)."""
    keys = [f"{i:0{key_len}d}" for i in range(entries)]
    one = row(0)
    values = [one if shared else row(i) for i in range(entries)]
    nbytes = 0 if shared else row_nbytes()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    cache = make(entries)
    for key, value in zip(keys, values, strict=True):
        if counts_bytes(cache):
            cache.put(key, value, nbytes)
        else:
            cache.put(key, value)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    used = sum(s.size_diff for s in after.compare_to(before, "filename"))
    del keys  # the cache keeps its own references to the keys: only what it adds is counted
    # The keys and rows were made before the first snapshot; add what they hold.
    key_bytes = sys.getsizeof("0" * key_len)
    value_bytes = 0 if shared else _row_bytes(values[0])
    counted = cache.nbytes / entries if counts_bytes(cache) else 0.0
    return (used / entries + key_bytes + value_bytes), counted


def make(entries: int) -> Any:
    """A cache of ``entries`` that no byte bound limits (and an older one, without it)."""
    try:
        return TTLCache(3600.0, entries, max_bytes=2**62)
    except TypeError:
        return TTLCache(3600.0, entries)


def counts_bytes(cache: Any) -> bool:
    return hasattr(type(cache), "nbytes")


def _row_bytes(value: tuple[tuple[Any, ...], tuple[int, ...]]) -> int:
    values, defaulted = value
    return (
        sys.getsizeof(value)
        + sys.getsizeof(values)
        + sum(sys.getsizeof(v) for v in values)
        + (sys.getsizeof(defaulted) if defaulted else 0)
    )


def row_nbytes() -> int:
    """What the source puts a numeric fraud row with (``FeastFeatureSource._row_nbytes``)."""
    try:
        from infercore_feast.source import row_nbytes_estimate
    except ImportError:
        return 0
    return int(row_nbytes_estimate(FEATURES))


def timings(entries: int, key_len: int, rounds: int, number: int) -> dict[str, float]:
    cache = make(entries)
    keys = [f"{i:0{key_len}d}" for i in range(entries)]
    value = row(0)
    for key in keys:
        cache.put(key, value)
    hit = keys[entries // 2]
    fresh = iter([f"n{i:0{key_len}d}" for i in range(rounds * number + 10)])
    get_ns, put_ns = [], []
    for _ in range(rounds):
        get_ns.append(timeit.timeit(lambda: cache.get(hit), number=number) / number * 1e9)
        put_ns.append(
            timeit.timeit(lambda: cache.put(next(fresh), value), number=number) / number * 1e9
        )
    return {
        "get (hit) ns": statistics.median(get_ns),
        "put (full cache) ns": statistics.median(put_ns),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--key-len", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--number", type=int, default=200_000)
    args = parser.parse_args()
    print(f"cache module: {cache_module.__file__}")
    for shared in (False, True):
        used, counted = memory(args.entries, args.key_len, shared)
        what = "one shared row (unknown entities)" if shared else "a row each (fraud, 9 inputs)"
        print(
            f"memory, {what}, {args.key_len}-char keys: {used:.0f} B/entry, counted {counted:.0f}"
        )
    for name, ns in timings(args.entries, args.key_len, args.rounds, args.number).items():
        print(f"{name}: {ns:.1f}")


if __name__ == "__main__":
    main()
