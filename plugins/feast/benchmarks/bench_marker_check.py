"""The empty-store check's cost on the fraud recipe's SQLite store, before and after.

Before: one ``get_online_features`` of a view's markers per view (the check up to the
per-view lost-view change). After: :class:`infercore_feast.store.MarkerCheck`, one
``online_read`` per view on an online store object resolved at start-up. Both run on the
same store, interleaved in rounds, in one thread (as the source's check thread runs them).

    uv run python plugins/feast/benchmarks/bench_marker_check.py [--calls 2000] [--rounds 10]

Needs the recipe's built store (``recipes/fraud/feature_repo/data``, from a first
``infercore serve +recipe=fraud`` or ``recipes/fraud/build.py``); works on a copy of it.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from infercore.components import ComponentContext
from infercore.config.validation import convert
from infercore_feast import FeastFeatureSource, FeastSourceConfig

RECIPE = Path(__file__).resolve().parents[3] / "recipes" / "fraud"
FEATURES = ["txn_count_1h", "txn_count_24h", "amount_avg_7d", "txn_count_7d", "amount_sum_24h"]


def before(store: Any, views: Mapping[str, Any], markers: Mapping[str, Sequence[Any]]) -> list[str]:
    """The check as it was: ``store.lost_views`` with ``present_keys`` (verbatim)."""
    lost = []
    for name, keys in markers.items():
        view = views[name]
        refs = [f"{view.name}:{f.name}" for f in view.features]
        join_key = view.entity_columns[0].name
        found = store.get_online_features(
            features=refs, entity_rows={join_key: list(keys)}, full_feature_names=True
        ).to_dict()
        columns = [values for n, values in found.items() if n != join_key]
        if not [key for i, key in enumerate(keys) if any(c[i] is not None for c in columns)]:
            lost.append(name)
    return lost


def timed(fn: Callable[[], Any], calls: int) -> tuple[float, float]:
    """Mean wall and thread-CPU microseconds per call."""
    w0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(calls):
        fn()
    return (
        (time.perf_counter() - w0) / calls * 1e6,
        (time.thread_time() - c0) / calls * 1e6,
    )


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
            "empty_check_s": 3600,  # the watcher stays asleep; the bench calls the check
        }
        cfg = convert(node, FeastSourceConfig, path="features")
        source = FeastFeatureSource(cfg, ComponentContext("features", root, model_name="fraud"))
        await source.start()
        try:
            check = source._check
            assert check is not None, "no markers: is the store built?"
            store, views, markers = source.store, source._views, source.markers
            assert before(store, views, markers) == [] and check() == {}
            print(f"views checked: {len(markers)}; markers: {sum(map(len, markers.values()))}")
            results: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
            for _ in range(rounds):
                results["before"].append(timed(lambda: before(store, views, markers), calls))
                results["after"].append(timed(check, calls))
            for name, rows in results.items():
                wall = statistics.median(r[0] for r in rows)
                cpu = statistics.median(r[1] for r in rows)
                spread = f"{min(r[0] for r in rows):.0f}-{max(r[0] for r in rows):.0f}"
                print(f"{name}: {wall:.0f} us wall ({spread}), {cpu:.0f} us CPU per check")
        finally:
            await source.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    asyncio.run(main(args.calls, args.rounds))
