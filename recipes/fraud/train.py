"""Train the ``fraud`` recipe's two models and export them to ONNX, reproducibly.

* ``v1`` (champion): logistic regression on the transaction fields and three card features.
* ``v2`` (challenger): gradient-boosted trees on every request field and card feature.

Time-based split: train on the transactions before ``features.split_time`` (the first 80 % of
the days), test on the rest. Card features are the point-in-time ones of ``features.py`` (the
card's Feast snapshot as of its previous transaction, defaults for a card with no history).

Every model input is a request field or a Feast feature, one ONNX input per feature, shape
[None, 1]: FP32 for numbers, string for categories. Categories go through a one-hot encoder that
ignores unknown values: a category never seen in training encodes as all zeros. Outputs are
``label`` (int64 [N]) and ``probabilities`` (float32 [N, 2], column 1 = fraud).

    uv run python recipes/fraud/train.py --data recipes/fraud/data --out recipes/fraud/artifacts

Running it twice on the same data writes the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from features import (  # noqa: E402
    CARD_FEATURES,
    REQUEST_CATEGORICAL,
    REQUEST_NUMERIC,
    load_defaults,
    point_in_time_features,
    split_time,
    write_parquet,
)

Array = NDArray[Any]
SEED = 0
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
RECALL_TARGET = 0.8
REFERENCE_ROWS = 2_000

V1_FEATURES = (
    "amount",
    "hour",
    "cross_border",
    "merchant_category",
    "channel",
    "txn_count_1h",
    "txn_count_24h",
    "amount_avg_7d",
)
V2_FEATURES = (*REQUEST_NUMERIC, *REQUEST_CATEGORICAL, *CARD_FEATURES)
CATEGORICAL = frozenset(REQUEST_CATEGORICAL)


def model_frame(pit: pd.DataFrame, features: Sequence[str]) -> pd.DataFrame:
    """Model inputs as the server will pass them: float32 numbers, str categories."""
    cols: dict[str, Any] = {}
    for f in features:
        if f in CATEGORICAL:
            cols[f] = pit[f].astype(str).to_numpy(dtype=object)
        else:
            cols[f] = pit[f].to_numpy().astype(np.float32)
    return pd.DataFrame(cols)


def _one_hot() -> Any:
    from sklearn.preprocessing import OneHotEncoder

    return OneHotEncoder(handle_unknown="ignore", sparse_output=False, dtype=np.float32)


def build_v1() -> Any:
    """Logistic regression; amounts and hour binned (the model is linear in the bins)."""
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import KBinsDiscretizer, StandardScaler

    cats = [f for f in V1_FEATURES if f in CATEGORICAL]
    binned = ["amount", "hour", "amount_avg_7d"]
    scaled = [f for f in V1_FEATURES if f not in CATEGORICAL and f not in binned]
    pre = ColumnTransformer(
        [
            ("cat", _one_hot(), cats),
            (
                "bins",
                KBinsDiscretizer(
                    n_bins=12,
                    encode="onehot-dense",
                    strategy="quantile",
                    quantile_method="averaged_inverted_cdf",
                ),
                binned,
            ),
            ("num", StandardScaler(), scaled),
        ]
    )
    clf = LogisticRegression(C=1.0, max_iter=2_000)
    return Pipeline([("pre", pre), ("clf", clf)])


def build_v2() -> Any:
    """Gradient-boosted trees on one-hot categories and raw numbers (capped in size).

    GradientBoostingClassifier rather than HistGradientBoostingClassifier: skl2onnx 1.20's
    converter for the latter writes a Python bool into an int attribute, which protobuf 7
    rejects ("Expected an int, got a boolean").
    """
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.pipeline import Pipeline

    cats = [f for f in V2_FEATURES if f in CATEGORICAL]
    nums = [f for f in V2_FEATURES if f not in CATEGORICAL]
    pre = ColumnTransformer([("cat", _one_hot(), cats), ("num", "passthrough", nums)])
    clf = GradientBoostingClassifier(
        learning_rate=0.1,
        n_estimators=100,
        max_depth=4,
        min_samples_leaf=40,
        subsample=0.5,
        random_state=SEED,
    )
    return Pipeline([("pre", pre), ("clf", clf)])


def to_onnx(pipe: Any, features: Sequence[str], name: str) -> bytes:
    """Export with one input per feature and plain tensor outputs; bytes are deterministic."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType

    types = [
        (f, StringTensorType([None, 1]) if f in CATEGORICAL else FloatTensorType([None, 1]))
        for f in features
    ]
    clf = pipe.steps[-1][1]
    onx = convert_sklearn(
        pipe,
        name=name,
        initial_types=types,
        target_opset=TARGET_OPSET,
        options={id(clf): {"zipmap": False}},
    )
    onx.doc_string = ""
    # skl2onnx collects opset imports in a set: their order follows str hashing, which Python
    # salts per process. Sort them so that the bytes do not depend on PYTHONHASHSEED.
    opsets = sorted((o.domain, o.version) for o in onx.opset_import)
    del onx.opset_import[:]
    for domain, version in opsets:
        onx.opset_import.add(domain=domain, version=version)
    return bytes(onx.SerializeToString(deterministic=True))


def onnx_proba(model: bytes, x: pd.DataFrame) -> Array:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    feeds = {
        i.name: x[i.name]
        .to_numpy()
        .reshape(-1, 1)
        .astype(object if i.type == "tensor(string)" else np.float32)
        for i in sess.get_inputs()
    }
    _, proba = sess.run(["label", "probabilities"], feeds)
    return np.asarray(proba)[:, 1]


def scores(y: Array, p: Array) -> dict[str, float]:
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    precision, recall, thresholds = precision_recall_curve(y, p)
    # the highest threshold whose recall still reaches the target
    ok = np.flatnonzero(recall[:-1] >= RECALL_TARGET)
    i = int(ok[-1])
    return {
        "roc_auc": round(float(roc_auc_score(y, p)), 4),
        "pr_auc": round(float(average_precision_score(y, p)), 4),
        f"precision_at_recall_{RECALL_TARGET}": round(float(precision[i]), 4),
        "recall_at_that_threshold": round(float(recall[i]), 4),
        f"threshold_at_recall_{RECALL_TARGET}": round(float(thresholds[i]), 6),
        "alerts_per_1000_at_that_threshold": round(float((p >= thresholds[i]).mean() * 1000), 2),
    }


def input_spec(features: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for f in features:
        cat = f in CATEGORICAL
        out.append(
            {
                "name": f,
                "datatype": "BYTES" if cat else "FP32",
                "onnx_type": "tensor(string)" if cat else "tensor(float)",
                "shape": [-1, 1],
                "source": "feast" if f in CARD_FEATURES else "request",
            }
        )
    return out


def write_sums(out: Path) -> None:
    """SHA256SUMS for ``sha256sum -c`` run inside ``out``."""
    names = ["feature_defaults.json", "reference.parquet"]
    names += [f"{v}/{f}" for v in ("v1", "v2") for f in ("model.onnx", "metrics.json")]
    lines = [
        f"{hashlib.sha256((out / n).read_bytes()).hexdigest()}  {n}"
        for n in sorted(names)
        if (out / n).exists()
    ]
    (out / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def _check_exporter() -> None:
    try:
        import skl2onnx  # noqa: F401
    except AttributeError as e:  # onnx >= 1.18 with ml_dtypes < 0.5
        raise SystemExit(
            f"train: cannot import skl2onnx/onnx ({e}). onnx needs ml_dtypes >= 0.5; until the "
            "lock provides it, run: uv run --with 'ml-dtypes==0.5.4' python "
            "recipes/fraud/build.py"
        ) from e


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=HERE / "data")
    p.add_argument("--out", type=Path, default=HERE / "artifacts")
    p.add_argument("--defaults", type=Path, default=None, help="default: OUT/feature_defaults.json")
    a = p.parse_args(argv)
    _check_exporter()
    t0 = time.perf_counter()

    tx = pd.read_parquet(a.data / "transactions.parquet")
    defaults = load_defaults(a.defaults or a.out / "feature_defaults.json")
    pit = point_in_time_features(tx, defaults)
    cut = split_time(tx)
    train_mask = (pit["event_timestamp"] < cut).to_numpy()
    y = pit["is_fraud"].to_numpy().astype(np.int64)
    y_train, y_test = y[train_mask], y[~train_mask]
    split = {
        "test_from": cut.isoformat(),
        "train_rows": int(train_mask.sum()),
        "test_rows": int((~train_mask).sum()),
        "train_fraud_rate": round(float(y_train.mean()), 5),
        "test_fraud_rate": round(float(y_test.mean()), 5),
        "train_fraud_rows": int(y_train.sum()),
        "test_fraud_rows": int(y_test.sum()),
    }
    print(
        f"train: {split['train_rows']:,} train rows ({split['train_fraud_rate']:.2%} fraud), "
        f"{split['test_rows']:,} test rows ({split['test_fraud_rate']:.2%} fraud), "
        f"test from {cut} ({time.perf_counter() - t0:.1f} s)",
        flush=True,
    )

    for version, features, build, estimator in (
        ("v1", V1_FEATURES, build_v1, "LogisticRegression"),
        ("v2", V2_FEATURES, build_v2, "GradientBoostingClassifier"),
    ):
        t1 = time.perf_counter()
        x = model_frame(pit, features)
        x_train, x_test = x[train_mask], x[~train_mask]
        pipe = build().fit(x_train, y_train)
        model = to_onnx(pipe, features, f"fraud_{version}")
        p_onnx = onnx_proba(model, x_test)
        p_skl = pipe.predict_proba(x_test)[:, 1]
        test = scores(y_test, p_onnx)
        diff = float(f"{np.abs(p_onnx - p_skl).max():.1e}")
        metrics: dict[str, Any] = {
            "model": "fraud",
            "version": version,
            "estimator": estimator,
            "inputs": input_spec(features),
            "outputs": [
                {"name": "label", "datatype": "INT64", "shape": [-1]},
                {
                    "name": "probabilities",
                    "datatype": "FP32",
                    "shape": [-1, 2],
                    "columns": ["not_fraud", "fraud"],
                },
            ],
            "unknown_category": "encoded as all zeros (OneHotEncoder handle_unknown='ignore')",
            "target_opset": TARGET_OPSET,
            "split": split,
            "test": test,
            "train": {"roc_auc": scores(y_train, onnx_proba(model, x_train))["roc_auc"]},
            "onnx_vs_sklearn_max_abs_diff": diff,
            "model_bytes": len(model),
        }
        out = a.out / version
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.onnx").write_bytes(model)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        t = test
        print(
            f"train: {version} {estimator}: ROC-AUC {t['roc_auc']:.4f}, PR-AUC {t['pr_auc']:.4f}, "
            f"precision@recall0.8 {t['precision_at_recall_0.8']:.4f} "
            f"(threshold {t['threshold_at_recall_0.8']:.4f}), {len(model) / 1e3:.0f} kB, "
            f"onnx-vs-sklearn {diff:.1e} "
            f"({time.perf_counter() - t1:.1f} s)",
            flush=True,
        )

    # drift reference: a seeded sample of the training inputs of the widest model, raw values
    x_train = model_frame(pit[train_mask], V2_FEATURES)
    rng = np.random.default_rng(SEED)
    rows = np.sort(rng.choice(len(x_train), size=min(REFERENCE_ROWS, len(x_train)), replace=False))
    ref_path = a.out / "reference.parquet"
    write_parquet(x_train.iloc[rows].reset_index(drop=True), ref_path)
    write_sums(a.out)
    print(f"train: artifacts -> {a.out} ({time.perf_counter() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
