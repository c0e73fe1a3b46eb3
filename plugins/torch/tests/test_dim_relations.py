"""Relations between an exported program's dimensions (one ``Dim`` in two places, ``Dim``
arithmetic) and the rest of what torch's input guard checks: a request that breaks one is a
400 before the program runs, never the guard's 500; a first dimension the program relates to
another is no batch dimension."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch_test_support import loader, mlp, recorded, started  # noqa: E402

import infercore_torch  # noqa: E402
from infercore.builtins.batchers import DynamicBatcher  # noqa: E402
from infercore.components import Array, ComponentContext  # noqa: E402
from infercore.errors import BackendError, ConfigError, InvalidInput  # noqa: E402
from infercore.testing import recipe_client  # noqa: E402
from infercore_torch import TorchGpuBatcher, TorchModel  # noqa: E402

Dim = torch.export.Dim


class NextMinus(torch.nn.Module):
    """``y[1:] - x``: ``y`` has one more row than ``x``."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y[1:] - x


class PairSums(torch.nn.Module):
    """``y.reshape(-1, 2, 3).sum(1) + x``: ``y`` has twice ``x``'s rows."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y.reshape(-1, 2, 3).sum(1) + x


class Halves(torch.nn.Module):
    """``x.reshape(-1, 2, 3).sum(1)``: an even number of rows only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, 2, 3).sum(1)


class NextColumns(torch.nn.Module):
    """``y[:, 1:] - x`` row by row: ``y`` has one more column than ``x``."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y[:, 1:] - x


class SquareTimes(torch.nn.Module):
    """``x @ y`` for a square ``x``: its columns are its rows, so its rows are no batch."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x @ y


class EvenColumns(torch.nn.Module):
    """Doubles ``x``; ``torch._check`` makes the program's guard refuse an odd column count,
    a relation the shapes do not show (only the guard holds it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._check(x.shape[1] % 2 == 0)
        return x * 2


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("related-models")

    def export(name: str, module: Any, example: tuple[Any, ...], dims: Any) -> None:
        program = torch.export.export(module, example, dynamic_shapes=dims)
        torch.export.save(program, root / name)

    n = Dim("n", min=2, max=32)
    export(
        "next.pt2", NextMinus(), (torch.randn(4, 3), torch.randn(5, 3)),
        {"x": {0: n}, "y": {0: n + 1}},
    )  # fmt: skip
    export(
        "pairs.pt2", PairSums(), (torch.randn(4, 3), torch.randn(8, 3)),
        {"x": {0: n}, "y": {0: 2 * n}},
    )  # fmt: skip
    export("halves.pt2", Halves(), (torch.randn(8, 3),), {"x": {0: 2 * Dim("h", min=1, max=8)}})
    batch, cols = Dim("batch", max=64), Dim("cols", min=2, max=16)
    export(
        "columns.pt2", NextColumns(), (torch.randn(2, 4), torch.randn(2, 5)),
        {"x": {0: batch, 1: cols}, "y": {0: batch, 1: cols + 1}},
    )  # fmt: skip
    k = Dim("k", min=1, max=8)
    export(
        "square.pt2", SquareTimes(), (torch.randn(4, 4), torch.randn(4, 3)),
        {"x": {0: k, 1: k}, "y": {0: k}},
    )  # fmt: skip
    export(
        "even.pt2", EvenColumns(), (torch.randn(4, 4),),
        ({0: Dim("batch", max=64), 1: Dim.AUTO},),
    )  # fmt: skip
    export("max8.pt2", mlp(0), (torch.randn(4, 4),), ({0: Dim("batch", min=1, max=8)},))
    return root


def ones(*shape: int) -> Array:
    return np.ones(shape, dtype=np.float32)


def predict(model: TorchModel, **inputs: Array) -> Array:
    out = asyncio.run(model.predict(dict(inputs)))
    return out[model.outputs[0].name]


def refusal(model: TorchModel, **inputs: Array) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        predict(model, **inputs)
    return info.value


# -- derived dimensions and shared symbols ----------------------------------------------------


def test_a_derived_dimension_that_breaks_its_relation_is_invalid_input(root: Path) -> None:
    model = started(root, "next.pt2")
    recorder = recorded(model)
    error = refusal(model, x=ones(4, 3), y=ones(7, 3))
    assert error.message == (
        "input 'y': dimension 0 is 7, but the model needs 'x' dimension 0 + 1 = 5 "
        "(input 'x' dimension 0 is 4)"
    )
    assert error.hint == "send 'y' with dimension 0 equal to 'x' dimension 0 + 1"
    assert recorder.rows == []  # refused before the program ran
    y = np.arange(15, dtype=np.float32).reshape(5, 3)
    np.testing.assert_array_equal(predict(model, x=ones(4, 3), y=y), y[1:] - 1)


def test_a_multiple_of_another_dimension_is_checked(root: Path) -> None:
    model = started(root, "pairs.pt2")
    error = refusal(model, x=ones(4, 3), y=ones(7, 3))
    assert error.message == (
        "input 'y': dimension 0 is 7, but the model needs 2 * ('x' dimension 0) = 8 "
        "(input 'x' dimension 0 is 4)"
    )
    np.testing.assert_array_equal(predict(model, x=ones(4, 3), y=ones(8, 3)), np.full((4, 3), 3))


# torch raises h's min to 2 (it specialises 0 and 1) but leaves 2*h's range at 2..16: 2 rows
# pass the range check, and only n = 1 shows that the program refuses them.
@pytest.mark.parametrize(("rows", "why"), [(7, "odd"), (2, "n = 1, below n's range")])
def test_a_dimension_the_program_only_derives_must_have_a_whole_value(
    root: Path, rows: int, why: str
) -> None:
    model = started(root, "halves.pt2")
    error = refusal(model, x=ones(rows, 3))
    assert error.message == (
        f"input 'x': dimension 0 is {rows}, but the model needs 2 * n for a whole number n in 2..8"
    ), why
    assert predict(model, x=ones(6, 3)).shape == (3, 3)


def test_a_relation_between_other_dimensions_leaves_the_batch_dimension_free(root: Path) -> None:
    model = started(root, "columns.pt2")
    assert model.batchable and model.batch_conflict is None
    error = refusal(model, x=ones(2, 4), y=ones(2, 7))
    assert error.message == (
        "input 'y': dimension 1 is 7, but the model needs 'x' dimension 1 + 1 = 5 "
        "(input 'x' dimension 1 is 4)"
    )
    assert predict(model, x=ones(70, 4), y=ones(70, 5)).shape == (70, 4)  # split past max 64


# -- a first dimension in a relation is no batch dimension -------------------------------------


@pytest.mark.parametrize(
    ("name", "conflict"),
    [
        ("next.pt2", "input 'y' dimension 0 is 'x' dimension 0 + 1, not a free batch dimension"),
        ("halves.pt2", "input 'x' dimension 0 is 2 * n, not a free batch dimension"),
        (
            "square.pt2",
            "input 'x' dimension 1 must be 'x' dimension 0, so it depends on the batch dimension",
        ),
    ],
)
def test_a_first_dimension_in_a_relation_is_not_batched(
    root: Path, name: str, conflict: str
) -> None:
    model = started(root, name)
    assert [s.shape[0] for s in (*model.inputs, *model.outputs)] == [-1] * (
        len(model.inputs) + len(model.outputs)
    )  # every first dimension varies, as for a batchable model, but:
    assert not model.batchable and model.batch_range is None
    assert model.batch_conflict == conflict


def test_a_related_first_dimension_is_checked_whole_never_split(root: Path) -> None:
    model = started(root, "next.pt2")
    recorder = recorded(model)
    # Splitting at the program's max (32) would hand it x[:32] and y[:32]: no longer n, n + 1.
    error = refusal(model, x=ones(40, 3), y=ones(41, 3))
    assert error.message == "input 'x': dimension 0 is 40, outside the model's range 2..32"
    assert recorder.rows == []
    x, y = ones(2, 3), ones(3, 3)  # a warm-up's and a request's first dimension: never padded
    assert predict(model, x=x, y=y).shape == (2, 3) and recorder.rows == [2]


def test_a_shared_symbol_in_the_first_dimension_is_checked_there_too(root: Path) -> None:
    model = started(root, "square.pt2")
    error = refusal(model, x=ones(4, 5), y=ones(4, 3))
    assert error.message == (
        "input 'x': dimension 1 is 5, but input 'x' dimension 0 is 4; the model needs them equal"
    )
    np.testing.assert_array_equal(predict(model, x=ones(2, 2), y=ones(2, 3)), np.full((2, 3), 2))


def test_requests_to_a_model_with_a_related_first_dimension_are_never_stacked(
    root: Path,
) -> None:
    model = started(root, "square.pt2")
    recorder = recorded(model)
    config = msgspec.convert(
        {"max_batch_size": 16, "max_queue_delay_ms": 200}, DynamicBatcher.Config
    )
    batcher = DynamicBatcher(config, ComponentContext(path="batching", model_root=root), model)
    x, y = ones(2, 2), ones(2, 3)

    async def scenario() -> list[dict[str, Array]]:
        await batcher.start()
        recorder.rows.clear()
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.gather(
                *(batcher.submit({"x": x, "y": y}, deadline=loop.time() + 10) for _ in range(3))
            )
        finally:
            await batcher.stop()

    for got in asyncio.run(scenario()):
        np.testing.assert_array_equal(got["output"], np.full((2, 3), 2))
    assert recorder.rows == [2, 2, 2]  # one call per request: stacked, x would be 6 x 2


def test_torch_gpu_refuses_a_model_with_a_related_first_dimension(root: Path) -> None:
    model = started(root, "next.pt2")
    config = msgspec.convert({"max_batch_size": 16}, TorchGpuBatcher.Config)
    batcher = TorchGpuBatcher(config, ComponentContext(path="batching", model_root=root), model)
    with pytest.raises(ConfigError) as info:
        asyncio.run(batcher.start())
    assert info.value.message == (
        "batching.kind: 'torch-gpu' needs a model whose every input and output has a batch "
        "dimension (-1 first); this one's first dimension is no batch dimension: input 'y' "
        "dimension 0 is 'x' dimension 0 + 1, not a free batch dimension"
    )


def test_a_warm_up_keeps_the_relations_of_a_declared_size(root: Path) -> None:
    inputs = [
        {"name": "x", "datatype": "FP32", "shape": [-1, 5]},
        {"name": "y", "datatype": "FP32", "shape": [-1, -1]},
    ]
    model = started(root, "columns.pt2", inputs=inputs)
    recorder = recorded(model)
    asyncio.run(model.warmup())  # y's columns at x's declared 5 + 1, not at y's lower bound 3
    assert recorder.rows == [1]
    assert model.sample_shape(model.inputs[1]) == (1, 6)


# -- what else torch's guard checks -----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "inputs", "message"),
    [
        (
            "max8.pt2",
            {"input": ones(2, 5)},
            "input 'input': shape [2, 5] does not match the model's [-1, 4]",
        ),  # a size the program fixes
        (
            "columns.pt2",
            {"x": ones(2, 4, 1), "y": ones(2, 5, 1)},
            "input 'x': shape [2, 4, 1] does not match the model's [-1, -1]",
        ),  # another rank: the program would run and return another shape
    ],
    ids=["fixed-size", "rank"],
)
def test_a_shape_the_signature_excludes_is_invalid_input(
    root: Path, name: str, inputs: dict[str, Array], message: str
) -> None:
    model = started(root, name)
    recorder = recorded(model)
    error = refusal(model, **inputs)
    assert error.message == message
    assert recorder.rows == []


@pytest.mark.parametrize("name", ["x", "columns"])
def test_a_guard_only_the_program_knows_is_invalid_input(root: Path, name: str) -> None:
    declared = [{"name": name, "datatype": "FP32", "shape": [-1, -1]}]
    model = started(root, "even.pt2", inputs=declared)
    asyncio.run(model.warmup())
    error = refusal(model, **{name: ones(2, 3)})
    # Named as the server names the input (a declared name replaces the forward's).
    assert error.message == (
        f"the inputs' shapes ('{name}' [2, 3]) break the model's check: {name}.size()[1] % 2 == 0"
    )
    assert predict(model, **{name: ones(2, 4)}).shape == (2, 4)

    def failing(*tensors: Any) -> Any:
        raise AssertionError("the model's own assert")  # not the guard: still the model's fault

    model._module = failing
    with pytest.raises(BackendError):
        predict(model, **{name: ones(2, 4)})


# -- served -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "batching",
    [
        {"kind": "none"},
        {"kind": "dynamic", "max_batch_size": 16},
        {"kind": "torch-gpu", "max_batch_size": 16},
    ],
    ids=["none", "dynamic", "torch-gpu"],
)
def test_served_a_broken_relation_is_a_400(root: Path, batching: dict[str, Any]) -> None:
    recipe = {
        "model_root": str(root),
        "batching": batching,
        "models": {
            "cols": {
                "versions": {"1": {"loader": {"kind": "torch", **loader(root, "columns.pt2")}}}
            },
            "even": {"versions": {"1": {"loader": {"kind": "torch", **loader(root, "even.pt2")}}}},
        },
    }
    stacks = batching["kind"] == "torch-gpu"  # refuses `next` (its own test, above)
    if not stacks:
        node = {"kind": "torch", **loader(root, "next.pt2")}
        recipe["models"]["next"] = {"versions": {"1": {"loader": node}}}

    def tensor(name: str, rows: int, cols: int) -> dict[str, Any]:
        return {
            "name": name,
            "datatype": "FP32",
            "shape": [rows, cols],
            "data": [1.0] * (rows * cols),
        }

    with recipe_client(recipe, ("torch", infercore_torch), fakes=False) as client:
        body = {"inputs": [tensor("x", 2, 4), tensor("y", 2, 7)]}
        refused = client.post("/v2/models/cols/infer", json=body)
        assert refused.status_code == 400, refused.text
        assert refused.json() == {
            "error": "input 'y': dimension 1 is 7, but the model needs 'x' dimension 1 + 1 = 5 "
            "(input 'x' dimension 1 is 4) (hint: send 'y' with dimension 1 equal to "
            "'x' dimension 1 + 1)",
            "reason": "invalid_input",
        }
        body = {"inputs": [tensor("x", 2, 4), tensor("y", 2, 5)]}
        assert client.post("/v2/models/cols/infer", json=body).status_code == 200

        odd = client.post("/v2/models/even/infer", json={"inputs": [tensor("x", 1, 3)]})
        assert odd.status_code == 400, odd.text
        assert odd.json()["reason"] == "invalid_input"
        assert "x.size()[1] % 2 == 0" in odd.json()["error"]

        if stacks:
            return
        # A first dimension derived from another's (y: n + 1) is no batch dimension: the
        # inputs' row counts differ by design, and the model checks the relation itself.
        body = {"inputs": [tensor("x", 4, 3), tensor("y", 5, 3)]}
        served = client.post("/v2/models/next/infer", json=body)
        assert served.status_code == 200, served.text
        body = {"inputs": [tensor("x", 4, 3), tensor("y", 7, 3)]}
        broken = client.post("/v2/models/next/infer", json=body)
        assert broken.status_code == 400, broken.text
        assert "'x' dimension 0 + 1 = 5" in broken.json()["error"], broken.text
