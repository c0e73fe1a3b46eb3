"""A declared output datatype never changes a value: refused at load where the exported graph
shows the dtype, checked on the values where only the run does (TorchScript)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

torch = pytest.importorskip("torch")

from torch_test_support import CONFIG_PATH, sha256  # noqa: E402

import infercore_torch  # noqa: E402
from infercore.components import V2_TO_NUMPY, ComponentContext  # noqa: E402
from infercore.errors import BackendError, ModelLoadError  # noqa: E402
from infercore.testing import recipe_client  # noqa: E402
from infercore_torch import TorchModel  # noqa: E402
from infercore_torch.signature import cast_checked, holds_every_value  # noqa: E402


class Times100(torch.nn.Module):
    """FP32 in, INT64 out: values an INT8 declaration would wrap (3.0 -> 300)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 100).long()


class Identity(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dtype-models")
    batch = torch.export.Dim("batch", min=1, max=64)
    for name, module, example in [
        ("times100", Times100(), torch.ones(2, 2)),
        ("identity64", Identity(), torch.ones(2, 2, dtype=torch.float64)),
        ("identity32i", Identity(), torch.ones(2, 2, dtype=torch.int32)),
    ]:
        program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
        torch.export.save(program, root / f"{name}.pt2")
        torch.jit.save(torch.jit.script(module), root / f"{name}.ts")
    return root


def loader(root: Path, name: str, declared: str, in_type: str = "FP32") -> dict[str, Any]:
    options: dict[str, Any] = {
        "kind": "torch", "path": name, "trusted": True, "sha256": sha256(root / name),
        "outputs": [{"name": "y", "datatype": declared, "shape": [-1, 2]}], "device": "cpu",
    }  # fmt: skip
    if name.endswith(".ts"):
        options["inputs"] = [{"name": "x", "datatype": in_type, "shape": [-1, 2]}]
    return options


def build(root: Path, name: str, declared: str, in_type: str = "FP32") -> TorchModel:
    options = loader(root, name, declared, in_type)
    del options["kind"]
    config = msgspec.convert(options, TorchModel.Config)
    return TorchModel(config, ComponentContext(path=CONFIG_PATH, model_root=root))


# -- the rule -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("src", "dst", "holds"),
    [
        ("INT64", "INT64", True),
        ("INT32", "INT64", True),
        ("INT32", "FP64", True),
        ("INT16", "FP32", True),
        ("UINT8", "INT16", True),
        ("UINT8", "FP16", True),
        ("BOOL", "INT8", True),
        ("FP32", "FP64", True),
        ("FP16", "FP32", True),
        ("INT64", "INT8", False),  # QA D1: 300 -> 44
        ("INT64", "FP64", False),  # 2**53 + 1 has no float64
        ("INT32", "FP32", False),
        ("INT16", "FP16", False),
        ("INT8", "UINT8", False),
        ("UINT64", "INT64", False),
        ("FP64", "FP32", False),
        ("FP64", "FP16", False),  # QA D1: 1e6 -> inf
        ("FP32", "INT64", False),
        ("INT8", "BOOL", False),
    ],
)
def test_which_datatypes_hold_every_value(src: str, dst: str, holds: bool) -> None:
    assert holds_every_value(V2_TO_NUMPY[src], V2_TO_NUMPY[dst]) is holds


@given(
    hnp.arrays(np.int64, hnp.array_shapes(max_dims=2, max_side=6)),
    st.sampled_from(["INT8", "INT16", "INT32", "FP16", "FP32", "FP64"]),
)
def test_an_integer_cast_passes_exactly_when_every_value_survives(
    values: np.ndarray, datatype: str
) -> None:
    cast, changed = cast_checked(values, datatype)
    with np.errstate(over="ignore", invalid="ignore"):
        survived = bool(np.isfinite(cast.astype(np.float64)).all()) and np.array_equal(
            cast.astype(object), values.astype(object)
        )
    assert (changed is None) is survived


@given(
    hnp.arrays(
        np.float64,
        hnp.array_shapes(max_dims=2, max_side=6),
        elements=st.floats(allow_nan=True, allow_infinity=True),
    ),
    st.sampled_from(["FP16", "FP32"]),
)
def test_a_float_cast_passes_exactly_when_finite_values_stay_finite(
    values: np.ndarray, datatype: str
) -> None:
    cast, changed = cast_checked(values, datatype)
    assert (changed is None) is bool(np.all(np.isfinite(cast) | ~np.isfinite(values)))
    # NaN and infinities stay what they were; precision is rounded, never a different sign.
    np.testing.assert_array_equal(np.isnan(cast), np.isnan(values))
    assert not np.any(np.signbit(cast) != np.signbit(values))


# -- exported programs: refused at load -------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "declared", "found", "holding"),
    [
        ("times100.pt2", "INT8", "INT64", "INT64"),
        ("times100.pt2", "FP64", "INT64", "INT64"),
        ("identity64.pt2", "FP16", "FP64", "FP64"),
        ("identity64.pt2", "FP32", "FP64", "FP64"),
        ("identity32i.pt2", "INT16", "INT32", "INT32 or INT64 or FP64"),
    ],
)
def test_a_narrowing_declaration_of_an_exported_output_fails_the_load(
    root: Path, name: str, declared: str, found: str, holding: str
) -> None:
    model = build(root, name, declared)
    with pytest.raises(ModelLoadError) as info:
        asyncio.run(model.start())
    message = str(info.value)
    assert message.startswith(
        f"{CONFIG_PATH}.outputs[0]: output 'y' is {found} in the exported program; the "
        f"declared {declared} cannot hold every {found} value"
    )
    assert info.value.hint == f"declare {holding}, or cast in the model before exporting"
    assert "\n" not in message


@pytest.mark.parametrize(
    ("name", "declared"), [("identity32i.pt2", "INT64"), ("identity32i.pt2", "FP64")]
)
def test_a_widening_declaration_of_an_exported_output_is_served(
    root: Path, name: str, declared: str
) -> None:
    model = build(root, name, declared)
    asyncio.run(model.start())
    x = np.array([[2**31 - 1, -(2**31)]], dtype=np.int32)
    out = asyncio.run(model.predict({"x": x}))["y"]
    assert out.dtype == V2_TO_NUMPY[declared]
    np.testing.assert_array_equal(out.astype(np.int64), x.astype(np.int64))


# -- TorchScript: the values are checked ------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "in_type", "declared", "x", "changed"),
    [
        ("times100.ts", "FP32", "INT8", [[3.0, -2.5]], "a value outside INT8's range -128..127"),
        ("times100.ts", "FP32", "INT16", [[400.0, 0]], "a value outside INT16's range"),
        ("times100.ts", "FP32", "FP16", [[20.51, 0]], "an integer that FP16 cannot hold exactly"),
        ("identity64.ts", "FP64", "FP16", [[1e6, 0]], "a finite value beyond FP16's largest"),
        ("identity64.ts", "FP64", "FP32", [[1e300, 0]], "a finite value beyond FP32's largest"),
    ],
)
def test_a_value_the_declared_datatype_would_change_is_a_backend_error(
    root: Path, name: str, in_type: str, declared: str, x: list[list[float]], changed: str
) -> None:
    model = build(root, name, declared, in_type)
    asyncio.run(model.start())
    asyncio.run(model.warmup())  # zeros fit: the load is fine, the value is not
    array = np.array(x, dtype=V2_TO_NUMPY[in_type])
    with pytest.raises(BackendError) as info:
        asyncio.run(model.predict({"x": array}))
    returned = "INT64" if name.startswith("times100") else "FP64"
    assert str(info.value.message).startswith(
        f"{CONFIG_PATH}.outputs: output 'y' is {returned}, declared {declared}, and holds {changed}"
    )
    assert info.value.hint is not None and info.value.hint.startswith(f"declare 'y' as {returned}")


@pytest.mark.parametrize(
    ("name", "in_type", "declared", "x", "want"),
    [
        ("times100.ts", "FP32", "INT8", [[1.0, -1.27]], [[100, -127]]),
        ("times100.ts", "FP32", "FP16", [[20.0, -3.0]], [[2000, -300]]),
        ("identity64.ts", "FP64", "FP16", [[65504.0, np.nan]], [[65504.0, np.nan]]),
        ("identity64.ts", "FP64", "FP32", [[np.inf, 1e-300]], [[np.inf, 0.0]]),
    ],
)
def test_values_the_declared_datatype_holds_are_served(
    root: Path, name: str, in_type: str, declared: str, x: list[list[float]], want: Any
) -> None:
    model = build(root, name, declared, in_type)
    asyncio.run(model.start())
    out = asyncio.run(model.predict({"x": np.array(x, dtype=V2_TO_NUMPY[in_type])}))["y"]
    assert out.dtype == V2_TO_NUMPY[declared]
    np.testing.assert_array_equal(out, np.array(want, dtype=V2_TO_NUMPY[declared]))


def test_served_a_value_that_does_not_fit_is_a_500_logged_once(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recipe = {
        "model_root": str(root),
        "batching": {"kind": "none"},
        "models": {"mul8": {"versions": {"1": {"loader": loader(root, "times100.ts", "INT8")}}}},
    }
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [3.0, -2.5]}]}
    with recipe_client(recipe, ("torch", infercore_torch), fakes=False) as client:
        ok = client.post(
            "/v2/models/mul8/infer",
            json={"inputs": [{**body["inputs"][0], "data": [1.0, -1.0]}]},
        )
        assert ok.status_code == 200, ok.text
        assert ok.json()["outputs"][0]["data"] == [100, -100]
        with caplog.at_level(logging.DEBUG):
            bad = client.post("/v2/models/mul8/infer", json=body)
    assert bad.status_code == 500
    assert bad.json() == {
        "error": "the model failed to process the request",
        "reason": "backend_error",
    }
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    about = [line for line in lines if "output 'y'" in line]
    assert len(about) == 1, lines
    assert "is INT64, declared INT8" in about[0] and "declare 'y' as INT64" in about[0]
    assert not [line for line in lines if "overflow" in line or "RuntimeWarning" in line]
