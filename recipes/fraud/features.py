"""Card-level aggregate features for the ``fraud`` recipe, point-in-time correct.

Two views of the same numbers:

* the **card feature table** (``card_features.parquet``, Feast's offline source): one row per
  card per transaction time, with the aggregates over the windows that END at that time and
  INCLUDE that transaction. Materialising it into the online store up to a time T leaves each
  card's latest snapshot there: what the server reads for a transaction that arrives after T.
* the **training features** of a transaction: the card's snapshot as of its previous
  transaction (the latest row strictly before the transaction's own time), or the defaults for
  a card with no history. That is exactly what Feast's point-in-time join, or the online store
  at scoring time, returns, so a model trained on them sees at training what it sees at serving.
  A transaction never sees itself or anything after it.

Windows are half-open ``(t - w, t]`` where t is the time of the snapshot, i.e. of the card's
latest transaction before the one being scored. ``seconds_since_last_txn`` depends on the time
of the transaction being scored, so no stored snapshot can hold it: it is computed here for
analysis, but it is not in the Feast table and no model takes it as an input.

    uv run python recipes/fraud/features.py --data recipes/fraud/data
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from numpy.typing import NDArray

Array = NDArray[Any]

HERE = Path(__file__).resolve().parent

#: Request fields: what the payments service sends with each transaction.
REQUEST_NUMERIC = ("amount", "hour", "cross_border")
REQUEST_CATEGORICAL = ("merchant_category", "country", "channel")
#: Card features served by Feast (feature view ``card_features``), in this order.
CARD_FEATURES = (
    "txn_count_1h",
    "txn_count_24h",
    "txn_count_7d",
    "amount_sum_24h",
    "amount_avg_7d",
    "amount_max_7d",
    "distinct_countries_7d",
    "cross_border_ratio_7d",
    "night_ratio_7d",
)
COUNT_FEATURES = ("txn_count_1h", "txn_count_24h", "txn_count_7d", "distinct_countries_7d")
#: Computed at scoring time from the request's timestamp; not a Feast feature, not a model input.
REQUEST_TIME_FEATURES = ("seconds_since_last_txn",)
#: ``seconds_since_last_txn`` for a card with no previous transaction: 30 days.
NO_PREVIOUS_SECONDS = 30 * 86_400
#: Share of the window's days used for training (the rest is the test split); defaults are
#: computed on the training part only.
TRAIN_FRACTION = 0.8
NIGHT_HOURS = range(0, 6)

_HOUR, _DAY = 3_600, 86_400
_WINDOWS = {"1h": _HOUR, "24h": _DAY, "7d": 7 * _DAY}
DESCRIPTIONS = {
    "txn_count_1h": "transactions of the card in the hour up to its latest transaction",
    "txn_count_24h": "transactions of the card in the 24 h up to its latest transaction",
    "txn_count_7d": "transactions of the card in the 7 days up to its latest transaction",
    "amount_sum_24h": "sum of their amounts over 24 h",
    "amount_avg_7d": "mean amount over 7 days",
    "amount_max_7d": "largest amount over 7 days",
    "distinct_countries_7d": "distinct merchant countries over 7 days",
    "cross_border_ratio_7d": "share of cross-border transactions over 7 days",
    "night_ratio_7d": "share of transactions between 00:00 and 05:59 UTC over 7 days",
}


def _sorted(tx: pd.DataFrame) -> pd.DataFrame:
    """Transactions ordered by card, then time (then id, for a stable order of ties)."""
    cols = ["card_id", "event_timestamp"] + (["transaction_id"] if "transaction_id" in tx else [])
    return tx.sort_values(cols, kind="stable").reset_index(drop=True)


def _keys(tx: pd.DataFrame) -> tuple[Array, Array, Array]:
    """(card code, epoch seconds, sort key) of transactions sorted by :func:`_sorted`.

    The key puts each card on its own stretch of an int64 axis, so that one ``searchsorted``
    finds every card's windows at once without ever reaching into another card's rows.
    """
    card = pd.factorize(tx["card_id"], sort=True)[0].astype(np.int64)
    ts = tx["event_timestamp"]
    secs = (ts.astype("datetime64[us, UTC]").astype("int64") // 1_000_000).to_numpy()
    rel = secs - secs.min() if len(secs) else secs
    if len(rel) and rel.max() + 8 * _DAY >= 1 << 40:
        raise ValueError("transactions span more than 30 years")
    return card, secs, (card << 40) + rel


def _windowed_max(values: Array, start: Array, end: Array) -> Array:
    """max(values[start[i]:end[i]]) for every i (all ranges non-empty), by a sparse table."""
    table = [values]
    length = end - start
    k = 1
    while (1 << k) <= length.max():
        prev = table[-1]
        half = 1 << (k - 1)
        table.append(np.maximum(prev[:-half], prev[half:]))
        k += 1
    level = np.floor(np.log2(length)).astype(np.int64)
    out = np.empty(len(values), dtype=values.dtype)
    for lv in np.unique(level):
        i = np.flatnonzero(level == lv)
        t = table[lv]
        out[i] = np.maximum(t[start[i]], t[end[i] - (1 << lv)])
    return out


def _distinct_in_window(group: Array, start: Array, end: Array) -> Array:
    """Number of distinct ``group`` values in rows [start[i], end[i]) for every i.

    A row counts once per window if the previous row with the same group value lies before
    the window's start.
    """
    n = len(group)
    order = np.lexsort((np.arange(n), group))
    prev_same = np.full(n, -1, dtype=np.int64)
    same = group[order][1:] == group[order][:-1]
    prev_same[order[1:][same]] = order[:-1][same]
    out = np.zeros(n, dtype=np.int64)
    for d in range(int((end - start).max())):
        j = start + d
        ok = j < end
        jj = np.where(ok, j, 0)
        out += ok & (prev_same[jj] < start)
    return out


def card_snapshots(tx: pd.DataFrame) -> pd.DataFrame:
    """Aggregates of each card over the windows ending at (and including) each transaction.

    Returns the transactions sorted by card then time, with one column per CARD_FEATURES
    (counts int64, the rest float32). Transactions of one card at the same second share one
    snapshot that includes all of them.
    """
    tx = _sorted(tx)
    n = len(tx)
    card, _, key = _keys(tx)
    cents = np.round(tx["amount"].to_numpy(np.float64) * 100).astype(np.int64)
    cross = tx["cross_border"].to_numpy().astype(np.int64)
    night = np.isin(tx["hour"].to_numpy(), list(NIGHT_HOURS)).astype(np.int64)
    end = np.searchsorted(key, key, side="right")

    def csum(v: Array) -> Array:
        return np.concatenate([[0], np.cumsum(v)])

    c_cents, c_cross, c_night = csum(cents), csum(cross), csum(night)
    out = tx.copy()
    starts = {w: np.searchsorted(key, key - s, side="right") for w, s in _WINDOWS.items()}
    for w in _WINDOWS:
        out[f"txn_count_{w}"] = (end - starts[w]).astype(np.int64)
    s24, s7 = starts["24h"], starts["7d"]
    count7 = end - s7
    out["amount_sum_24h"] = ((c_cents[end] - c_cents[s24]) / 100).astype(np.float32)
    out["amount_avg_7d"] = ((c_cents[end] - c_cents[s7]) / 100 / count7).astype(np.float32)
    out["amount_max_7d"] = (_windowed_max(cents, s7, end) / 100).astype(np.float32)
    if n:
        country = pd.factorize(tx["country"])[0].astype(np.int64)
        group = card * 1_000_003 + country
        out["distinct_countries_7d"] = _distinct_in_window(group, s7, end)
    else:
        out["distinct_countries_7d"] = np.zeros(0, dtype=np.int64)
    out["cross_border_ratio_7d"] = ((c_cross[end] - c_cross[s7]) / count7).astype(np.float32)
    out["night_ratio_7d"] = ((c_night[end] - c_night[s7]) / count7).astype(np.float32)
    return out


def card_feature_table(snapshots: pd.DataFrame) -> pd.DataFrame:
    """The Feast offline source: card_id, event_timestamp, created_timestamp, CARD_FEATURES.

    One row per card per distinct transaction time (ties collapse to one row). The values
    became true at ``event_timestamp``; ``created_timestamp`` is the same instant (the data is
    synthetic: no ingestion delay), which keeps the file reproducible.
    """
    table = snapshots.drop_duplicates(["card_id", "event_timestamp"], keep="last")
    table = table[["card_id", "event_timestamp", *CARD_FEATURES]].copy()
    table.insert(2, "created_timestamp", table["event_timestamp"])
    table = table.sort_values(["event_timestamp", "card_id"], kind="stable")
    return table.reset_index(drop=True)


def split_time(tx: pd.DataFrame) -> pd.Timestamp:
    """Start of the test split: TRAIN_FRACTION of the whole days from the window's end."""
    end = tx["event_timestamp"].max().ceil("D")
    start = tx["event_timestamp"].min().floor("D")
    days = (end - start).days
    return start + pd.Timedelta(days=round(days * TRAIN_FRACTION))


def default_values(snapshots: pd.DataFrame, until: pd.Timestamp | None = None) -> dict[str, float]:
    """What the server uses for a card Feast does not know (and training for a first txn).

    Counts and sums are 0 (no history); the amount features are the population median of the
    snapshots (a neutral value, so that a new card's first amount is not "far above its
    average" by construction); the ratios are their population medians too.
    """
    snap = snapshots if until is None else snapshots[snapshots["event_timestamp"] < until]
    out: dict[str, float] = {}
    for f in CARD_FEATURES:
        if f in COUNT_FEATURES or f == "amount_sum_24h":
            out[f] = 0.0
        else:
            out[f] = round(float(np.median(snap[f].to_numpy(np.float64))), 2)
    return out


def point_in_time_features(
    tx: pd.DataFrame,
    defaults: Mapping[str, float],
    snapshots: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Every transaction with the card features it would have been scored with.

    For each transaction: the request fields, the card's snapshot as of its latest earlier
    transaction (strictly earlier in time), ``seconds_since_last_txn``, and a boolean
    ``has_history``. Cards without an earlier transaction get ``defaults``. Rows come back in
    the input's order.
    """
    missing = [f for f in CARD_FEATURES if f not in defaults]
    if missing:
        raise KeyError(f"defaults lack {missing}")
    pos = np.empty(len(tx), dtype=np.int64)
    order = tx.reset_index(drop=True).assign(_row=np.arange(len(tx))).pipe(_sorted)
    pos[order["_row"].to_numpy()] = np.arange(len(tx))
    snap = card_snapshots(order) if snapshots is None else snapshots
    if len(snap) != len(order):
        raise ValueError("snapshots do not match the transactions")
    card, secs, key = _keys(order)
    prev = np.searchsorted(key, key, side="left") - 1
    has = prev >= 0
    has[has] = card[prev[has]] == card[has]
    prev_i = np.where(has, prev, 0)

    out = order.drop(columns=["_row"]).copy()
    for f in CARD_FEATURES:
        vals = snap[f].to_numpy()[prev_i]
        dtype = np.int64 if f in COUNT_FEATURES else np.float32
        out[f] = np.where(has, vals, defaults[f]).astype(dtype)
    out["seconds_since_last_txn"] = np.where(has, secs - secs[prev_i], NO_PREVIOUS_SECONDS).astype(
        np.float32
    )
    out["has_history"] = has
    return out.iloc[pos].reset_index(drop=True)


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    """Write a frame compactly and reproducibly: zstd, no index, an encoding per column.

    Timestamps and integers are delta-encoded, floats with few distinct values and repetitive
    strings dictionary-encoded, other floats byte-stream-split, unique strings prefix-encoded.
    """
    table = pa.Table.from_pandas(df, preserve_index=False)
    dictionary: list[str] = []
    encoding: dict[str, str] = {}
    for field in table.schema:
        col = table[field.name]
        distinct = len(pc.unique(col)) if len(col) else 0
        if pa.types.is_timestamp(field.type) or pa.types.is_integer(field.type):
            encoding[field.name] = "DELTA_BINARY_PACKED"
        elif pa.types.is_floating(field.type):
            if distinct <= 1 << 16:
                dictionary.append(field.name)
            else:
                encoding[field.name] = "BYTE_STREAM_SPLIT"
        elif pa.types.is_string(field.type) and distinct > len(col) // 2:
            encoding[field.name] = "DELTA_BYTE_ARRAY"
        else:
            dictionary.append(field.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        table,
        path,
        compression="zstd",
        compression_level=9,
        use_dictionary=dictionary,
        column_encoding=encoding,
    )


def write_defaults(defaults: Mapping[str, float], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(defaults), indent=2) + "\n")


def load_defaults(path: Path = HERE / "artifacts" / "feature_defaults.json") -> dict[str, float]:
    return {k: float(v) for k, v in json.loads(path.read_text()).items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=HERE / "data")
    p.add_argument("--defaults", type=Path, default=HERE / "artifacts" / "feature_defaults.json")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    tx = pd.read_parquet(a.data / "transactions.parquet")
    snaps = card_snapshots(tx)
    table = card_feature_table(snaps)
    out = a.data / "card_features.parquet"
    write_parquet(table, out)
    defaults = default_values(snaps, until=split_time(tx))
    write_defaults(defaults, a.defaults)
    print(
        f"features: {len(table):,} card snapshots of {table['card_id'].nunique():,} cards, "
        f"{out.stat().st_size / 1e6:.2f} MB -> {out}; defaults -> {a.defaults} "
        f"({time.perf_counter() - t0:.1f} s)",
        flush=True,
    )


if __name__ == "__main__":
    main()
