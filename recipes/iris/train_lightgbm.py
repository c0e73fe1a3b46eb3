"""Train the iris recipe's LightGBM variant and save it in LightGBM's text model format.

Deterministic: all 150 rows of scikit-learn's bundled iris data (no download), fixed
parameters, one thread and LightGBM's ``deterministic`` mode, so two runs with the same locked
LightGBM write a byte-identical ``model.lgb.txt``. The text format is LightGBM's own: loading
it runs no code from the file (unlike a pickle).

Usage::

    uv run python recipes/iris/train_lightgbm.py [--out DIR]
    infercore serve +recipe=iris_lightgbm
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any

import lightgbm
import numpy as np
from sklearn.datasets import load_iris

FEATURE_NAMES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
CLASS_NAMES = ["setosa", "versicolor", "virginica"]
DEFAULT_OUT = Path(__file__).resolve().parent / "artifacts"
ARTIFACT = "model.lgb.txt"
ROUNDS = 10
PARAMS: dict[str, Any] = {
    "objective": "multiclass",
    "num_class": len(CLASS_NAMES),
    "num_leaves": 4,
    "learning_rate": 0.3,
    "min_data_in_leaf": 5,
    "seed": 0,
    "deterministic": True,
    "force_col_wise": True,
    "num_threads": 1,
    "verbose": -1,
}


def train() -> tuple[lightgbm.Booster, float]:
    """Fit the booster on all of iris; return it and its training accuracy."""
    x, y = load_iris(return_X_y=True)
    data = lightgbm.Dataset(x, y, feature_name=FEATURE_NAMES, free_raw_data=False)
    booster = lightgbm.train(PARAMS, data, num_boost_round=ROUNDS)
    accuracy = float(np.mean(np.argmax(booster.predict(x), axis=1) == y))
    return booster, accuracy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    booster, accuracy = train()
    path = out / ARTIFACT
    path.write_text(booster.model_to_string(), encoding="utf-8")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    print(f"train accuracy {accuracy:.4f}; wrote {path} ({path.stat().st_size} bytes)")
    print(f"sha256 {digest}  {ARTIFACT}")


if __name__ == "__main__":
    main()
