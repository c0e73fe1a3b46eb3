"""Model outputs are checked against the declared ones (``Model.outputs``): name, datatype,
rank, fixed dimensions and rows, by one check (``OutputCheck``) on every batching path and
at the warm-up. Nothing is cast: a declared FP32 returned as float64 is the model's bug."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from infercore.builtins.adaptive import AdaptiveBatcher
from infercore.builtins.batchers import DynamicBatcher, NoBatcher, OutputCheck, _call_model
from infercore.components import Batcher, ComponentContext, EmptyConfig, Model, Tensors, TensorSpec
from infercore.errors import BackendError, ConfigError, InvalidInput, ModelLoadError

PATH = "models.m.versions.1.loader"
CTX = ComponentContext(PATH, Path("."), model_name="m", version="1")
BATCH_CTX = ComponentContext("models.m.versions.1.batching", Path("."), model_name="m", version="1")

#: The declared outputs of most models here: ``y`` FP32 [-1, 2] and ``label`` BYTES [-1].
OUTPUTS = [TensorSpec("y", "FP32", (-1, 2)), TensorSpec("label", "BYTES", (-1,))]

Make = Callable[[int], Any]


def good(n: int) -> dict[str, Any]:
    return {"y": np.zeros((n, 2), np.float32), "label": np.array(["a"] * n, dtype=object)}


def with_y(make_y: Callable[[int], Any]) -> Make:
    return lambda n: {**good(n), "y": make_y(n)}


class Returns(Model):
    """Takes ``x`` FP32 [-1, 4]; returns ``make(rows)``."""

    kind = "returns"

    def __init__(self, make: Make, outputs: list[TensorSpec] | None = None) -> None:
        super().__init__(EmptyConfig(), CTX)
        self.inputs = [TensorSpec("x", "FP32", (-1, 4))]
        self.outputs = list(OUTPUTS if outputs is None else outputs)
        self.make = make

    async def predict(self, inputs: Tensors) -> Tensors:
        result: Tensors = self.make(int(inputs["x"].shape[0]))
        return result


def rows(n: int) -> Tensors:
    return {"x": np.ones((n, 4), np.float32)}


async def started(kind: str, model: Model) -> Batcher:
    batcher: Batcher
    if kind == "none":
        batcher = NoBatcher(NoBatcher.Config(), BATCH_CTX, model)
    elif kind == "dynamic":
        batcher = DynamicBatcher(DynamicBatcher.Config(), BATCH_CTX, model)
    else:
        batcher = AdaptiveBatcher(AdaptiveBatcher.Config(), BATCH_CTX, model)
    await batcher.start()
    return batcher


def submit(kind: str, model: Model, n: int = 3) -> Tensors:
    async def scenario() -> Tensors:
        batcher = await started(kind, model)
        try:
            loop = asyncio.get_running_loop()
            return await batcher.submit(rows(n), deadline=loop.time() + 10)
        finally:
            await batcher.stop()

    return asyncio.run(scenario())


BATCHERS = pytest.mark.parametrize("kind", ["none", "dynamic", "adaptive"])

#: (what y comes back as, the message's tail after "model output 'y' ") for a batch of 3 rows.
WRONG_Y: list[tuple[Callable[[int], Any], str]] = [
    (lambda n: np.zeros((n, 2), np.float64), "is FP64 (float64), declared FP32 [-1, 2]"),
    (lambda n: np.zeros((n, 2), np.int64), "is INT64 (int64), declared FP32 [-1, 2]"),
    (lambda n: np.full((n, 2), "0.5", dtype=object), "is BYTES (object), declared FP32 [-1, 2]"),
    (lambda n: np.full((n, 2), "0.5"), "is BYTES (<U3), declared FP32 [-1, 2]"),
    (lambda n: np.zeros((n, 2), np.bool_), "is BOOL (bool), declared FP32 [-1, 2]"),
    (lambda n: np.zeros((n, 2), ">f4"), "is >f4, declared FP32 [-1, 2]"),
    (lambda n: np.zeros((n, 2), np.complex64), "is complex64, declared FP32 [-1, 2]"),
    (lambda n: np.zeros((n, 5), np.float32), "has shape [3, 5], declared FP32 [-1, 2]"),
    (lambda n: np.zeros((n,), np.float32), "has shape [3], declared FP32 [-1, 2]"),
    (lambda n: np.zeros((n, 2, 1), np.float32), "has shape [3, 2, 1], declared FP32 [-1, 2]"),
    (lambda n: np.zeros((n + 1, 2), np.float32), "has 4 rows for a batch of 3"),
    (lambda n: np.zeros((), np.float32), "has 0 rows for a batch of 3"),
    (lambda n: None, "is missing or not an array"),
    (lambda n: [[0.0, 0.0]] * n, "is missing or not an array"),
]
WRONG_IDS = [
    "float64",
    "int64",
    "object-strings",
    "unicode",
    "bool",
    "big-endian",
    "complex",
    "wide",
    "rank-1",
    "rank-3",
    "rows",
    "scalar",
    "none",
    "list",
]


@BATCHERS
@pytest.mark.parametrize(("make_y", "tail"), WRONG_Y, ids=WRONG_IDS)
def test_an_output_unlike_its_declaration_is_a_backend_error_naming_it(
    kind: str, make_y: Callable[[int], Any], tail: str
) -> None:
    with pytest.raises(BackendError) as info:
        submit(kind, Returns(with_y(make_y)))
    assert info.value.message == f"{PATH}: model output 'y' {tail}"
    assert info.value.status_code == 500 and info.value.reason == "backend_error"


@BATCHERS
def test_outputs_as_declared_pass_as_they_are_and_undeclared_ones_are_dropped(kind: str) -> None:
    out = submit(kind, Returns(lambda n: {**good(n), "extra": np.zeros(n)}))
    assert set(out) == {"y", "label"}
    assert out["y"].dtype == np.float32 and out["y"].shape == (3, 2)


@BATCHERS
@pytest.mark.parametrize(
    "label",
    [
        lambda n: np.array(["a"] * n, dtype=object),
        lambda n: np.array([b"a"] * n, dtype=object),
        lambda n: np.array(["a"] * n),  # <U1
        lambda n: np.array([b"a"] * n),  # |S1
    ],
    ids=["object-str", "object-bytes", "unicode", "bytes"],
)
def test_str_bytes_and_object_arrays_are_all_bytes(kind: str, label: Make) -> None:
    out = submit(kind, Returns(lambda n: {**good(n), "label": label(n)}))
    assert len(out["label"]) == 3


@BATCHERS
def test_a_number_is_not_bytes(kind: str) -> None:
    with pytest.raises(BackendError, match=r"'label' is INT64 \(int64\), declared BYTES \[-1\]"):
        submit(kind, Returns(lambda n: {**good(n), "label": np.zeros(n, np.int64)}))


def check(outputs: list[TensorSpec], value: Any, n: int = 3) -> Tensors:
    return OutputCheck(Returns(good, outputs)).check({"t": value}, n)


def test_a_varying_dimension_takes_any_size_but_the_rank_is_fixed() -> None:
    spec = [TensorSpec("t", "INT32", (-1, -1, 3))]
    for width in (1, 7):
        check(spec, np.zeros((3, width, 3), np.int32))
    with pytest.raises(BackendError, match=r"'t' has shape \[3, 7, 4\], declared INT32"):
        check(spec, np.zeros((3, 7, 4), np.int32))
    with pytest.raises(BackendError, match=r"'t' has shape \[3, 7\], declared INT32 \[-1, -1, 3\]"):
        check(spec, np.zeros((3, 7), np.int32))
    with pytest.raises(BackendError, match="has 2 rows for a batch of 3"):
        check(spec, np.zeros((2, 7, 3), np.int32))


def test_an_output_without_a_batch_dimension_keeps_its_fixed_shape() -> None:
    spec = [TensorSpec("t", "FP64", (3,))]
    check(spec, np.zeros(3), n=5)
    with pytest.raises(BackendError, match=r"'t' has shape \[5\], declared FP64 \[3\]"):
        check(spec, np.zeros(5), n=5)
    scalar = [TensorSpec("t", "FP32", ())]
    check(scalar, np.zeros((), np.float32))
    with pytest.raises(BackendError, match=r"'t' has shape \[1\], declared FP32 \[\]"):
        check(scalar, np.zeros(1, np.float32))


def test_a_variable_first_dimension_of_an_unbatched_model_still_needs_its_rows() -> None:
    spec = [TensorSpec("t", "FP16", (2, -1))]
    check(spec, np.zeros((2, 9), np.float16))
    with pytest.raises(BackendError, match=r"'t' has shape \[3, 9\], declared FP16 \[2, -1\]"):
        check(spec, np.zeros((3, 9), np.float16))


def test_not_a_dict_is_a_backend_error() -> None:
    with pytest.raises(BackendError, match=f"^{PATH}: the model returned list, expected a dict"):
        OutputCheck(Returns(good)).check([np.zeros((3, 2), np.float32)], 3)


def test_the_message_carries_a_hint_and_never_casts() -> None:
    y = np.zeros((3, 2), np.float64)
    with pytest.raises(BackendError) as info:
        OutputCheck(Returns(good)).check({**good(3), "y": y}, 3)
    assert "return FP32 (float32) from the model" in (info.value.hint or "")
    assert y.dtype == np.float64  # untouched


def test_a_batcher_used_without_start_checks_all_the_same() -> None:
    model = Returns(with_y(lambda n: np.zeros((n, 2), np.float64)))
    with pytest.raises(BackendError, match="is FP64"):
        asyncio.run(_call_model(model, rows(2), 2))


def test_the_dynamic_batcher_checks_a_batch_of_several_requests_and_each_alone() -> None:
    calls: list[int] = []

    def make(n: int) -> Any:
        calls.append(n)
        return with_y(lambda n: np.zeros((n, 2), np.float64))(n)

    async def scenario() -> list[Any]:
        batcher = await started("dynamic", Returns(make))
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.gather(
                *(batcher.submit(rows(2), deadline=loop.time() + 10) for _ in range(3)),
                return_exceptions=True,
            )
        finally:
            await batcher.stop()

    results = asyncio.run(scenario())
    assert all(isinstance(r, BackendError) and "is FP64" in r.message for r in results), results
    assert calls[0] == 6  # one batch of three requests, then each alone
    assert sorted(calls[1:]) == [2, 2, 2]


# --- the warm-up ---------------------------------------------------------------------------


def warm(model: Model) -> None:
    asyncio.run(model.warmup())


@pytest.mark.parametrize(
    ("make", "tail"),
    [
        (lambda n: {"Y": good(n)["y"], "label": good(n)["label"]}, "model output 'y' is missing"),
        (lambda n: None, "the model returned NoneType, expected a dict of arrays"),
        (with_y(lambda n: np.zeros((n, 2), np.float64)), "model output 'y' is FP64 (float64), "),
        (with_y(lambda n: np.zeros((n, 5), np.float32)), "model output 'y' has shape [1, 5], "),
        (with_y(lambda n: np.zeros((0, 2), np.float32)), "model output 'y' has 0 rows for a "),
    ],
    ids=["misnamed", "none", "float64", "wide", "no-rows"],
)
def test_a_warm_up_whose_outputs_are_not_the_declared_ones_fails_the_load(
    make: Make, tail: str
) -> None:
    with pytest.raises(ModelLoadError) as info:
        warm(Returns(make))
    assert info.value.message.startswith(f"{PATH}: warm-up failed: {tail}"), info.value.message
    assert info.value.message.count(PATH) == 1


def test_a_warm_up_with_declared_outputs_passes() -> None:
    warm(Returns(good))


class Raises(Returns):
    def __init__(self, exc: Exception) -> None:
        super().__init__(good)
        self.exc = exc

    async def predict(self, inputs: Tensors) -> Tensors:
        raise self.exc


@pytest.mark.parametrize(
    ("exc", "expected", "message"),
    [
        (ValueError("boom"), ModelLoadError, f"{PATH}: warm-up failed: ValueError: boom"),
        (BackendError("it broke"), ModelLoadError, f"{PATH}: warm-up failed: it broke"),
        (InvalidInput("input 'x': no"), ModelLoadError, f"{PATH}: warm-up failed: input 'x': no"),
        (
            ConfigError(f"{PATH}.path: bad"),
            ConfigError,
            f"{PATH}: warm-up failed: {PATH}.path: bad",
        ),
    ],
    ids=["exception", "backend-error", "invalid-input", "config-error"],
)
def test_a_predict_that_raises_at_the_warm_up_says_it_was_the_warm_up(
    exc: Exception, expected: type[Exception], message: str
) -> None:
    with pytest.raises(expected) as info:
        warm(Raises(exc))
    assert type(info.value) is expected
    assert info.value.message == message  # type: ignore[attr-defined]
    assert info.value.__cause__ is exc
