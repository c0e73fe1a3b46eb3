"""``coerce``'s shortcuts (an array already of the type; BYTES checks) give the old answers."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from infercore.components.tensors import V2_TO_NUMPY
from infercore.errors import InvalidInput
from infercore.protocol import tensors
from infercore.protocol.tensors import coerce


def _reference_coerce(name: str, arr: Any, datatype: str) -> Any:
    """``coerce`` as it was before its shortcuts."""
    kind = arr.dtype.kind
    target = V2_TO_NUMPY[datatype]
    if datatype == "BYTES":
        if kind in "US":
            return arr.astype(object)
        if kind == "O" and all(isinstance(v, str | bytes) for v in arr.flat):
            return arr
        raise InvalidInput(
            f"input {name!r}: expected strings for BYTES, got {tensors._describe(arr)}"
        )
    if datatype == "BOOL":
        if kind == "b":
            return arr
        raise InvalidInput(
            f"input {name!r}: expected true/false for BOOL, got {tensors._describe(arr)}"
        )
    if kind not in "iuf":
        raise InvalidInput(
            f"input {name!r}: expected numbers for {datatype}, got {tensors._describe(arr)}"
        )
    if target.kind in "iu":
        if arr.size:
            lo, hi = tensors._integral_range(target)
            if kind == "f":
                if not np.all(np.isfinite(arr) & (arr == np.floor(arr))):
                    raise InvalidInput(f"input {name!r}: expected integers for {datatype}")
                bad = float(arr.min()) < lo or float(arr.max()) >= hi + 1
            else:
                bad = int(arr.min()) < lo or int(arr.max()) > hi
            if bad:
                raise InvalidInput(
                    f"input {name!r}: value out of range for {datatype} ({lo}..{hi})"
                )
        return arr.astype(target, copy=False)
    if arr.dtype == target:
        return arr
    if arr.size:
        bound = tensors._float_max(target)
        if arr.size <= 8:
            in_range = all(-bound <= v <= bound for v in arr.ravel().tolist())
        else:
            in_range = bool(-bound <= arr.min() and arr.max() <= bound)
        if in_range:
            return arr.astype(target)
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(target, copy=False)
    if out is not arr and out.size and not np.all(np.isfinite(out) | ~np.isfinite(arr)):
        raise InvalidInput(f"input {name!r}: value out of range for {datatype}")
    return out


def _outcome(fn: Any, arr: Any, datatype: str) -> Any:
    try:
        out = fn("x", arr, datatype)
    except InvalidInput as exc:
        return ("error", str(exc))
    values = out.tolist() if out.dtype.kind == "O" else out.tobytes()
    return (out.dtype.str, out.shape, values, out is arr)


_NUMERIC = st.sampled_from(
    [np.dtype(t) for t in ("bool", "int8", "int64", "uint8", "uint64", "float16", "float32")]
    + [np.dtype("float64"), np.dtype(">f4"), np.dtype(">i8")]
)
_SHAPES = hnp.array_shapes(min_dims=1, max_dims=2, min_side=0, max_side=3)
_OBJECTS = st.text(max_size=2) | st.binary(max_size=2) | st.integers(-3, 3) | st.none()


@st.composite
def _arrays(draw: st.DrawFn) -> Any:
    if draw(st.booleans()):
        return draw(hnp.arrays(np.dtype(object), _SHAPES, elements=_OBJECTS))
    return draw(hnp.arrays(draw(_NUMERIC), _SHAPES))


@settings(deadline=None, max_examples=500)
@given(_arrays(), st.sampled_from(sorted(V2_TO_NUMPY)))
def test_coerce_answers_as_before(arr: Any, datatype: str) -> None:
    assert _outcome(coerce, arr, datatype) == _outcome(_reference_coerce, arr, datatype)


@settings(deadline=None)
@given(st.sampled_from([d for d in sorted(V2_TO_NUMPY) if d != "BYTES"]), st.data())
def test_an_array_of_the_type_comes_back_as_it_is(datatype: str, data: st.DataObject) -> None:
    arr = data.draw(hnp.arrays(V2_TO_NUMPY[datatype], _SHAPES))
    assert coerce("x", arr, datatype) is arr
