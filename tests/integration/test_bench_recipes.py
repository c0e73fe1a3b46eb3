"""The benchmark's own recipe (``benchmarks/recipes/fraud_model.yaml``) serves what it is sent.

``bench.py fraud-model`` sends the fraud champion every input in the request; infercore must
answer each body with the model's own probability (MLServer, the peer, runs the same file).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from infercore.config.compose import compose
from infercore.runtime import Runtime
from infercore.testing import app_client

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench  # noqa: E402

ort = pytest.importorskip("onnxruntime")


def test_the_fraud_model_recipe_answers_the_benchmark_bodies_as_the_model_does() -> None:
    recipe = bench.RECIPES["fraud-model"]
    bodies = bench.fraud_model_bodies(40)
    composed = compose([f"+recipe={recipe.recipe}"], recipes_dir=REPO / str(recipe.recipes_dir))
    session = ort.InferenceSession(
        str(REPO / "recipes/fraud/artifacts/v1/model.onnx"), providers=["CPUExecutionProvider"]
    )
    with app_client(Runtime(composed)) as client:
        for body in bodies:
            r = client.post(f"/v2/models/{recipe.model}/infer", content=body)
            assert r.status_code == 200, r.text
            outputs = {o["name"]: o for o in r.json()["outputs"]}
            feed = {
                i["name"]: np.array(
                    i["data"], np.float32 if i["datatype"] == "FP32" else object
                ).reshape(i["shape"])
                for i in json.loads(body)["inputs"]
            }
            expected = session.run(["probabilities"], feed)[0][0, 1]
            assert outputs["fraud_probability"]["data"][0] == pytest.approx(expected, rel=1e-6)
            assert outputs["is_fraud"]["data"][0] == bool(expected >= 0.0211)
