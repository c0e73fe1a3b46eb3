"""The iris recipe's committed artifacts: reproducible from train.py, and ONNX agrees with skops."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_iris

from infercore.components import ComponentContext
from infercore_sklearn import SklearnModel

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("skl2onnx")

RECIPE = Path(__file__).resolve().parents[3] / "recipes" / "iris"
ARTIFACTS = RECIPE / "artifacts"


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("iris")
    result = subprocess.run(
        [sys.executable, str(RECIPE / "train.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "model.onnx" in result.stdout
    return out


def test_committed_sha256sums_match_the_committed_files() -> None:
    lines = (ARTIFACTS / "SHA256SUMS").read_text().splitlines()
    sums = {name: digest for digest, name in (line.split("  ", 1) for line in lines)}
    assert set(sums) == {"metrics.json", "model.onnx", "model.skops"}
    for name, expected in sums.items():
        assert hashlib.sha256((ARTIFACTS / name).read_bytes()).hexdigest() == expected, name


def test_train_script_rebuilds_a_byte_identical_onnx_model(rebuilt: Path) -> None:
    assert (rebuilt / "model.onnx").read_bytes() == (ARTIFACTS / "model.onnx").read_bytes(), (
        "recipes/iris/train.py no longer reproduces the committed model.onnx; if a dependency "
        "upgrade changed it on purpose, rebuild with `uv run python recipes/iris/train.py`"
    )
    committed = json.loads((ARTIFACTS / "metrics.json").read_text())
    fresh = json.loads((rebuilt / "metrics.json").read_text())
    assert fresh["train_accuracy"] == committed["train_accuracy"]
    assert committed["class_names"] == {"0": "setosa", "1": "versicolor", "2": "virginica"}
    assert committed["train_accuracy"] > 0.9


def test_onnx_signature() -> None:
    session = ort.InferenceSession(
        str(ARTIFACTS / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    assert [(i.name, i.shape, i.type) for i in session.get_inputs()] == [
        ("input", [None, 4], "tensor(float)")
    ]
    assert [(o.name, o.shape, o.type) for o in session.get_outputs()] == [
        ("label", [None], "tensor(int64)"),
        ("probabilities", [None, 3], "tensor(float)"),
    ]


def test_onnx_and_skops_models_agree() -> None:
    x, _ = load_iris(return_X_y=True)
    session = ort.InferenceSession(
        str(ARTIFACTS / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    label, proba = session.run(["label", "probabilities"], {"input": x.astype(np.float32)})

    model = SklearnModel(
        SklearnModel.Config(path="model.skops"),
        ComponentContext("models.iris.versions.1.loader", ARTIFACTS, model_name="iris"),
    )
    asyncio.run(model.start())
    expected = asyncio.run(model.predict({"input": x}))

    assert label.shape == (150,) and proba.shape == (150, 3)
    np.testing.assert_array_equal(np.argmax(proba, axis=1), label)
    np.testing.assert_array_equal(label, expected["label"])
    np.testing.assert_allclose(proba, expected["probabilities"], rtol=0, atol=1e-5)
