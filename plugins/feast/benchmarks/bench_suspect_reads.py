"""What checking the markers on a read that finds none of its keys costs (fraud SQLite store).

A read none of whose keys has a row of a checked view (new cards, or a store that has just
lost its rows) is held until a marker check has answered, unless a check started less than
``suspect_check_interval_s`` (100 ms) ago. Measured here, on a copy of the recipe's store,
in one process (as the server runs the source):

- the check itself: wall and thread CPU per :class:`MarkerCheck` call, in its thread;
- one fetch of a new card (cache off), held for a check every time (interval 0) against not
  held (a check just ran, interval long), interleaved in rounds: the latency a held read adds;
- one fetch of a known card (cache off), and the ``_suspect`` test on its row alone: what a
  read that finds its keys pays for the test (nothing else changes for it);
- back-to-back fetches of new cards for a few seconds at the default interval: the checks
  they started per second (the rate limit's bound).

    uv run python plugins/feast/benchmarks/bench_suspect_reads.py [--calls 2000] [--rounds 5]

Needs the recipe's built store (``recipes/fraud/feature_repo/data``), as
``bench_marker_check.py`` does; works on a copy of it.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from infercore.components import ComponentContext
from infercore.config.validation import convert
from infercore_feast import FeastFeatureSource, FeastSourceConfig

RECIPE = Path(__file__).resolve().parents[3] / "recipes" / "fraud"
FEATURES = ["txn_count_1h", "txn_count_24h", "amount_avg_7d", "txn_count_7d", "amount_sum_24h"]


class Counting:
    """The source's marker check, counted."""

    def __init__(self, check: Any) -> None:
        self.check, self.calls = check, 0

    def __call__(self) -> Any:
        self.calls += 1
        return self.check()


async def fetch_us(source: FeastFeatureSource, keys: list[str]) -> float:
    """Median wall microseconds of one fetch per key (one key each, in turn)."""
    loop = asyncio.get_running_loop()
    times = []
    for key in keys:
        fields = {"card_id": np.array([key])}
        t0 = time.perf_counter()
        await source.fetch(fields, deadline=loop.time() + 10)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


async def main(calls: int, rounds: int) -> None:
    data = RECIPE / "feature_repo" / "data"
    if not (data / "online_store.db").exists():
        sys.exit(f"build the fraud store first: {data / 'online_store.db'} is missing")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "models"
        shutil.copytree(RECIPE / "feature_repo", root / "fraud" / "feature_repo")
        node = {
            "repo": "fraud/feature_repo",
            "project": "fraud",
            "entity": {"field": "card_id", "join_key": "card_id"},
            "inputs": [
                {
                    "name": f,
                    "source": "feast",
                    "feature": f"card_features:{f}",
                    "datatype": "FP32",
                    "default": 0,
                }
                for f in FEATURES
            ],
            "materialize_on_start": False,
            "empty_check_s": 3600,  # the watcher stays asleep
            "cache_ttl_s": 0,
            "timeout_ms": 1000,
        }
        cfg = convert(node, FeastSourceConfig, path="features")
        source = FeastFeatureSource(cfg, ComponentContext("features", root, model_name="fraud"))
        await source.start()
        try:
            assert source._check is not None, "no markers: is the store built?"
            check = Counting(source._check)
            source._check = check  # type: ignore[assignment]
            known = [str(k) for k in source.markers["card_features"]]

            # The check alone, in one thread, as the source's check thread runs it.
            wall, cpu = [], []
            for _ in range(rounds):
                w0, c0 = time.perf_counter(), time.thread_time()
                for _ in range(calls):
                    check.check()
                wall.append((time.perf_counter() - w0) / calls * 1e6)
                cpu.append((time.thread_time() - c0) / calls * 1e6)
            print(
                f"marker check: {statistics.median(wall):.0f} us wall "
                f"({min(wall):.0f}-{max(wall):.0f}), {statistics.median(cpu):.0f} us CPU"
            )

            # A new card's fetch, held for a check each time, or not held.
            held, free = [], []
            n = max(calls // 4, 50)
            for r in range(rounds):
                keys = [f"c_new_{r}_{i}" for i in range(n)]
                source.suspect_check_interval_s = 0.0
                c0 = check.calls
                held.append(await fetch_us(source, keys))
                assert check.calls - c0 == n, "every read held for a check"
                source.suspect_check_interval_s = 3600.0
                await source.check_rows()
                c0 = check.calls
                free.append(await fetch_us(source, [k + "_b" for k in keys]))
                assert check.calls == c0, "no read held"
            print(
                f"fetch of a new card: held {statistics.median(held):.0f} us "
                f"({min(held):.0f}-{max(held):.0f}), not held {statistics.median(free):.0f} us "
                f"({min(free):.0f}-{max(free):.0f})"
            )

            # A known card: the fetch, and the test on its row alone.
            fetch_known = [await fetch_us(source, known * (n // len(known))) for _ in range(rounds)]
            row = source._prepare(source.reader([known[0]])[0])  # type: ignore[misc]
            rows = [row]
            t0 = time.perf_counter()
            for _ in range(100_000):
                source._suspect(rows)
            test_ns = (time.perf_counter() - t0) / 100_000 * 1e9
            print(
                f"fetch of a known card: {statistics.median(fetch_known):.0f} us; the test on "
                f"its row: {test_ns:.0f} ns"
            )

            # A stream of new cards at the default interval.
            source.suspect_check_interval_s = 0.1
            loop = asyncio.get_running_loop()
            await asyncio.sleep(0.2)
            c0, t0, i = check.calls, loop.time(), 0
            while loop.time() - t0 < 3.0:
                await source.fetch({"card_id": np.array([f"c_stream_{i}"])}, deadline=t0 + 60)
                i += 1
            elapsed = loop.time() - t0
            print(
                f"stream of new cards: {i / elapsed:,.0f} fetches/s, "
                f"{(check.calls - c0) / elapsed:.1f} checks/s"
            )
        finally:
            await source.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.calls, args.rounds))
