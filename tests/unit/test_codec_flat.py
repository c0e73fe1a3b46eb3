"""The flat-list shortcut of the V2 JSON decoder gives what the general path gives."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from infercore.components.tensors import V2_TO_NUMPY
from infercore.errors import InvalidInput
from infercore.protocol import tensors

_leaves = (
    st.floats(allow_nan=False, allow_infinity=False)
    | st.floats(min_value=-70000, max_value=70000)
    | st.integers(-(2**64), 2**64)
    | st.integers(-300, 300)
    | st.sampled_from([2**53, 2**53 + 1, -(2**53) - 1, 2**31, 2**63 - 1, 2**63, 65504.0, 65520.0])
    | st.booleans()
    | st.text(max_size=3)
    | st.none()
)


def _outcome(fn: Any, data: list[Any], datatype: str) -> Any:
    try:
        arr = fn("x", data, [len(data)], datatype, len(data))
    except InvalidInput as exc:
        return ("error", str(exc))
    return (arr.dtype.str, arr.shape, arr.tolist() if arr.dtype == object else arr.tobytes())


@settings(deadline=None, max_examples=300)
@given(st.sampled_from(sorted(V2_TO_NUMPY)), st.lists(_leaves, min_size=1, max_size=6))
def test_flat_lists_decode_as_the_general_path_does(datatype: str, data: list[Any]) -> None:
    assert _outcome(tensors.from_json, data, datatype) == _outcome(
        tensors._from_json, data, datatype
    )


@settings(deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=8))
def test_the_shortcut_takes_plain_floats(data: list[float]) -> None:
    # Not only a fallback: a flat list of in-range floats takes the shortcut.
    arr = tensors._from_flat_json(data, "FP32", len(data))
    assert arr is not None
    np.testing.assert_array_equal(arr, np.array(data, dtype=np.float64).astype(np.float32))
