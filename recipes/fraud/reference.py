"""The ``fraud`` recipe's drift reference: model inputs as the server sees them, reproducibly.

A drift monitor compares live inputs with a reference; the reference must be what the server
sees under normal conditions, or the monitor alarms on the difference between the two instead
of on drift. The recipe's server reads card features from a Feast online store materialized
from ``card_features.parquet``: each card's **latest** snapshot. Training rows carry the
snapshot as of the card's previous transaction (``features.point_in_time_features``), so a
sample of training inputs (``reference.parquet``, written by ``train.py``) is not what is
served: its card counts are lower (``--check`` measures by how much).

The served reference is built from the held-out days (from ``features.split_time`` on), which
the server is never trained on and which the drift loop replays. A seeded hash of each
transaction's (card, time) splits them: a quarter is the **reference pool**, the rest the
**replay** part (``replay_mask``; ``benchmarks/fraud_drift_loop.py`` sends only those, so the
loop never compares a window with the rows of its own reference). The key survives the
renumbering of ``generate.py --shift``: a transaction of the original world that is also in the
shifted one falls on the same side. ``REFERENCE_ROWS`` rows are drawn from the pool with a
fixed seed; each gets its request fields and the card features the online store serves for its
card (defaults for a card the store does not know). Columns, order and types are those of
``reference.parquet``: the v2 inputs, float32 numbers, str categories.

    uv run python recipes/fraud/reference.py                 # -> artifacts/reference_served.parquet
    uv run python recipes/fraud/reference.py --check 20      # training vs served reference, KS

Writes the same bytes every time, and pins the file in ``artifacts/SHA256SUMS``.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from features import (  # noqa: E402
    CARD_FEATURES,
    COUNT_FEATURES,
    load_defaults,
    point_in_time_features,
    split_time,
    write_parquet,
)
from train import REFERENCE_ROWS, SEED, V2_FEATURES, model_frame  # noqa: E402

Array = NDArray[Any]
#: Share of the held-out transactions in the reference pool; the rest is replayed.
REFERENCE_SHARE = 0.25
FILE = "reference_served.parquet"
#: What the recipe's drift detectors watch (recipes/fraud.yaml), and the loop's window.
MONITORED_NUMERIC = ("amount", "hour", "txn_count_1h", "txn_count_24h", "amount_avg_7d")
MONITORED_CATEGORICAL = ("merchant_category", "channel")
WINDOW = 500
P_VAL = 0.01


def split_key(tx: pd.DataFrame, seed: int = SEED) -> Array:
    """A uniform number in [0, 1) per transaction, from a hash of (seed, card, time).

    Not from ``transaction_id``: ids are renumbered when ``generate.py --shift`` inserts rows.
    """
    secs = tx["event_timestamp"].astype("datetime64[us, UTC]").astype("int64").to_numpy()
    keys = [f"{seed}:{c}:{s}".encode() for c, s in zip(tx["card_id"], secs, strict=True)]
    digests = (hashlib.blake2b(k, digest_size=8).digest() for k in keys)
    return np.fromiter((int.from_bytes(d, "big") / 2**64 for d in digests), np.float64, len(keys))


def held_out(tx: pd.DataFrame) -> Array:
    """The transactions of the held-out days (the models' test split)."""
    return (tx["event_timestamp"] >= split_time(tx)).to_numpy()


def replay_mask(tx: pd.DataFrame, seed: int = SEED) -> Array:
    """Transactions a drift benchmark may replay: not in the reference pool (any day)."""
    return split_key(tx, seed) >= REFERENCE_SHARE


def reference_pool_mask(tx: pd.DataFrame, seed: int = SEED) -> Array:
    """The held-out transactions the served reference is drawn from."""
    return held_out(tx) & ~replay_mask(tx, seed)


def online_snapshot(table: pd.DataFrame) -> pd.DataFrame:
    """What materializing the card feature table leaves online: each card's latest row."""
    order = table.sort_values(["event_timestamp", "created_timestamp"], kind="stable")
    return order.groupby("card_id").tail(1).set_index("card_id")[list(CARD_FEATURES)]


def served_inputs(
    tx: pd.DataFrame, online: pd.DataFrame, defaults: Mapping[str, float]
) -> pd.DataFrame:
    """The v2 inputs the server builds for ``tx``: request fields + the card's online values."""
    joined = tx.join(online, on="card_id")
    for f in CARD_FEATURES:
        col = joined[f].fillna(defaults[f])  # a card the store does not know
        joined[f] = col.astype(np.int64 if f in COUNT_FEATURES else np.float32)
    return model_frame(joined, V2_FEATURES)


def build(data: Path, defaults: Mapping[str, float], seed: int = SEED) -> pd.DataFrame:
    tx = pd.read_parquet(data / "transactions.parquet")
    online = online_snapshot(pd.read_parquet(data / "card_features.parquet"))
    pool = tx[reference_pool_mask(tx, seed)].reset_index(drop=True)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(pool), size=min(REFERENCE_ROWS, len(pool)), replace=False))
    return served_inputs(pool.iloc[rows], online, defaults).reset_index(drop=True)


def pin(out: Path, name: str) -> None:
    """Add or update ``name``'s digest in ``out/SHA256SUMS``; other lines are kept, sorted."""
    sums = out / "SHA256SUMS"
    lines = sums.read_text().splitlines() if sums.exists() else []
    entries = {n: d for d, n in (line.split("  ", 1) for line in lines if line.strip())}
    entries[name] = hashlib.sha256((out / name).read_bytes()).hexdigest()
    sums.write_text("".join(f"{entries[n]}  {n}\n" for n in sorted(entries)))


# --- the check: training reference vs served inputs ------------------------------------------


def _chi2_p(ref: Array, win: Array) -> float:
    from scipy.stats import chi2_contingency

    cats = np.unique(np.concatenate([ref, win]))
    table = np.array([[np.sum(ref == c) for c in cats], [np.sum(win == c) for c in cats]])
    return float(chi2_contingency(table)[1])


def check(data: Path, artifacts: Path, shuffles: int, seed: int = SEED) -> list[str]:
    """KS of each monitored number, references vs replayed served inputs; windows flagged.

    The windows are those of ``benchmarks/fraud_drift_loop.py --seed S`` for S in
    ``range(shuffles)``: the replay part shuffled with seed S, cut into windows of ``WINDOW``
    rows. A window is flagged as ``alibi-tabular`` flags it: a KS test per number (asymptotic
    p-values), a chi-square per category, Bonferroni over all of them at ``P_VAL``.
    """
    from scipy.stats import ks_2samp

    tx = pd.read_parquet(data / "transactions.parquet")
    defaults = load_defaults(artifacts / "feature_defaults.json")
    online = online_snapshot(pd.read_parquet(data / "card_features.parquet"))
    replay = tx[held_out(tx) & replay_mask(tx, seed)]
    served = served_inputs(replay, online, defaults).reset_index(drop=True)
    pit = point_in_time_features(tx, defaults)[held_out(tx) & replay_mask(tx, seed)]
    pit = model_frame(pit, V2_FEATURES).reset_index(drop=True)
    refs = {
        "training": pd.read_parquet(artifacts / "reference.parquet"),
        "served": pd.read_parquet(artifacts / FILE),
    }
    out = [
        f"replayed held-out rows: {len(served):,}; references: {len(refs['training']):,} rows "
        f"each; KS over all replayed rows (D, p) and mean",
        f"{'feature':<15} {'training ref vs served':>24} {'training ref vs PIT':>21} "
        f"{'served ref vs served':>22}   means: train ref / PIT / served",
    ]
    for f in MONITORED_NUMERIC:
        a = ks_2samp(refs["training"][f], served[f])
        b = ks_2samp(refs["training"][f], pit[f])
        c = ks_2samp(refs["served"][f], served[f])
        out.append(
            f"{f:<15} {a.statistic:>11.3f} {a.pvalue:>11.1e}  {b.statistic:>9.3f} "
            f"{b.pvalue:>9.1e}  {c.statistic:>10.3f} {c.pvalue:>9.1e}   "
            f"{refs['training'][f].mean():.2f} / {pit[f].mean():.2f} / {served[f].mean():.2f}"
        )
    feats = (*MONITORED_NUMERIC, *MONITORED_CATEGORICAL)
    level = P_VAL / len(feats)
    picks = []
    for s in range(shuffles):
        order = pd.Series(np.arange(len(served))).sample(frac=1.0, random_state=s).to_numpy()
        picks += [order[i : i + WINDOW] for i in range(0, len(order) - WINDOW + 1, WINDOW)]
    windows = len(picks)
    # the training reference on served windows (this recipe's store), and on point-in-time
    # windows (a store updated at every transaction), the served reference on served windows
    cases = (
        ("training", "served", served),
        ("training", "PIT", pit),
        ("served", "served", served),
    )
    for name, kind, rows in cases:
        ref = refs[name]
        pvals: dict[str, list[float]] = {f: [] for f in feats}
        for idx in picks:
            win = rows.iloc[idx]
            for f in MONITORED_NUMERIC:
                pvals[f].append(float(ks_2samp(ref[f], win[f], mode="asymp").pvalue))
            for f in MONITORED_CATEGORICAL:
                pvals[f].append(_chi2_p(ref[f].to_numpy(), win[f].to_numpy()))
        p = np.array([pvals[f] for f in feats])  # features x windows
        flagged = int((p < level).any(axis=0).sum())
        # drift-stats as the recipe sets it: ks over the numbers, chi2 over the categories,
        # each Bonferroni-corrected at P_VAL on its own; a window alarms if either does
        n_num = len(MONITORED_NUMERIC)
        split = (p[:n_num] < P_VAL / n_num).any(axis=0) | (
            p[n_num:] < P_VAL / (len(feats) - n_num)
        ).any(axis=0)
        hits = dict(zip(feats, (p < level).sum(axis=1).tolist(), strict=True))
        per = ", ".join(f"{f} {n}" for f, n in hits.items() if n)
        medians = dict(zip(feats, np.median(p, axis=1).tolist(), strict=True))
        med = ", ".join(f"{f} {m:.2g}" for f, m in medians.items())
        out.append(
            f"{name} reference, {kind} windows: {flagged}/{windows} flagged "
            f"({flagged / windows:.1%}; per feature at {P_VAL:g}/{len(feats)}): {per or 'none'}; "
            f"as drift-stats ks + chi2: {int(split.sum())}/{windows} ({split.mean():.1%})"
        )
        out.append(f"    median p per window: {med}")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=HERE / "data")
    p.add_argument("--out", type=Path, default=HERE / "artifacts")
    p.add_argument("--defaults", type=Path, default=None, help="default: OUT/feature_defaults.json")
    p.add_argument(
        "--check",
        type=int,
        metavar="SHUFFLES",
        default=0,
        help="only compare, over the drift loop's windows for seeds 0 .. SHUFFLES-1",
    )
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    if a.check:
        for line in check(a.data, a.out, a.check):
            print(line, flush=True)
        return
    ref = build(a.data, load_defaults(a.defaults or a.out / "feature_defaults.json"))
    write_parquet(ref, a.out / FILE)
    pin(a.out, FILE)
    print(
        f"reference: {len(ref):,} served inputs of held-out transactions -> {a.out / FILE} "
        f"({time.perf_counter() - t0:.1f} s)",
        flush=True,
    )


if __name__ == "__main__":
    main()
