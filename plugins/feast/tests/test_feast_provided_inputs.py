"""Which model inputs the ``feast`` source builds (``FeatureSource.provided_inputs``), and a
model whose input no ``features.inputs`` entry provides.

The QA report's case: the fraud recipe without its ``channel`` input started, reported ready,
and answered every request 400. The runtime refuses such a version once it has loaded (its
inputs are known then), at start-up and on every reload.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from feast_test_support import INPUTS, card, make_source, run

from infercore.builtins.features import RequestFeatureSource, RequestFeatureSourceConfig
from infercore.components import ComponentContext, FeatureSource, Tensors
from infercore.components.model import Array
from infercore.errors import ConfigError
from infercore.testing import async_app_client, runtime_from_dict

REPO = Path(__file__).resolve().parents[3]
V1_MODEL = REPO / "recipes" / "fraud" / "artifacts" / "v1" / "model.onnx"


def test_the_feast_source_builds_its_inputs_or_its_matrix(model_root: Path) -> None:
    assert make_source(model_root).provided_inputs() == {i["name"] for i in INPUTS}
    matrix = make_source(model_root, layout="matrix", matrix_input="x")
    assert matrix.provided_inputs() == {"x"}


def test_sources_that_pass_request_tensors_through_cannot_know() -> None:
    class ThirdParty(FeatureSource):
        kind = "third_party"

        async def fetch(self, fields: Mapping[str, Array], *, deadline: float) -> Tensors:
            return dict(fields)

    ctx = ComponentContext("features", Path("."))
    assert ThirdParty(None, ctx).provided_inputs() is None  # the safe default
    request = RequestFeatureSource(RequestFeatureSourceConfig(assemble={"x": ["a", "b"]}), ctx)
    assert request.provided_inputs() is None


# -- the fraud model (ONNX, v1) behind the source, on the fixture's Feast store -----------------


def recipe_inputs(*, without: str | None = None) -> list[dict[str, Any]]:
    """``features.inputs`` of recipes/fraud.yaml, less one entry."""
    recipe = yaml.safe_load((REPO / "recipes" / "fraud.yaml").read_text())
    inputs = recipe["features"]["inputs"]
    assert any(i["name"] == "channel" for i in inputs)
    return [dict(i) for i in inputs if i["name"] != without]


def fraud_runtime(model_root: Path, inputs: list[dict[str, Any]]) -> Any:
    target = model_root / "fraud" / "artifacts" / "v1" / "model.onnx"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(V1_MODEL, target)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    features = {
        "kind": "feast",
        "repo": "fraud/feature_repo",
        "project": "fraud",
        "entity": {"field": "card_id", "join_key": "card_id"},
        "inputs": inputs,
    }
    loader = {"kind": "onnx", "path": "fraud/artifacts/v1/model.onnx", "sha256": digest}
    return runtime_from_dict(
        {
            "model_root": str(model_root),
            "features": features,
            "models": {"fraud": {"versions": {"1": {"loader": loader}}}},
        }
    )


TRANSACTION = {
    "card_id": card(3),
    "amount": 23.5,
    "hour": 14,
    "cross_border": 0,
    "merchant_category": "grocery",
    "channel": "pos",
}


def test_with_every_input_provided_the_fraud_model_serves(model_root: Path) -> None:
    """The set-up of the refusal below is sound: with ``channel`` the same runtime serves."""
    rt = fraud_runtime(model_root, recipe_inputs())

    async def scenario() -> tuple[int, Any]:
        async with async_app_client(rt) as client:
            r = await client.post("/v1/models/fraud:predict", json={"instances": [TRANSACTION]})
            return r.status_code, r.json()

    status, body = run(scenario())
    assert status == 200, body
    assert rt.models["fraud"].features.provided_inputs() >= {"channel", "amount"}


def test_a_model_input_no_feature_source_entry_provides_fails_start_up(model_root: Path) -> None:
    """Not ready with every request a 400: start-up fails with one line naming the input."""
    rt = fraud_runtime(model_root, recipe_inputs(without="channel"))

    async def start() -> None:
        try:
            await rt.start()
        finally:
            await rt.stop()

    with pytest.raises(ConfigError, match=r"models\.fraud\.versions\.1: .*'channel'") as info:
        run(start())
    assert "feature source" in str(info.value)
    assert "\n" not in str(info.value)
    assert not rt.models["fraud"].ready
