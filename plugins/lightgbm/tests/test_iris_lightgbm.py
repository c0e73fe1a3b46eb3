"""The iris recipe's LightGBM variant: reproducible artifact, pinned digest, served end to end."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.datasets import load_iris

from infercore.config.compose import compose
from infercore.runtime import Runtime
from infercore.testing import app_client

REPO = Path(__file__).resolve().parents[3]
RECIPES = REPO / "recipes"
ARTIFACT = RECIPES / "iris" / "artifacts" / "model.lgb.txt"
OVERRIDE = "models.iris.versions.1.loader={kind: lightgbm, path: iris/artifacts/model.lgb.txt}"


@pytest.fixture(autouse=True)
def _only_this_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    # Whatever else is installed, these tests see the built-ins and infercore-lightgbm.
    monkeypatch.setenv("INFERCORE_LOAD_PLUGINS", "lightgbm")
    monkeypatch.delenv("INFERCORE_DISABLE_PLUGINS", raising=False)
    for name in ("INFERCORE_RECIPES_DIR", "INFERCORE_CONF_DIR"):
        monkeypatch.delenv(name, raising=False)


def test_the_training_script_rebuilds_the_committed_model(tmp_path: Path) -> None:
    script = RECIPES / "iris" / "train_lightgbm.py"
    result = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "model.lgb.txt").read_bytes() == ARTIFACT.read_bytes(), (
        "recipes/iris/train_lightgbm.py no longer reproduces model.lgb.txt; if a LightGBM "
        "upgrade changed it on purpose, rebuild it and re-pin sha256 in recipes/iris_lightgbm.yaml"
    )
    accuracy = float(re.search(r"train accuracy (\S+);", result.stdout).group(1))  # type: ignore[union-attr]
    assert accuracy > 0.95


def test_the_recipe_pins_the_committed_digest() -> None:
    recipe = yaml.safe_load((RECIPES / "iris_lightgbm.yaml").read_text())
    loader = recipe["models"]["iris"]["versions"]["1"]["loader"]
    assert loader["kind"] == "lightgbm"
    assert loader["sha256"] == hashlib.sha256(ARTIFACT.read_bytes()).hexdigest()
    assert ARTIFACT.stat().st_size < 64 * 1024


def test_the_artifact_is_a_text_model_not_a_pickle() -> None:
    head = ARTIFACT.read_text().splitlines()[:8]
    assert head[0] == "tree"
    assert "objective=multiclass num_class:3" in head
    assert "feature_names=sepal_length sepal_width petal_length petal_width" in head


@pytest.mark.parametrize(
    "overrides",
    [["+recipe=iris_lightgbm"], ["+recipe=iris", OVERRIDE]],
    ids=["recipe", "override"],
)
def test_served_end_to_end(overrides: list[str]) -> None:
    composed = compose(overrides, recipes_dir=RECIPES)
    runtime = Runtime(composed)
    loader = composed.config.models["iris"].versions["1"].loader
    assert loader["kind"] == "lightgbm"
    x, y = load_iris(return_X_y=True)
    with app_client(runtime) as client:
        assert client.get("/v2/health/ready").status_code == 200
        body = {
            "inputs": [
                {
                    "name": "input",
                    "shape": [len(x), 4],
                    "datatype": "FP32",
                    "data": x.astype(np.float32).ravel().tolist(),
                }
            ]
        }
        response = client.post("/v2/models/iris/infer", json=body)
        assert response.status_code == 200, response.text
        outputs = {o["name"]: o for o in response.json()["outputs"]}
        labels = np.array(outputs["label"]["data"])
        assert float(np.mean(labels == y)) > 0.95
        assert outputs["probabilities"]["shape"] == [len(x), 3]

        named = {"sepal_length": 6.7, "sepal_width": 3.0, "petal_length": 5.2, "petal_width": 2.3}
        v1 = client.post("/v1/models/iris:predict", json={"instances": [named]})
        assert v1.status_code == 200, v1.text
        (prediction,) = v1.json()["predictions"]
        assert prediction["label"] == 2  # virginica
        assert len(prediction["probabilities"]) == 3


def test_the_cli_validates_the_recipe() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "infercore.cli", "config", "validate", "+recipe=iris_lightgbm"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: recipe=iris_lightgbm, 1 model(s)")
