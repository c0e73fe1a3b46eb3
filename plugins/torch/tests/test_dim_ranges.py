"""An exported program's ``Dim`` ranges: the batch dimension is fitted to them (split past the
max, padded below the min), any other dynamic dimension outside them is a 400."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch_test_support import CONFIG_PATH, loader, mlp, recorded, started  # noqa: E402

import infercore_torch  # noqa: E402
from infercore.components import ComponentContext  # noqa: E402
from infercore.errors import InvalidInput, ModelLoadError  # noqa: E402
from infercore.testing import recipe_client  # noqa: E402
from infercore_torch import TorchGpuBatcher, TorchModel  # noqa: E402
from infercore_torch.pipeline import StagingPipeline  # noqa: E402
from infercore_torch.signature import DimRange  # noqa: E402

Dim = torch.export.Dim


class PairwiseSum(torch.nn.Module):
    """Two inputs sharing a dynamic sequence dimension: ``(x * y).sum(1)``."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x * y).sum(dim=1)


class ColumnSum(torch.nn.Module):
    """Sums over the rows: its output has no batch dimension, so it is not batchable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=0)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ranged-models")
    net = mlp(0)

    def export(name: str, module: Any, example: tuple[Any, ...], dims: Any) -> None:
        program = torch.export.export(module, example, dynamic_shapes=dims)
        torch.export.save(program, root / name)

    x4 = (torch.randn(4, 4),)
    export("max8.pt2", net, x4, ({0: Dim("batch", min=1, max=8)},))
    export("min3max8.pt2", net, x4, ({0: Dim("batch", min=3, max=8)},))
    export("auto.pt2", net, x4, ({0: Dim.AUTO},))  # torch specialises 0/1: min becomes 2
    batch, steps = Dim("batch", max=64), Dim("steps", min=3, max=16)
    export(
        "pairs.pt2", PairwiseSum(), (torch.randn(2, 5), torch.randn(2, 5)),
        ({0: batch, 1: steps}, {0: batch, 1: steps}),
    )  # fmt: skip
    export("columns.pt2", ColumnSum(), (torch.randn(3, 4),), ({0: Dim("rows", min=2, max=4)},))
    return root


def rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)


def direct(x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return np.asarray(mlp(0)(torch.from_numpy(x)).numpy())


def predict(model: TorchModel, **inputs: np.ndarray) -> np.ndarray:
    out = asyncio.run(model.predict(dict(inputs)))
    return out[model.outputs[0].name]


# -- the ranges are kept ------------------------------------------------------------------------


def test_each_dynamic_dimension_keeps_its_range(root: Path) -> None:
    model = started(root, "pairs.pt2")
    assert [s.shape for s in model.inputs] == [(-1, -1), (-1, -1)]  # the metadata is unchanged
    (xb, xs), (yb, ys) = model.dim_ranges["x"], model.dim_ranges["y"]
    assert xb is not None and xs is not None and (xb.lower, xb.upper) == (0, 64)
    assert (xs.lower, xs.upper) == (3, 16)
    assert (xb, xs) == (yb, ys)  # the same symbols: their sizes must agree
    assert model.batch_range == DimRange(1, 64)
    assert started(root, "auto.pt2").batch_range == DimRange(2, None)


# -- the batch dimension --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "n", "calls"),
    [
        ("max8.pt2", 20, [8, 8, 4]),
        ("max8.pt2", 8, [8]),
        ("min3max8.pt2", 1, [3]),  # padded up to the min
        ("min3max8.pt2", 17, [8, 8, 3]),  # the last call's single row padded too
        ("auto.pt2", 1, [2]),
        ("auto.pt2", 5, [5]),
    ],
)
def test_a_row_count_outside_the_programs_range_is_fitted_to_it(
    root: Path, name: str, n: int, calls: list[int]
) -> None:
    model = started(root, name)
    recorder = recorded(model)
    x = rows(n, seed=n)
    got = predict(model, input=x)
    assert recorder.rows == calls
    assert got.shape == (n, 3)
    np.testing.assert_allclose(got, direct(x), rtol=1e-5, atol=1e-6)


def test_a_warm_up_fits_the_programs_ranges(root: Path) -> None:
    for name in ("min3max8.pt2", "pairs.pt2"):
        model = started(root, name)
        recorder = recorded(model)
        asyncio.run(model.warmup())
        assert recorder.rows == [3 if name == "min3max8.pt2" else 1]


def test_requests_whose_rows_add_past_the_max_are_batched_in_calls_of_at_most_max(
    root: Path,
) -> None:
    model = started(root, "max8.pt2")
    recorder = recorded(model)
    config = msgspec.convert(
        {"max_batch_size": 16, "max_queue_delay_ms": 200}, TorchGpuBatcher.Config
    )
    batcher = TorchGpuBatcher(config, ComponentContext(path="batching", model_root=root), model)
    inputs = [rows(5, seed=i) for i in range(3)]

    async def scenario() -> list[np.ndarray]:
        await batcher.start()
        recorder.rows.clear()  # the warm-up's rows
        loop = asyncio.get_running_loop()
        try:
            got = await asyncio.gather(
                *(batcher.submit({"input": x}, deadline=loop.time() + 10) for x in inputs)
            )
        finally:
            await batcher.stop()
        return [g["output"] for g in got]

    for x, out in zip(inputs, asyncio.run(scenario()), strict=True):
        np.testing.assert_allclose(out, direct(x), rtol=1e-5, atol=1e-6)
    assert max(recorder.rows) == 8  # a batch of 15 rows, split: the program never saw more
    assert sum(recorder.rows) == 15  # and nothing ran twice (no batch failed and was retried)


def test_the_staging_pipeline_splits_a_batch_past_the_max(root: Path) -> None:
    model = started(root, "min3max8.pt2")
    recorder = recorded(model)
    pipeline = StagingPipeline(torch, model, slots=1, buffer_rows=16)
    parts = [{"input": rows(6, seed=1)}, {"input": rows(4, seed=2)}]
    got = pipeline.run(parts)["output"]
    assert recorder.rows == [8, 3]
    np.testing.assert_allclose(got, direct(np.concatenate([p["input"] for p in parts])), rtol=1e-5)


# -- other dimensions ----------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [2, 17])
def test_another_dimension_outside_its_range_is_invalid_input(root: Path, steps: int) -> None:
    model = started(root, "pairs.pt2")
    recorder = recorded(model)
    x = np.ones((2, steps), dtype=np.float32)
    with pytest.raises(InvalidInput) as info:
        predict(model, x=x, y=x)
    assert (
        info.value.message == f"input 'x': dimension 1 is {steps}, outside the model's range 3..16"
    )
    assert info.value.hint == "send 'x' with dimension 1 in 3..16"
    assert recorder.rows == []  # refused before the model was called


def test_dimensions_that_share_a_symbol_must_agree(root: Path) -> None:
    model = started(root, "pairs.pt2")
    with pytest.raises(
        InvalidInput, match=r"input 'y': dimension 1 is 5, but input 'x' dimension 1 is 4"
    ):
        predict(model, x=np.ones((2, 4), np.float32), y=np.ones((2, 5), np.float32))
    got = predict(model, x=np.ones((2, 4), np.float32), y=np.full((2, 4), 2, np.float32))
    np.testing.assert_array_equal(got, [8.0, 8.0])


@pytest.mark.parametrize("n", [1, 5])
def test_a_first_dimension_that_is_not_a_batch_is_checked_like_any_other(
    root: Path, n: int
) -> None:
    model = started(root, "columns.pt2")
    assert not model.batchable and model.batch_range is None
    with pytest.raises(
        InvalidInput, match=rf"input 'x': dimension 0 is {n}, outside the model's range 2..4"
    ):
        predict(model, x=rows(n))
    np.testing.assert_allclose(predict(model, x=rows(3)), rows(3).sum(axis=0), rtol=1e-6)


def test_a_declared_size_outside_the_range_fails_the_load(root: Path) -> None:
    config = msgspec.convert(
        loader(root, "pairs.pt2", inputs=[
            {"name": "x", "datatype": "FP32", "shape": [-1, 20]},
            {"name": "y", "datatype": "FP32", "shape": [-1, 20]},
        ]),
        TorchModel.Config,
    )  # fmt: skip
    model = TorchModel(config, ComponentContext(path=CONFIG_PATH, model_root=root))
    with pytest.raises(ModelLoadError) as info:
        asyncio.run(model.start())
    assert info.value.message == (
        f"{CONFIG_PATH}.inputs[0]: declared 'x' dimension 1 as 20, outside the exported "
        "program's range 3..16"
    )


# -- served ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "batching",
    [
        {"kind": "none"},
        {"kind": "dynamic", "max_batch_size": 16},
        {"kind": "torch-gpu", "max_batch_size": 16},
    ],
    ids=["none", "dynamic", "torch-gpu"],
)
def test_served_the_client_sees_no_limit_of_the_export(
    root: Path, batching: dict[str, Any]
) -> None:
    recipe = {
        "model_root": str(root),
        "batching": batching,
        "models": {
            "mlp": {"versions": {"1": {"loader": {"kind": "torch", **loader(root, "max8.pt2")}}}},
            "pairs": {
                "versions": {"1": {"loader": {"kind": "torch", **loader(root, "pairs.pt2")}}}
            },
        },
    }
    x = rows(20, seed=7)
    body = {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [20, 4], "data": x.ravel().tolist()}
        ]
    }
    with recipe_client(recipe, ("torch", infercore_torch), fakes=False) as client:
        response = client.post("/v2/models/mlp/infer", json=body)
        assert response.status_code == 200, response.text
        (out,) = response.json()["outputs"]
        got = np.array(out["data"], dtype=np.float32).reshape(out["shape"])
        np.testing.assert_allclose(got, direct(x), rtol=1e-5, atol=1e-6)

        wide = [{"name": n, "datatype": "FP32", "shape": [1, 17], "data": [1.0] * 17} for n in "xy"]
        refused = client.post("/v2/models/pairs/infer", json={"inputs": wide})
        assert refused.status_code == 400, refused.text
        assert refused.json() == {
            "error": "input 'x': dimension 1 is 17, outside the model's range 3..16 "
            "(hint: send 'x' with dimension 1 in 3..16)",
            "reason": "invalid_input",
        }
