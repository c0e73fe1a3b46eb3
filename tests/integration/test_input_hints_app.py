"""Through the app: a request's unknown name is a 400 whose hint lists what the client may send.

Behind a feature source that builds the model's inputs from request fields, the client never
sends the model's input names; the hint names the source's request fields instead (V1 object
rows and V2 ``inputs[].name`` alike). A plain model keeps the model's inputs in its hint.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from infercore.components import FeatureSource, Tensors, TensorSpec
from infercore.components.model import Array
from infercore.errors import InvalidInput
from infercore.hookspecs import hookimpl
from infercore.testing import app_client, fake_model_config, runtime_from_dict

ROW = [1.0, 2.0, 3.0, 4.0]


def refused(client: Any, path: str, body: dict[str, Any]) -> str:
    """The error of a 400 ``invalid_input`` (never a 5xx, never a traceback)."""
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    doc = r.json()
    assert doc["reason"] == "invalid_input", doc
    assert "Traceback" not in r.text
    error = doc["error"]
    assert isinstance(error, str)
    return error


def v2_tensor(name: str, datatype: str, data: list[Any]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": [len(data)], "data": data}


# --- a third-party source of the Feast shape --------------------------------------------------


class CardFeatures(FeatureSource):
    """``card_id`` + ``amount`` in, the fake model's ``x`` out; other fields pass on unchanged
    (the runtime, not this source, refuses the ones the model does not take)."""

    kind = "card"

    def request_inputs(self) -> list[TensorSpec]:
        return [TensorSpec("card_id", "BYTES", (-1,)), TensorSpec("amount", "FP32", (-1,))]

    async def fetch(self, fields: Mapping[str, Array], *, deadline: float) -> Tensors:
        if "card_id" not in fields or "amount" not in fields:
            raise InvalidInput("missing field 'card_id' or 'amount'")
        amount = fields["amount"].astype(np.float32).reshape(-1)
        out: Tensors = {k: v for k, v in fields.items() if k not in ("card_id", "amount")}
        out["x"] = np.stack([amount, amount, amount, amount], axis=1)
        return out


class CardPlugin:
    @hookimpl
    def register_feature_sources(self) -> list[type[FeatureSource]]:
        return [CardFeatures]


@pytest.fixture(scope="module")
def card_client() -> Iterator[Any]:
    cfg = fake_model_config()
    cfg["features"] = {"kind": "card"}
    with app_client(runtime_from_dict(cfg, extra_plugins=[("card", CardPlugin())])) as client:
        yield client


def test_behind_a_source_the_v1_objects_hint_names_the_request_fields(card_client: Any) -> None:
    good = {"card_id": "c_1", "amount": 2.0}
    r = card_client.post("/v1/models/m:predict", json={"instances": [good]})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["y"] == 8.0
    error = refused(card_client, "/v1/models/m:predict", {"instances": [dict(good, amout=2.0)]})
    assert "'amout'" in error
    assert "the request's fields are: card_id, amount" in error
    assert "the model's inputs" not in error


def test_behind_a_source_the_v2_hint_names_the_request_fields(card_client: Any) -> None:
    inputs = [v2_tensor("card_id", "BYTES", ["c_1"]), v2_tensor("amount", "FP32", [2.0])]
    r = card_client.post("/v2/models/m/infer", json={"inputs": inputs})
    assert r.status_code == 200, r.text
    body = {"inputs": [*inputs, v2_tensor("amout", "FP32", [2.0])]}
    error = refused(card_client, "/v2/models/m/infer", body)
    assert "'amout'" in error
    assert "the request's fields are: card_id, amount" in error


# --- the request source's assemble (the iris recipe's shape) ---------------------------------


@pytest.fixture(scope="module")
def assemble_client() -> Iterator[Any]:
    cfg = fake_model_config()
    cfg["features"] = {"kind": "request", "assemble": {"x": ["a", "b", "c", "d"]}}
    with app_client(runtime_from_dict(cfg)) as client:
        yield client


def test_assembled_fields_are_named_next_to_the_models_inputs(assemble_client: Any) -> None:
    instance = dict(zip("abcd", ROW, strict=True))
    error = refused(
        assemble_client, "/v1/models/m:predict", {"instances": [dict(instance, species=1.0)]}
    )
    assert "'species'" in error
    assert "the model's inputs are: x; or the fields the feature source builds them from: " in (
        error
    )
    assert "a, b, c, d" in error
    body = {"inputs": [v2_tensor("x", "FP32", ROW), v2_tensor("extra", "FP32", [1.0])]}
    body["inputs"][0]["shape"] = [1, 4]
    error = refused(assemble_client, "/v2/models/m/infer", body)
    assert "'extra'" in error and "a, b, c, d" in error


def test_a_plain_model_keeps_the_models_inputs_in_its_hint() -> None:
    with app_client(runtime_from_dict(fake_model_config())) as client:
        body = {"inputs": [v2_tensor("x", "FP32", ROW), v2_tensor("extra", "FP32", [1.0])]}
        body["inputs"][0]["shape"] = [1, 4]
        error = refused(client, "/v2/models/m/infer", body)
        assert error == "unknown input 'extra' (hint: the model's inputs are: x)"
        error = refused(client, "/v1/models/m:predict", {"inputs": {"x": [ROW], "extra": [1]}})
        assert error == "unknown input 'extra' (hint: the model's inputs are: x)"


# --- the fraud recipe: Feast between the request and the model --------------------------------

#: What a fraud request carries: the card (the entity key) and the transaction's own fields;
#: never the card features the store adds (txn_count_1h, ...), which are model inputs.
TRANSACTION_FIELDS = {
    "card_id",
    "amount",
    "hour",
    "cross_border",
    "merchant_category",
    "channel",
    "country",
}


def hinted(error: str) -> set[str]:
    """The names listed after the hint's last colon."""
    assert "(hint: " in error, error
    listed = error.rsplit("(hint: ", 1)[1].rstrip(")").rsplit(": ", 1)[1]
    return set(listed.split(", "))


def test_the_fraud_recipes_hints_name_the_transaction_fields(tmp_path: Path) -> None:
    pytest.importorskip("infercore_feast")
    pytest.importorskip("infercore_onnx")
    from infercore.config.compose import compose
    from infercore.runtime import Runtime

    # The store in tmp_path: applied and materialized afresh, the developer's data/ untouched.
    runtime = Runtime(
        compose(
            [
                "+recipe=fraud",
                f"++features.registry_path={tmp_path / 'registry.db'}",
                f"++features.sqlite_path={tmp_path / 'online_store.db'}",
            ]
        )
    )
    good = {
        "card_id": "c_000042",
        "amount": 12.5,
        "hour": 3,
        "cross_border": 0,
        "merchant_category": "grocery",
        "channel": "online",
    }
    with app_client(runtime) as client:
        r = client.post("/v1/models/fraud:predict", json={"instances": [good]})
        assert r.status_code == 200, r.text
        typo = {("amout" if k == "amount" else k): v for k, v in good.items()}
        error = refused(client, "/v1/models/fraud:predict", {"instances": [typo]})
        assert "'amout'" in error and hinted(error) == TRANSACTION_FIELDS
        for values in ({"instances": [[12.5, 3, 0]]}, {"inputs": [[12.5, 3, 0]]}):
            error = refused(client, "/v1/models/fraud:predict", values)
            assert "several inputs" in error and "GET /v2/models/" in error
            # The fields to key them by, not the model's fifteen inputs.
            listed = error.split("the request's fields are: ", 1)[1].split(";", 1)[0]
            assert set(listed.split(", ")) == TRANSACTION_FIELDS
        inputs = [
            v2_tensor(k, "BYTES" if isinstance(v, str) else "FP32", [v]) for k, v in typo.items()
        ]
        error = refused(client, "/v2/models/fraud/infer", {"inputs": inputs})
        assert "'amout'" in error and hinted(error) == TRANSACTION_FIELDS
        # The names the hints list are the ones the model's metadata tells a client to send.
        listed = {i["name"] for i in client.get("/v2/models/fraud").json()["inputs"]}
        assert listed == TRANSACTION_FIELDS
