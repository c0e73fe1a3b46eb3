"""Protocol edges through the app: NaN in binary, timeouts' wording, what is resolved first.

* NaN and infinities in a binary input: JSON cannot carry them (a 400), and binary was let
  through to any model (iris answered label 0 with null probabilities). DESIGN's table: "NaN
  where not allowed" is a 400 naming the field. A model allows them by saying so
  (``accepts_non_finite``, as an estimator that reads NaN as a missing value would).
* ``parameters.timeout: 1`` (a microsecond) was reported as "within 0 ms".
* ``X-Infercore-Timeout-Ms`` past its bound said only "over 0".
* A body was validated before the version: ``versions/9`` with a bad body was a 400, with a
  good one a 404. ``GET`` on V1's ``:predict`` was "unknown model 'm:predict'".
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
import pytest

from infercore.components import Model
from infercore.hookspecs import hookimpl
from infercore.testing import FakeModel, app_client, fake_model_config, runtime_from_dict

ROW = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


class MissingValuesModel(FakeModel):
    """The fake model, saying that NaN and infinities are its to handle."""

    kind = "fake_missing"
    accepts_non_finite = True


class MissingValuesPlugin:
    @hookimpl
    def register_model_loaders(self) -> list[type[Model]]:
        return [MissingValuesModel]


def client_for(kind: str = "fake") -> Any:
    cfg = fake_model_config(versions={"1": {"loader": {"kind": kind}}})
    plugins = [("missing", MissingValuesPlugin())]
    return app_client(runtime_from_dict(cfg, extra_plugins=plugins))


def post_binary(client: Any, arr: np.ndarray[Any, Any]) -> Any:
    tensor = {"name": "x", "shape": list(arr.shape), "datatype": "FP32"}
    tensor["parameters"] = {"binary_data_size": arr.nbytes}
    head = msgspec.json.encode({"inputs": [tensor]})
    return client.post(
        "/v2/models/m/infer",
        content=head + arr.astype("<f4").tobytes(),
        headers={
            "content-type": "application/octet-stream",
            "inference-header-content-length": str(len(head)),
        },
    )


# --- NaN ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "what"), [(np.nan, "NaN"), (-np.inf, "-Infinity")])
def test_binary_nan_is_a_400_naming_the_input_for_a_model_that_does_not_accept_it(
    value: float, what: str
) -> None:
    with client_for() as client:
        arr = np.ones((2, 4), np.float32)
        arr[1, 2] = value
        r = post_binary(client, arr)
        assert r.status_code == 400, r.text
        doc = r.json()
        assert doc["reason"] == "invalid_input"
        assert doc["error"].startswith(
            f"input 'x': element [1, 2] is {what}, which this model does not accept"
        )
        assert post_binary(client, np.ones((2, 4), np.float32)).status_code == 200
        assert client.post("/v2/models/m/infer", json=ROW).status_code == 200


def test_a_model_that_accepts_non_finite_values_gets_them() -> None:
    with client_for("fake_missing") as client:
        arr = np.ones((1, 4), np.float32)
        arr[0, 0] = np.nan
        r = post_binary(client, arr)
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["data"] == [None]  # NaN out: null (P15)


# --- timeouts -------------------------------------------------------------------------------


def test_a_sub_millisecond_timeout_is_reported_as_such() -> None:
    slow = fake_model_config(
        versions={"1": {"loader": {"kind": "fake", "latency_s": 0.05}, "warmup": False}}
    )
    with app_client(runtime_from_dict(slow)) as client:
        r = client.post("/v2/models/m/infer", json={**ROW, "parameters": {"timeout": 1}})
        assert r.status_code == 504, r.text
        assert r.json()["error"].startswith("request did not finish within 0.001 ms")


def test_a_timeout_header_past_its_bound_states_the_bound() -> None:
    with client_for() as client:
        r = client.post(
            "/v2/models/m/infer", json=ROW, headers={"X-Infercore-Timeout-Ms": "1000000000000"}
        )
        assert r.status_code == 400
        assert "expected milliseconds over 0 and under 1e9" in r.json()["error"]


# --- what is resolved first -----------------------------------------------------------------


@pytest.mark.parametrize("body", [{"inputs": []}, ROW, {"not": "v2"}])
def test_an_unknown_version_is_404_whatever_the_body(body: dict[str, Any]) -> None:
    with client_for() as client:
        r = client.post("/v2/models/m/versions/9/infer", json=body)
        assert r.status_code == 404, r.text
        assert r.json() == {
            "error": "model 'm' has no version '9' (hint: versions: 1)",
            "reason": "model_not_found",
        }


def test_a_version_not_ready_is_503_whatever_the_body() -> None:
    cfg = fake_model_config(
        versions={
            "1": {"loader": {"kind": "fake"}},
            "2": {"loader": {"kind": "fake", "fail_load": True}, "stage": "candidate"},
        }
    )
    cfg["models"]["m"]["primary"] = "1"
    with app_client(runtime_from_dict(cfg)) as client:
        r = client.post("/v2/models/m/versions/2/infer", json={"inputs": []})
        assert r.status_code == 503, r.text
        assert r.json()["reason"] == "model_not_ready"


@pytest.mark.parametrize("path", ["/v1/models/m:predict", "/v1/models/m/versions/1:predict"])
def test_get_on_v1_predict_is_405_with_allow(path: str) -> None:
    with client_for() as client:
        r = client.get(path)
        assert r.status_code == 405, r.text
        assert r.json()["reason"] == "method_not_allowed"
        assert "POST" in r.headers["allow"]
        # As V2's infer route answers GET.
        v2 = client.get("/v2/models/m/infer")
        assert (v2.status_code, v2.headers["allow"]) == (405, r.headers["allow"])
        assert client.get("/v1/models/m").status_code == 200  # the status route is still GET
