"""``prepare_inputs``: a request's tensors against the model's signature."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infercore.components import TensorSpec
from infercore.components.tensors import V2_TO_NUMPY
from infercore.errors import InvalidInput
from infercore.protocol import v1, v2
from infercore.runtime.inputs import prepare_inputs

X = TensorSpec("x", "FP32", (-1, 3))
IDS = TensorSpec("ids", "INT64", (-1,))
FIXED = TensorSpec("table", "FP32", (2, 2))  # not batched


def prep(
    specs: list[TensorSpec],
    tensors: dict[str, np.ndarray],
    *,
    declared: dict[str, str] | None = None,
    max_rows: int = 16,
) -> dict[str, np.ndarray]:
    return prepare_inputs(specs, tensors, declared=declared, max_rows=max_rows)


def refused(
    specs: list[TensorSpec],
    tensors: dict[str, np.ndarray],
    *needles: str,
    declared: dict[str, str] | None = None,
    max_rows: int = 16,
) -> str:
    with pytest.raises(InvalidInput) as info:
        prep(specs, tensors, declared=declared, max_rows=max_rows)
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    return message


def rows(n: int, width: int = 3, dtype: type = np.float32) -> np.ndarray:
    return np.arange(n * width, dtype=dtype).reshape(n, width)


def test_matching_inputs_pass_unchanged_in_signature_order() -> None:
    x, ids = rows(2), np.array([5, 6], np.int64)
    out = prep([X, IDS], {"ids": ids, "x": x}, declared={"x": "FP32", "ids": "INT64"})
    assert list(out) == ["x", "ids"]
    assert out["x"] is x and out["ids"] is ids


@pytest.mark.parametrize("declared", ["FP64", "FP16", "INT32", "BYTES", "BOOL"])
def test_declared_datatype_must_match_exactly(declared: str) -> None:
    arr = (
        np.zeros((1, 3), V2_TO_NUMPY[declared])
        if declared != "BYTES"
        else np.full((1, 3), b"", dtype=object)
    )
    message = refused([X], {"x": arr}, "'x'", declared, "FP32", declared={"x": declared})
    assert "datatype" in message


@pytest.mark.parametrize("shape", [(3,), (1, 3, 1), (), (1, 1, 3)])
def test_rank_mismatch(shape: tuple[int, ...]) -> None:
    refused([X], {"x": np.zeros(shape, np.float32)}, "'x'", "rank")


@pytest.mark.parametrize("shape", [(2, 4), (2, 2), (1, 0)])
def test_fixed_dimension_mismatch(shape: tuple[int, ...]) -> None:
    refused([X], {"x": np.zeros(shape, np.float32)}, "'x'", "[-1, 3]")


def test_fixed_shape_input_must_match_every_dimension() -> None:
    assert prep([X, FIXED], {"x": rows(1), "table": np.eye(2, dtype=np.float32)})
    refused([X, FIXED], {"x": rows(1), "table": np.zeros((1, 2), np.float32)}, "'table'")


def test_variable_trailing_dimensions_are_accepted() -> None:
    seq = TensorSpec("seq", "INT32", (-1, -1))
    for width in (1, 7):
        out = prep([seq], {"seq": np.ones((2, width), np.int32)})
        assert out["seq"].shape == (2, width)


def test_missing_input_names_it_and_the_signature() -> None:
    refused([X, IDS], {"x": rows(1)}, "missing input 'ids'", "x, ids")


def test_unknown_input_names_it() -> None:
    refused([X], {"x": rows(1), "extra": np.zeros(1)}, "unknown input 'extra'")


def test_row_counts_must_agree_across_batched_inputs() -> None:
    message = refused([X, IDS], {"x": rows(2), "ids": np.array([1, 2, 3])}, "'ids'")
    assert "3" in message and "2" in message


def test_a_model_that_does_not_stack_requests_may_take_other_row_counts() -> None:
    """A model that is not batchable relates its first dimensions as it likes (a torch.export
    program's ``y: n + 1``); the row limit then holds for the longest input."""
    tensors = {"x": rows(2), "ids": np.array([1, 2, 3])}
    out = prepare_inputs([X, IDS], tensors, declared=None, max_rows=3, same_rows=False)
    assert out["ids"].shape == (3,) and out["x"].shape == (2, 3)
    with pytest.raises(InvalidInput, match="3 rows; the limit is 2"):
        prepare_inputs([X, IDS], tensors, declared=None, max_rows=2, same_rows=False)


def test_unbatched_inputs_do_not_count_as_rows() -> None:
    out = prep([X, FIXED], {"x": rows(3), "table": np.zeros((2, 2), np.float32)})
    assert out["x"].shape[0] == 3


def test_zero_rows_are_refused() -> None:
    refused([X], {"x": np.zeros((0, 3), np.float32)}, "no rows")


def test_max_rows() -> None:
    assert prep([X], {"x": rows(4)}, max_rows=4)["x"].shape == (4, 3)
    refused([X], {"x": rows(5)}, "5", "4", max_rows=4)


def test_undeclared_numbers_are_converted_to_the_model_dtype() -> None:
    out = prep([X, IDS], {"x": np.array([[1, 2, 3]]), "ids": np.array([7.0])})
    assert out["x"].dtype == np.float32 and out["x"].tolist() == [[1.0, 2.0, 3.0]]
    assert out["ids"].dtype == np.int64 and out["ids"].tolist() == [7]


@pytest.mark.parametrize(
    ("tensor", "needle"),
    [
        (np.array([1.5]), "integers"),
        (np.array([2**63], np.uint64), "range"),
        (np.array(["7"]), "numbers"),
        (np.array([True]), "numbers"),
    ],
)
def test_undeclared_values_that_would_lose_information(tensor: np.ndarray, needle: str) -> None:
    refused([IDS], {"ids": tensor}, "'ids'", needle)


def test_v1_strings_for_a_number_input_are_refused() -> None:
    cols = v1.decode(
        json.dumps({"instances": ["1", "2"]}).encode(), default_input="ids", max_rows=4
    )
    refused([IDS], cols, "'ids'", "strings")


def test_undeclared_strings_for_a_bytes_input() -> None:
    text = TensorSpec("text", "BYTES", (-1,))
    out = prep([text], {"text": np.array(["a", "bc"])})
    assert out["text"].dtype == object and out["text"].tolist() == ["a", "bc"]
    refused([text], {"text": np.array([1, 2])}, "'text'", "strings")


def test_v1_request_end_to_end() -> None:
    cols = v1.decode(
        json.dumps({"instances": [[1, 2, 3], [4.5, 5, 6]]}).encode(), default_input="x", max_rows=16
    )
    out = prep([X], cols)
    assert out["x"].dtype == np.float32
    assert out["x"].tolist() == [[1.0, 2.0, 3.0], [4.5, 5.0, 6.0]]


def test_v1_objects_end_to_end() -> None:
    doc = {"instances": [{"x": [1, 2, 3], "ids": 2**62 + 1}, {"x": [0, 0, 0], "ids": -1}]}
    cols = v1.decode(json.dumps(doc).encode(), default_input=None, max_rows=16)
    out = prep([X, IDS], cols)
    assert out["ids"].tolist() == [2**62 + 1, -1]  # exact: never through float64


def test_v2_request_end_to_end_checks_declared_type() -> None:
    raw = json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP64", "data": [1, 2, 3]}]}
    ).encode()
    decoded = v2.decode(raw, None, max_elements=len(raw))
    refused([X], decoded.tensors, "FP64", declared=decoded.datatypes)


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(["INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"]),
    st.data(),
)
def test_property_v1_integers_reach_the_model_exactly(datatype: str, data: st.DataObject) -> None:
    info = np.iinfo(V2_TO_NUMPY[datatype])
    values = data.draw(st.lists(st.integers(int(info.min), int(info.max)), min_size=1, max_size=6))
    cols = v1.decode(json.dumps({"instances": values}).encode(), default_input="v", max_rows=16)
    out = prep([TensorSpec("v", datatype, (-1,))], cols)
    assert out["v"].dtype == V2_TO_NUMPY[datatype]
    assert out["v"].tolist() == values


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=3, max_size=3),
    st.integers(1, 4),
)
def test_property_v1_float32_values_reach_the_model_exactly(values: list[float], n: int) -> None:
    cols = v1.decode(
        json.dumps({"instances": [values] * n}).encode(), default_input="x", max_rows=16
    )
    out = prep([X], cols)
    assert out["x"].dtype == np.float32
    assert out["x"].tolist() == [values] * n
