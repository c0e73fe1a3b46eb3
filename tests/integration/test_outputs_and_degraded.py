"""Recipe output mappings (column / threshold) and the X-Infercore-Degraded header."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest

from infercore import hookimpl
from infercore.components import FeatureSource, Tensors
from infercore.components.features import mark_degraded
from infercore.errors import ModelLoadError
from infercore.testing import app_client, fake_model_config, runtime_from_dict


def _mapped_config(outputs: dict[str, object]) -> dict[str, object]:
    cfg = fake_model_config(features=3)
    cfg["models"]["m"]["outputs"] = outputs  # type: ignore[index]
    return cfg


def _v2(rows: list[list[float]]) -> dict[str, object]:
    flat = [v for row in rows for v in row]
    return {"inputs": [{"name": "x", "shape": [len(rows), 3], "datatype": "FP32", "data": flat}]}


def test_column_and_threshold_outputs_replace_the_model_outputs() -> None:
    cfg = _mapped_config(
        {"first": {"source": "echo", "column": 2}, "big": {"source": "y", "threshold": 10.0}}
    )
    with app_client(runtime_from_dict(cfg)) as client:
        meta = client.get("/v2/models/m").json()
        assert meta["outputs"] == [
            {"name": "first", "datatype": "FP32", "shape": [-1]},
            {"name": "big", "datatype": "BOOL", "shape": [-1]},
        ]
        resp = client.post("/v2/models/m/infer", json=_v2([[1, 2, 3], [4, 5, 6]]))
        assert resp.status_code == 200, resp.text
        outputs = {o["name"]: o for o in resp.json()["outputs"]}
        assert set(outputs) == {"first", "big"}
        assert outputs["first"]["data"] == [3.0, 6.0]
        assert outputs["big"]["datatype"] == "BOOL"
        assert outputs["big"]["data"] == [False, True]  # sums 6 and 15 against 10
        v1 = client.post("/v1/models/m:predict", json={"instances": [[4, 5, 6]]})
        assert v1.json() == {"predictions": [{"first": 6.0, "big": True}]}
        # Requested outputs refer to the mapped names.
        body = _v2([[1, 2, 3]]) | {"outputs": [{"name": "echo"}]}
        bad = client.post("/v2/models/m/infer", json=body)
        assert bad.status_code == 400 and "echo" in bad.json()["error"]


@pytest.mark.parametrize(
    ("outputs", "needle"),
    [
        ({"p": {"source": "nope"}}, "no output 'nope'"),
        ({"p": {"source": "y", "column": 0}}, "column needs a 2-D output"),
        ({"p": {"source": "echo", "column": 3}}, "out of range"),
    ],
)
def test_a_mapping_that_does_not_fit_the_model_fails_the_load(
    outputs: dict[str, object], needle: str
) -> None:
    import asyncio

    runtime = runtime_from_dict(_mapped_config(outputs))
    with pytest.raises(ModelLoadError, match=needle):
        asyncio.run(runtime.start())


class DegradingSource(FeatureSource):
    """Passes fields through and marks the response degraded when `x` starts with -1."""

    kind = "degrading"

    async def fetch(self, fields: Mapping[str, np.ndarray], *, deadline: float) -> Tensors:
        if float(fields["x"][0, 0]) == -1.0:
            mark_degraded("features")
        return dict(fields)


class DegradingPlugin:
    @hookimpl
    def register_feature_sources(self) -> list[type[FeatureSource]]:
        return [DegradingSource]


def test_a_degraded_response_says_so_in_a_header() -> None:
    cfg = fake_model_config(features=3)
    cfg["features"] = {"kind": "degrading"}
    runtime = runtime_from_dict(cfg, extra_plugins=[("degrading", DegradingPlugin())])
    with app_client(runtime) as client:
        normal = client.post("/v2/models/m/infer", json=_v2([[1, 2, 3]]))
        degraded = client.post("/v2/models/m/infer", json=_v2([[-1, 2, 3]]))
        after = client.post("/v2/models/m/infer", json=_v2([[1, 2, 3]]))
    assert normal.status_code == degraded.status_code == after.status_code == 200
    assert "x-infercore-degraded" not in normal.headers
    assert degraded.headers["x-infercore-degraded"] == "features"
    assert "x-infercore-degraded" not in after.headers  # per request, not sticky
