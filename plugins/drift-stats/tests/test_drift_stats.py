"""drift-stats detectors: no alarm on unshifted data at the configured rate, detection of
clear shifts, the correction math, and config errors."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from infercore.components import ComponentContext, DriftDetector
from infercore.drift.columns import Array, to_columns
from infercore.errors import ConfigError, ModelLoadError
from infercore.plugin_manager import make_plugin_manager
from infercore.registry import Registry
from infercore_drift_stats import Chi2Detector, KSDetector, PSIDetector, correct
from infercore_drift_stats.detectors import WindowError

REPO = Path(__file__).resolve().parents[3]
FRAUD_REFERENCE = REPO / "recipes" / "fraud" / "artifacts" / "reference.parquet"
NUMERIC = [
    "amount",
    "hour",
    "cross_border",
    "txn_count_1h",
    "txn_count_24h",
    "txn_count_7d",
    "amount_sum_24h",
    "amount_avg_7d",
    "amount_max_7d",
    "distinct_countries_7d",
    "cross_border_ratio_7d",
    "night_ratio_7d",
]
CATEGORICAL = ["merchant_category", "country", "channel"]


@pytest.fixture(scope="module")
def registry() -> Registry:
    pm, _ = make_plugin_manager()
    return Registry(pm)


@pytest.fixture(scope="module")
def fraud() -> pd.DataFrame:
    return pd.read_parquet(FRAUD_REFERENCE)


@pytest.fixture(scope="module")
def population(fraud: pd.DataFrame) -> pd.DataFrame:
    """The fraud model's training inputs (143,851 rows), computed by the recipe's own code.

    The reference file is a seeded sample of 2,000 of these rows, so windows drawn from them
    come from the reference's distribution: the unshifted case.
    """
    recipe = REPO / "recipes" / "fraud"
    spec = importlib.util.spec_from_file_location(
        "fraud_features_for_drift", recipe / "features.py"
    )
    assert spec and spec.loader
    features = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(features)
    tx = pd.read_parquet(recipe / "data" / "transactions.parquet")
    pit = features.point_in_time_features(
        tx, features.load_defaults(recipe / "artifacts" / "feature_defaults.json")
    )
    train = pit[pit["event_timestamp"] < features.split_time(tx)].reset_index(drop=True)
    cols: dict[str, Any] = {}
    for name in fraud.columns:
        if name in CATEGORICAL:
            cols[name] = train[name].astype(str).to_numpy(dtype=object)
        else:
            cols[name] = train[name].to_numpy().astype(np.float32)
    return pd.DataFrame(cols)


ROOT = REPO / "recipes"
REF = "fraud/artifacts/reference.parquet"


def make(registry: Registry, root: Path, node: dict[str, Any], name: str = "d") -> DriftDetector:
    det = registry.build(
        "drift_detector",
        node,
        ComponentContext(
            f"models.fraud.drift.detectors.{name}",
            root,
            model_name="fraud",
            extra={"detector_name": name},
        ),
    )
    assert isinstance(det, DriftDetector)
    asyncio.run(det.start())
    return det


def window(frame: pd.DataFrame) -> dict[str, Array]:
    """A window the way the monitor builds one: each column a [N, 1] tensor, strings as bytes."""
    tensors: dict[str, Array] = {}
    for col in frame.columns:
        values = frame[col].to_numpy()
        if values.dtype == object:
            values = np.array([v.encode() for v in values], dtype=object)
        else:
            values = values.astype(np.float32)
        tensors[col] = values.reshape(-1, 1)
    return to_columns(tensors)


def test_plugin_registers_its_kinds(registry: Registry) -> None:
    kinds = registry.kinds("drift_detector")
    assert kinds["ks"].cls is KSDetector and kinds["ks"].plugin == "drift-stats"
    assert kinds["chi2"].cls is Chi2Detector and kinds["psi"].cls is PSIDetector


def test_fraud_reference_columns(registry: Registry) -> None:
    det = make(registry, ROOT, {"kind": "ks", "reference": REF})
    assert det.features == NUMERIC  # type: ignore[attr-defined]
    chi = make(registry, ROOT, {"kind": "chi2", "reference": REF})
    assert chi.features == CATEGORICAL  # type: ignore[attr-defined]


# --- no alarm on unshifted data at the configured rate -----------------------------------


@pytest.mark.parametrize(
    ("node", "rate"),
    [
        ({"kind": "ks", "p_val": 0.05, "correction": "bonferroni"}, 0.05),
        ({"kind": "ks", "p_val": 0.05, "correction": "fdr"}, 0.05),
        ({"kind": "chi2", "p_val": 0.05, "correction": "bonferroni"}, 0.05),
        ({"kind": "chi2", "p_val": 0.05, "correction": "fdr"}, 0.05),
        ({"kind": "psi", "threshold": 0.2}, 0.0),
    ],
)
def test_false_alarm_rate_on_unshifted_windows(
    registry: Registry, population: pd.DataFrame, node: dict[str, Any], rate: float
) -> None:
    """200 windows of 300 training rows each: alarms at most twice the configured rate
    (PSI has no rate: no alarm at all at the usual 0.2 threshold)."""
    det = make(registry, ROOT, {**node, "reference": REF})
    rng = np.random.default_rng(42)
    alarms = 0
    n_windows = 200
    for _ in range(n_windows):
        rows = rng.choice(len(population), size=300, replace=False)
        result = det.detect(window(population.iloc[rows]))
        alarms += result.drift
    assert alarms / n_windows <= 2 * rate


@pytest.mark.parametrize("correction", ["bonferroni", "fdr"])
def test_false_alarm_rate_on_synthetic_data(
    registry: Registry, tmp_path: Path, correction: str
) -> None:
    """Continuous data without ties and categories: alarms near p_val, never above twice it."""
    rng = np.random.default_rng(1)
    probs = [0.5, 0.3, 0.15, 0.05]
    cats = np.array(["a", "b", "c", "d"])
    np.savez(
        tmp_path / "ref.npz",
        x=rng.normal(size=(2000, 5)),
        c=rng.choice(cats, size=(2000, 3), p=probs),
    )
    ks = make(
        registry,
        tmp_path,
        {"kind": "ks", "reference": "ref.npz", "p_val": 0.1, "correction": correction},
    )
    chi = make(
        registry,
        tmp_path,
        {"kind": "chi2", "reference": "ref.npz", "p_val": 0.1, "correction": correction},
    )
    assert ks.features == [f"x[{i}]" for i in range(5)]  # type: ignore[attr-defined]
    assert chi.features == [f"c[{i}]" for i in range(3)]  # type: ignore[attr-defined]
    ks_alarms = chi_alarms = 0
    for _ in range(200):
        w = to_columns(
            {"x": rng.normal(size=(500, 5)), "c": rng.choice(cats, size=(500, 3), p=probs)}
        )
        ks_alarms += ks.detect(w).drift
        chi_alarms += chi.detect(w).drift
    assert ks_alarms / 200 <= 2 * 0.1
    assert chi_alarms / 200 <= 2 * 0.1


# --- detection of clear shifts ------------------------------------------------------------


def test_ks_detects_a_mean_shift(registry: Registry, population: pd.DataFrame) -> None:
    det = make(registry, ROOT, {"kind": "ks", "reference": REF})
    shifted = population.sample(300, random_state=3).copy()
    shifted["amount"] = shifted["amount"] * 3 + 50
    result = det.detect(window(shifted))
    assert result.drift
    assert result.feature_drift["amount"] is True
    assert sum(result.feature_drift.values()) == 1
    assert result.p_values["amount"] < 1e-10
    assert result.scores["amount"] > 0.3
    assert result.info["threshold"] == pytest.approx(0.05 / len(NUMERIC))


def test_chi2_detects_a_category_mix_change(registry: Registry, population: pd.DataFrame) -> None:
    det = make(registry, ROOT, {"kind": "chi2", "reference": REF})
    shifted = population.sample(300, random_state=4).copy()
    online = shifted.index[:120]  # 40 % of the window becomes online electronics
    shifted.loc[online, "channel"] = "online"
    shifted.loc[online, "merchant_category"] = "electronics"
    result = det.detect(window(shifted))
    assert result.drift
    assert result.feature_drift == {"merchant_category": True, "country": False, "channel": True}


def test_chi2_counts_unseen_categories_together(registry: Registry, tmp_path: Path) -> None:
    pd.DataFrame({"c": ["a", "b"] * 200}).to_csv(tmp_path / "ref.csv", index=False)
    det = make(registry, tmp_path, {"kind": "chi2", "reference": "ref.csv"})
    same = det.detect(to_columns({"c": np.array(["a", "b"] * 100, dtype=object)}))
    assert not same.drift and same.p_values["c"] == pytest.approx(1.0)
    new = det.detect(to_columns({"c": np.array(["a", "b", "zz", "yy"] * 50, dtype=object)}))
    assert new.drift and new.feature_drift == {"c": True}


def test_chi2_on_a_numeric_column_named_explicitly(
    registry: Registry, population: pd.DataFrame
) -> None:
    det = make(
        registry, ROOT, {"kind": "chi2", "reference": REF, "features": ["cross_border", "channel"]}
    )
    shifted = population.sample(300, random_state=5).copy()
    shifted["cross_border"] = 1.0
    result = det.detect(window(shifted))
    assert result.feature_drift == {"cross_border": True, "channel": False}


def test_psi_detects_a_shift_and_scores_categories(
    registry: Registry, population: pd.DataFrame
) -> None:
    det = make(registry, ROOT, {"kind": "psi", "reference": REF})
    same = det.detect(window(population.sample(1000, random_state=6)))
    assert not same.drift
    assert max(same.scores.values()) < 0.1
    assert same.p_values == {}
    shifted = population.sample(1000, random_state=7).copy()
    shifted["hour"] = (shifted["hour"] + 12) % 24
    shifted["channel"] = "atm"
    result = det.detect(window(shifted))
    assert result.drift
    assert result.feature_drift["hour"] and result.feature_drift["channel"]
    assert not result.feature_drift["amount"]
    assert result.info == {"threshold": 0.2, "bins": 10}


def test_psi_value_by_hand(registry: Registry, tmp_path: Path) -> None:
    np.savez(tmp_path / "ref.npz", x=np.repeat([0.0, 1.0], 500))
    det = make(registry, tmp_path, {"kind": "psi", "reference": "ref.npz", "bins": 2})
    result = det.detect(to_columns({"x": np.repeat([0.0, 1.0], [250, 750])}))
    expected = (0.25 - 0.5) * math.log(0.25 / 0.5) + (0.75 - 0.5) * math.log(0.75 / 0.5)
    assert result.scores["x"] == pytest.approx(expected)
    assert result.drift is (expected > 0.2)


@pytest.mark.parametrize(
    ("reference", "same", "shifted"),
    [
        # a 0/1 flag, 4.6 % ones (the fraud recipe's cross_border): every inner quantile is 0
        (np.repeat([0.0, 1.0], [1908, 92]), np.repeat([0.0, 1.0], [954, 46]), np.ones(50)),
        # the same flag, mostly ones: every inner quantile is 1
        (np.repeat([0.0, 1.0], [92, 1908]), np.repeat([0.0, 1.0], [46, 954]), np.zeros(50)),
        # a count that is mostly 0 (txn_count_1h): the window's rows are all 2
        (
            np.repeat([0.0, 1.0, 2.0, 3.0], [1900, 60, 30, 10]),
            np.repeat([0.0, 1.0, 2.0, 3.0], [950, 30, 15, 5]),
            np.full(50, 2.0),
        ),
    ],
    ids=["flag-mostly-0", "flag-mostly-1", "count-mostly-0"],
)
def test_psi_gives_a_skewed_few_valued_column_a_bin_per_value(
    registry: Registry, tmp_path: Path, reference: Array, same: Array, shifted: Array
) -> None:
    np.savez(tmp_path / "ref.npz", x=reference)
    det = make(registry, tmp_path, {"kind": "psi", "reference": "ref.npz"})
    assert det.detect(to_columns({"x": same})).scores["x"] == pytest.approx(0.0, abs=1e-9)
    result = det.detect(to_columns({"x": shifted}))
    # 4.6 % -> 100 % ones: about 11.7 with the default epsilon; one shared bin gave 0
    assert result.scores["x"] > 2.0, result.scores
    assert result.feature_drift["x"] and result.drift


def test_psi_keeps_the_quantile_bins_of_a_continuous_column(
    registry: Registry, tmp_path: Path
) -> None:
    x = np.random.default_rng(8).normal(size=2000)
    np.savez(tmp_path / "ref.npz", x=x)
    det = make(registry, tmp_path, {"kind": "psi", "reference": "ref.npz", "bins": 10})
    edges = det._edges["x"]  # type: ignore[attr-defined]
    assert np.array_equal(edges, np.quantile(x, np.linspace(0.0, 1.0, 11)[1:-1]))
    same = det.detect(to_columns({"x": x[:1000]}))
    expected = np.full(10, 0.1)
    actual = np.bincount(np.searchsorted(edges, x[:1000], side="right"), minlength=10) / 1000
    assert same.scores["x"] == pytest.approx(
        float(np.sum((actual - expected) * np.log(actual / expected)))
    )


# --- correction math ----------------------------------------------------------------------


def test_bonferroni() -> None:
    flags, threshold = correct([0.01, 0.02, 0.03, 0.04, 0.05], 0.05, "bonferroni")
    assert threshold == pytest.approx(0.01)
    assert flags == [True, False, False, False, False]


def test_benjamini_hochberg() -> None:
    ps = [0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205]
    flags, threshold = correct(ps, 0.05, "fdr")
    assert flags == [True, True, False, False, False, False, False, False]
    assert threshold == 0.008
    # every p-value under its step-up line: all rejected, even those above p_val / m
    flags, threshold = correct([0.05, 0.01, 0.04, 0.02, 0.03], 0.05, "fdr")
    assert flags == [True] * 5 and threshold == 0.05
    # the step-up rule: a later k rescues earlier p-values above their own line
    flags, _ = correct([0.02, 0.024, 0.9], 0.05, "fdr")
    assert flags == [True, True, False]  # 0.02 > 1/3 * 0.05 but 0.024 <= 2/3 * 0.05
    assert correct([0.5, 0.9], 0.05, "fdr") == ([False, False], 0.0)


def test_none_and_nan() -> None:
    assert correct([0.04, 0.06, math.nan], 0.05, "none") == ([True, False, False], 0.05)
    assert correct([], 0.05, "bonferroni") == ([], 0.05)
    assert correct([math.nan, 0.0], 0.05, "fdr")[0] == [False, True]


# --- bad config ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("node", "error", "message"),
    [
        ({"kind": "ks"}, ConfigError, r"detectors\.d\.reference: required key is missing"),
        ({"kind": "ks", "reference": "ref.xlsx"}, ConfigError, "unknown format"),
        ({"kind": "ks", "reference": "ref.csv", "p_val": 1.5}, ConfigError, r"d\.p_val"),
        ({"kind": "ks", "reference": "ref.csv", "correction": "holm"}, ConfigError, "correction"),
        ({"kind": "ks", "reference": "ref.csv", "pval": 0.1}, ConfigError, "pval: unknown key"),
        ({"kind": "ks", "reference": "ref.csv", "features": []}, ConfigError, "empty list"),
        ({"kind": "ks", "reference": "ref.csv", "sha256": "abc"}, ConfigError, "sha256"),
        ({"kind": "psi", "reference": "ref.csv", "bins": 1}, ConfigError, "bins"),
        ({"kind": "psi", "reference": "ref.csv", "threshold": 0}, ConfigError, "threshold"),
    ],
)
def test_config_errors(
    registry: Registry, tmp_path: Path, node: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        make(registry, tmp_path, node)


@pytest.mark.parametrize(
    ("node", "error", "message"),
    [
        (
            {"kind": "ks", "reference": "ref.csv", "features": ["amount", "nope"]},
            ConfigError,
            "'nope' not in the reference",
        ),
        (
            {"kind": "ks", "reference": "ref.csv", "features": ["amount", "channel"]},
            ConfigError,
            "'channel' is categorical in the reference",
        ),
        ({"kind": "chi2", "reference": "nums.csv"}, ConfigError, "no categorical columns"),
        ({"kind": "ks", "reference": "missing.csv"}, ModelLoadError, "not found"),
        ({"kind": "ks", "reference": "../outside.csv"}, ConfigError, "outside the model root"),
        ({"kind": "ks", "reference": "ref.csv", "sha256": "0" * 64}, ModelLoadError, "mismatch"),
        ({"kind": "ks", "reference": "objects.npz"}, ModelLoadError, "could not be read as npz"),
    ],
)
def test_start_errors(
    registry: Registry, tmp_path: Path, node: dict[str, Any], error: type[Exception], message: str
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "ref.csv").write_text("amount,channel\n1.5,pos\n2.5,online\n3,pos\n")
    (root / "nums.csv").write_text("a,b\n1,2\n3,4\n")
    (tmp_path / "outside.csv").write_text("a\n1\n2\n")
    np.savez(root / "objects.npz", x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(error, match=message):
        make(registry, root, node)


def test_pinned_reference_digest(registry: Registry, tmp_path: Path) -> None:
    (tmp_path / "ref.csv").write_text("amount\n1\n2\n3\n")
    digest = hashlib.sha256((tmp_path / "ref.csv").read_bytes()).hexdigest()
    det = make(registry, tmp_path, {"kind": "ks", "reference": "ref.csv", "sha256": digest.upper()})
    assert det.features == ["amount"]  # type: ignore[attr-defined]


def test_window_without_the_feature_raises(registry: Registry, tmp_path: Path) -> None:
    (tmp_path / "ref.csv").write_text("amount,channel\n1,pos\n2,atm\n")
    ks = make(registry, tmp_path, {"kind": "ks", "reference": "ref.csv"})
    with pytest.raises(WindowError, match="no column 'amount'"):
        ks.detect(to_columns({"other": np.zeros(3)}))
    with pytest.raises(WindowError, match="holds categories"):
        ks.detect(to_columns({"amount": np.array(["a", "b"], dtype=object)}))
    chi = make(registry, tmp_path, {"kind": "chi2", "reference": "ref.csv"})
    with pytest.raises(WindowError, match="numbers where the reference"):
        chi.detect(to_columns({"channel": np.zeros(3)}))
