"""``coerce``: JSON-inferred arrays to a V2 datatype, refusing lossy or wrong-kind values."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from infercore.components.tensors import V2_TO_NUMPY
from infercore.errors import InvalidInput
from infercore.protocol.tensors import check_shape, coerce

INTS = ["INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"]
FLOATS = ["FP16", "FP32", "FP64"]


def refused(arr: np.ndarray, datatype: str, *needles: str) -> None:
    with pytest.raises(InvalidInput) as info:
        coerce("col", arr, datatype)
    assert "'col'" in str(info.value)
    for needle in needles:
        assert needle in str(info.value)


@pytest.mark.parametrize("datatype", INTS + FLOATS)
def test_strings_never_become_numbers(datatype: str) -> None:
    refused(np.array(["1", "2"]), datatype, "strings")


@pytest.mark.parametrize("datatype", INTS + FLOATS)
def test_booleans_never_become_numbers(datatype: str) -> None:
    refused(np.array([True, False]), datatype, "booleans")


@pytest.mark.parametrize("arr", [np.array([1, 0]), np.array([1.0]), np.array(["true"])])
def test_numbers_and_strings_never_become_booleans(arr: np.ndarray) -> None:
    refused(arr, "BOOL", "BOOL")


@pytest.mark.parametrize(
    "arr",
    [np.array([1, 2]), np.array([1.5]), np.array([True]), np.array([None, "a"], dtype=object)],
)
def test_only_strings_become_bytes(arr: np.ndarray) -> None:
    refused(arr, "BYTES", "BYTES")


@pytest.mark.parametrize("datatype", INTS + FLOATS)
def test_object_arrays_are_refused_for_numbers(datatype: str) -> None:
    refused(np.array([1, None], dtype=object), datatype)


def test_strings_become_bytes_objects_and_booleans_stay() -> None:
    out = coerce("col", np.array(["a", "bc"]), "BYTES")
    assert out.dtype == object and out.tolist() == ["a", "bc"]
    mixed = np.array([b"a", "b"], dtype=object)
    assert coerce("col", mixed, "BYTES") is mixed
    flags = np.array([True, False])
    assert coerce("col", flags, "BOOL") is flags


@pytest.mark.parametrize("datatype", INTS)
@pytest.mark.parametrize("value", [0.5, -1.25, 1e-12, np.nan, np.inf, -np.inf])
def test_non_integral_floats_never_become_integers(datatype: str, value: float) -> None:
    refused(np.array([1.0, value]), datatype, "integers")


@pytest.mark.parametrize("datatype", INTS)
def test_integer_range_edges(datatype: str) -> None:
    info = np.iinfo(V2_TO_NUMPY[datatype])
    lo, hi = int(info.min), int(info.max)
    ok = coerce("col", np.array([lo, hi], dtype=np.int64 if lo < 0 else np.uint64), datatype)
    assert ok.dtype == V2_TO_NUMPY[datatype] and ok.tolist() == [lo, hi]
    if hi < 2**63 - 1:
        refused(np.array([hi + 1], np.int64), datatype, "range")
    else:
        refused(
            np.array([2**64 - 1], np.uint64) if hi < 2**64 - 1 else np.array([2.0**64]),
            datatype,
            "range",
        )
    if lo == 0:
        refused(np.array([-1], np.int64), datatype, "range")
    elif lo > -(2**63):
        refused(np.array([lo - 1], np.int64), datatype, "range")
    else:
        refused(np.array([-(2.0**63) * 2]), datatype, "range")


@pytest.mark.parametrize(
    ("datatype", "value"),
    [
        ("INT64", 2.0**63),
        ("UINT64", 2.0**64),
        ("INT32", 2.0**31),
        ("INT8", 128.0),
        ("UINT8", -1.0),
        ("UINT8", 256.0),
        ("INT64", -(2.0**64)),
    ],
)
def test_integral_floats_out_of_range(datatype: str, value: float) -> None:
    # 2.0**63 compares equal to float(2**63 - 1): the check must not round the limit.
    refused(np.array([value]), datatype, "range")


def test_uint64_values_above_int64_are_refused_for_int64() -> None:
    refused(np.array([2**63], np.uint64), "INT64", "range")
    refused(np.array([2**64 - 1], np.uint64), "INT64", "range")


@pytest.mark.parametrize(
    ("arr", "datatype"),
    [
        (np.array([70000]), "FP16"),
        (np.array([65520.0]), "FP16"),
        (np.array([1e39]), "FP32"),
        (np.array([-1e300]), "FP32"),
        (np.array([2**64 - 1], np.uint64), "FP16"),
    ],
)
def test_finite_values_must_stay_finite(arr: np.ndarray, datatype: str) -> None:
    refused(arr, datatype, "range")


def test_non_finite_floats_stay_non_finite() -> None:
    out = coerce("col", np.array([np.nan, np.inf, -np.inf, 1.0]), "FP32")
    assert out.dtype == np.float32
    assert np.isnan(out[0]) and out[1] == np.inf and out[2] == -np.inf and out[3] == 1.0


def test_the_target_dtype_is_returned_without_copy_when_already_right() -> None:
    arr = np.array([1.0, 2.0], np.float32)
    assert coerce("col", arr, "FP32") is arr
    ints = np.array([1, 2], np.int64)
    assert coerce("col", ints, "INT64") is ints


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(INTS), st.data())
def test_property_ints_in_range_are_kept_exactly(datatype: str, data: st.DataObject) -> None:
    info = np.iinfo(V2_TO_NUMPY[datatype])
    values = data.draw(st.lists(st.integers(int(info.min), int(info.max)), min_size=1, max_size=8))
    source = data.draw(st.sampled_from(["int", "float"]))
    if source == "float":
        values = [v for v in values if abs(v) <= 2**53] or [0]
        arr = np.array(values, dtype=np.float64)
    elif all(v >= -(2**63) and v < 2**63 for v in values):
        arr = np.array(values, dtype=np.int64)
    else:
        arr = np.array(values, dtype=np.uint64)
    out = coerce("col", arr, datatype)
    assert out.dtype == V2_TO_NUMPY[datatype]
    assert out.tolist() == values


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(FLOATS), st.lists(st.integers(-2048, 2048), min_size=1, max_size=8))
def test_property_small_ints_become_floats_exactly(datatype: str, values: list[int]) -> None:
    out = coerce("col", np.array(values, dtype=np.int64), datatype)
    assert out.dtype == V2_TO_NUMPY[datatype]
    assert [int(v) for v in out.tolist()] == values


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(INTS), st.integers())
def test_property_ints_out_of_range_are_refused(datatype: str, value: int) -> None:
    info = np.iinfo(V2_TO_NUMPY[datatype])
    assume(not info.min <= value <= info.max and -(2**63) <= value < 2**64)
    arr = np.array([value], dtype=np.int64 if value < 2**63 else np.uint64)
    refused(arr, datatype, "range")


# --------------------------------------------------------------------------- check_shape


def test_check_shape_counts_elements() -> None:
    assert check_shape("t", [2, 3, 4], max_elements=24) == 24
    assert check_shape("t", [], max_elements=1) == 1
    assert check_shape("t", [0, 5], max_elements=5) == 0


@pytest.mark.parametrize(
    "shape",
    [[25], [5, 5], [0, 25], [25, 0], [0, 2**62, 2**62], [-1], [1.0], [True], "3", None, [1] * 9],
)
def test_check_shape_refuses(shape: object) -> None:
    with pytest.raises(InvalidInput, match="'t'"):
        check_shape("t", shape, max_elements=24)
