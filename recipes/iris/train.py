"""Train the iris recipe's classifier and export it to ONNX and skops.

Deterministic: a fixed random_state, all 150 rows of scikit-learn's bundled iris data (no
download), a fixed ONNX opset and fixed ONNX metadata, so two runs with the same locked
dependencies write a byte-identical ``model.onnx``. (``model.skops`` is not byte-identical
across runs: skops names its arrays after object ids. Its predictions are.)

Usage::

    uv run python recipes/iris/train.py [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import skops.io as sio
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType, Int64TensorType
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

RANDOM_STATE = 0
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
CLASS_NAMES = ["setosa", "versicolor", "virginica"]
N_FEATURES = 4
DEFAULT_OUT = Path(__file__).resolve().parent / "artifacts"
ARTIFACTS = ("metrics.json", "model.onnx", "model.skops")


def train() -> tuple[Pipeline, float]:
    """Fit StandardScaler + LogisticRegression on all of iris; return it and its accuracy."""
    x, y = load_iris(return_X_y=True)
    model = Pipeline(
        [
            ("scaler", StandardScaler()),
            ("classifier", LogisticRegression(max_iter=1000, random_state=RANDOM_STATE)),
        ]
    )
    model.fit(x, y)
    return model, float(model.score(x, y))


def export_onnx(model: Pipeline) -> bytes:
    """The model as ONNX: input ``input`` float [N, 4]; outputs ``label`` int64 [N] and
    ``probabilities`` float [N, 3] (plain tensors, no ZipMap)."""
    classifier = model.named_steps["classifier"]
    onx: Any = to_onnx(
        model,
        initial_types=[("input", FloatTensorType([None, N_FEATURES]))],
        final_types=[
            ("label", Int64TensorType([None])),
            ("probabilities", FloatTensorType([None, len(CLASS_NAMES)])),
        ],
        options={id(classifier): {"zipmap": False}},
        target_opset=TARGET_OPSET,
    )
    # Every field skl2onnx leaves to chance or to defaults is set here, so the bytes depend
    # only on the weights and the locked versions.
    onx.graph.name = "iris"
    onx.doc_string = "infercore iris recipe: StandardScaler + LogisticRegression on iris"
    onx.model_version = 1
    # skl2onnx collects opset imports in a set, so their order follows PYTHONHASHSEED.
    opsets = sorted({(o.domain, o.version) for o in onx.opset_import})
    del onx.opset_import[:]
    for domain, version in opsets:
        entry = onx.opset_import.add()
        entry.domain, entry.version = domain, version
    del onx.metadata_props[:]
    for key, value in (("class_names", ",".join(CLASS_NAMES)), ("input", "input")):
        prop = onx.metadata_props.add()
        prop.key, prop.value = key, value
    outputs = [o.name for o in onx.graph.output]
    if outputs != ["label", "probabilities"]:
        raise SystemExit(f"unexpected ONNX outputs {outputs}; expected label, probabilities")
    onnx.checker.check_model(onx, full_check=True)
    data: bytes = onx.SerializeToString(deterministic=True)
    return data


def metrics(accuracy: float) -> dict[str, Any]:
    iris = load_iris()
    return {
        "dataset": "sklearn.datasets.load_iris (150 rows, all used for training)",
        "estimator": "StandardScaler + LogisticRegression",
        "random_state": RANDOM_STATE,
        "train_accuracy": round(accuracy, 6),
        "class_names": {str(i): name for i, name in enumerate(CLASS_NAMES)},
        "feature_names": list(iris.feature_names),
        "onnx_opset": TARGET_OPSET,
        "versions": {
            name: md.version(name) for name in ("scikit-learn", "skl2onnx", "onnx", "skops")
        },
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    model, accuracy = train()
    iris_names = list(load_iris().target_names)
    if iris_names != CLASS_NAMES:
        raise SystemExit(f"iris class names changed: {iris_names}")
    if not np.array_equal(model.classes_, np.arange(len(CLASS_NAMES))):
        raise SystemExit(f"unexpected classes {model.classes_}")

    (out / "model.onnx").write_bytes(export_onnx(model))
    sio.dump(model, out / "model.skops")
    (out / "metrics.json").write_text(json.dumps(metrics(accuracy), indent=2) + "\n")
    sums = [f"{sha256(out / name)}  {name}" for name in ARTIFACTS]
    (out / "SHA256SUMS").write_text("\n".join(sums) + "\n")

    print(f"train accuracy {accuracy:.4f}; wrote to {out}:")
    for name in (*ARTIFACTS, "SHA256SUMS"):
        print(f"  {name:<13} {(out / name).stat().st_size:>7} bytes")
    for line in sums:
        print(f"  sha256 {line}")


if __name__ == "__main__":
    main()
