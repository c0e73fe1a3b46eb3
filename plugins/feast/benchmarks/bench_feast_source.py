"""Feast online reads: the raw SDK against the ``feast`` feature source.

    uv run python plugins/feast/benchmarks/bench_feast_source.py [--cards 10000] [--seconds 3]

Builds a throwaway model root (the fraud recipe's feature repo over a synthetic card table
with the generator's schema), applies and materializes it into SQLite, then measures:

1. latency of one read of 1 and 32 entity rows: ``store.get_online_features(...).to_dict()``
   called directly, against ``FeastFeatureSource.fetch`` (cache off, no merge window, so each
   fetch is one read through the worker thread);
2. throughput of many concurrent single-card fetches (one event loop, like one server
   worker): merging on (1 ms window), merging off (every key its own read), the naive
   baseline (one ``asyncio.to_thread`` SDK read per request), and merging plus a 5 s cache
   with cards drawn from a skewed distribution.

Numbers depend on the machine; run it on the one you deploy to. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from infercore.components import ComponentContext
from infercore.config.validation import convert
from infercore_feast import FeastFeatureSource, FeastSourceConfig

REPO_SRC = Path(__file__).resolve().parents[3] / "recipes" / "fraud" / "feature_repo"
FEATURES = [
    ("txn_count_1h", "INT64", 0),
    ("txn_count_24h", "INT64", 0),
    ("txn_count_7d", "INT64", 0),
    ("amount_sum_24h", "FP32", 0.0),
    ("amount_avg_7d", "FP32", 0.0),
    ("amount_max_7d", "FP32", 0.0),
    ("distinct_countries_7d", "INT64", 0),
    ("cross_border_ratio_7d", "FP32", 0.0),
    ("night_ratio_7d", "FP32", 0.0),
]


def build_root(cards: int) -> Path:
    root = Path(tempfile.mkdtemp(prefix="infercore-feast-bench-"))
    shutil.copytree(
        REPO_SRC,
        root / "fraud" / "feature_repo",
        ignore=shutil.ignore_patterns("data", "__pycache__"),
    )
    (root / "fraud" / "data").mkdir(parents=True)
    rng = np.random.default_rng(0)
    ts = datetime(2025, 3, 1, tzinfo=UTC) - pd.to_timedelta(rng.integers(0, 86400, cards), "s")
    df = pd.DataFrame(
        {
            "card_id": [f"c_{i:06d}" for i in range(cards)],
            "event_timestamp": ts,
            "created_timestamp": ts,
            "txn_count_1h": rng.integers(0, 5, cards),
            "txn_count_24h": rng.integers(0, 30, cards),
            "txn_count_7d": rng.integers(0, 200, cards),
            "amount_sum_24h": rng.gamma(2, 50, cards),
            "amount_avg_7d": rng.gamma(2, 20, cards),
            "amount_max_7d": rng.gamma(2, 80, cards),
            "distinct_countries_7d": rng.integers(1, 4, cards),
            "night_ratio_7d": rng.random(cards),
            "cross_border_ratio_7d": rng.random(cards),
        }
    )
    df.to_parquet(root / "fraud" / "data" / "card_features.parquet")
    return root


def source(root: Path, **options: Any) -> FeastFeatureSource:
    node = {
        "repo": "fraud/feature_repo",
        "project": "fraud",
        "entity": {"field": "card_id", "join_key": "card_id"},
        "inputs": [{"name": "amount", "source": "request", "datatype": "FP32"}]
        + [
            {
                "name": n,
                "source": "feast",
                "feature": f"card_features:{n}",
                "datatype": d,
                "default": v,
            }
            for n, d, v in FEATURES
        ],
        # Generous: this measures speed, not the failure policy (a busy machine stalls reads).
        "timeout_ms": 1000,
        **options,
    }
    cfg = convert(node, FeastSourceConfig, path="features")
    return FeastFeatureSource(cfg, ComponentContext("features", root, model_name="fraud"))


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def fmt_ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:.3f} / {pct(values, 99) * 1e3:.3f}"


async def latency(src: FeastFeatureSource, cards: int, reps: int) -> dict[str, dict[int, str]]:
    refs = [f"card_features:{n}" for n, _, _ in FEATURES]
    out: dict[str, dict[int, str]] = {
        "raw SDK (get_online_features + to_dict)": {},
        "source.fetch (cache off, no window)": {},
    }
    loop = asyncio.get_running_loop()
    for rows in (1, 32):
        keys = [[f"c_{random.randrange(cards):06d}" for _ in range(rows)] for _ in range(reps)]
        raw: list[float] = []
        for ks in keys:
            t0 = time.perf_counter()
            src.store.get_online_features(
                features=refs, entity_rows={"card_id": ks}, full_feature_names=True
            ).to_dict()
            raw.append(time.perf_counter() - t0)
        via: list[float] = []
        for ks in keys:
            fields = {"card_id": np.array(ks), "amount": np.ones(rows)}
            t0 = time.perf_counter()
            await src.fetch(fields, deadline=loop.time() + 5)
            via.append(time.perf_counter() - t0)
        out["raw SDK (get_online_features + to_dict)"][rows] = fmt_ms(raw[reps // 10 :])
        out["source.fetch (cache off, no window)"][rows] = fmt_ms(via[reps // 10 :])
    return out


async def throughput(
    fetch_one: Any, cards: int, clients: int, seconds: float, skew: bool = False
) -> tuple[float, float]:
    stop = time.perf_counter() + seconds
    done = 0
    lat: list[float] = []
    rng = np.random.default_rng(1)
    weights = None
    if skew:  # a few busy cards, a long tail (Zipf-like)
        weights = 1.0 / np.arange(1, cards + 1) ** 1.1
        weights /= weights.sum()
    # Drawn up front: sampling must not cost the event loop more than the fetch does.
    draws = rng.choice(cards, size=1_000_000, p=weights).tolist()

    async def client() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            i = draws[done % len(draws)]
            t0 = time.perf_counter()
            await fetch_one(f"c_{i:06d}")
            lat.append(time.perf_counter() - t0)
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return done / (time.perf_counter() - t0), pct(lat, 99) * 1e3


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cards", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--reps", type=int, default=2000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = build_root(args.cards)
    try:
        t0 = time.perf_counter()
        base = source(root, cache_ttl_s=0, batch_window_ms=0)
        await base.start()
        print(
            f"start (import feast, apply, materialize {args.cards} cards): "
            f"{time.perf_counter() - t0:.1f}s\n"
        )
        lat = await latency(base, args.cards, args.reps)
        print("| one read (median / p99 ms) | 1 row | 32 rows |\n|---|---|---|")
        for name, row in lat.items():
            print(f"| {name} | {row[1]} | {row[32]} |")
        refs = [f"card_features:{n}" for n, _, _ in FEATURES]

        async def naive(key: str) -> None:
            await asyncio.to_thread(
                lambda: base.store.get_online_features(
                    features=refs, entity_rows={"card_id": [key]}, full_feature_names=True
                ).to_dict()
            )

        modes: list[tuple[str, dict[str, Any], bool]] = [
            ("merging on (window 1 ms, max 256), cache off", {"cache_ttl_s": 0}, False),
            (
                "merging off (max_batch_entities 1), cache off",
                {"cache_ttl_s": 0, "batch_window_ms": 0, "max_batch_entities": 1},
                False,
            ),
            ("merging on + cache 5 s, Zipf-skewed cards", {}, True),
        ]
        print(
            f"\n| {args.clients} concurrent single-card fetches, {args.seconds:.0f} s, one "
            "event loop | fetches/s | p99 ms | reads | entities/read |\n|---|---|---|---|---|"
        )
        rate, p99 = await throughput(naive, args.cards, args.clients, args.seconds)
        print(
            f"| naive: one to_thread SDK read per request | {rate:,.0f} | {p99:.2f} | "
            f"= fetches | 1 |"
        )
        await base.stop()
        for name, opts, skew in modes:
            src = source(root, **opts)
            await src.start()
            loop = asyncio.get_running_loop()

            async def one(
                key: str, src: FeastFeatureSource = src, loop: asyncio.AbstractEventLoop = loop
            ) -> None:
                await src.fetch(
                    {"card_id": np.array([key]), "amount": np.ones(1)}, deadline=loop.time() + 5
                )

            rate, p99 = await throughput(one, args.cards, args.clients, args.seconds, skew)
            reg = src.metrics_registry
            reads = (
                reg.get_sample_value("infercore_feature_fetch_seconds_count", {"model": "fraud"})
                or 0
            )
            ents = (
                reg.get_sample_value("infercore_feature_read_entities_sum", {"model": "fraud"}) or 0
            )
            failed = sum(
                reg.get_sample_value(
                    "infercore_feature_fetch_failures_total", {"model": "fraud", "reason": r}
                )
                or 0
                for r in ("timeout", "error", "breaker_open")
            )
            note = f" ({failed:.0f} failed)" if failed else ""
            print(
                f"| {name}{note} | {rate:,.0f} | {p99:.2f} | {reads:,.0f} | "
                f"{(ents / reads if reads else 0):.1f} |"
            )
            await src.stop()
        print(f"\npython {sys.version.split()[0]}, numpy {np.__version__}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
