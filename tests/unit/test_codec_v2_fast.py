"""The V2 decoder's shortcut for common inputs gives what its general path gives."""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from infercore.components.tensors import V2_TO_NUMPY
from infercore.errors import InvalidInput
from infercore.protocol import v2

_leaves = (
    st.floats(allow_nan=False, allow_infinity=False)
    | st.floats(min_value=-70000, max_value=70000)
    | st.integers(-(2**64), 2**64)
    | st.integers(-300, 300)
    | st.sampled_from([2**53, 2**53 + 1, 2**31, 2**63, 65504.0, 65520.0, True, 0, 1])
    | st.booleans()
    | st.text(max_size=3)
    | st.none()
)
_dims = st.integers(-1, 5) | st.sampled_from([True, 1.0, "2", 10**9])
_shapes = st.lists(_dims, max_size=3) | st.sampled_from([[1, 4], [4, 1], [2, 2], [1], 3, None])
_datatypes = st.sampled_from(sorted(V2_TO_NUMPY)) | st.sampled_from(["FP31", 1])
_parameters = st.none() | st.just({}) | st.just({"binary_data_size": 0}) | st.just({"x": 1})


@st.composite
def _inputs(draw: st.DrawFn) -> dict[str, Any]:
    data = draw(
        st.lists(_leaves, min_size=0, max_size=6)
        | st.lists(st.lists(_leaves, min_size=1, max_size=3), min_size=1, max_size=2)
        | _leaves
    )
    inp: dict[str, Any] = {
        "name": draw(st.sampled_from(["a", "b", "c"])),
        "datatype": draw(_datatypes),
        "shape": draw(_shapes),
        "data": data,
    }
    params = draw(_parameters)
    if params is not None:
        inp["parameters"] = params
    return inp


def _outcome(body: bytes, max_elements: int) -> Any:
    try:
        decoded = v2.decode(body, None, max_elements=max_elements)
    except InvalidInput as exc:
        return ("error", str(exc))
    return (
        {
            name: (
                arr.dtype.str,
                arr.shape,
                arr.tolist() if arr.dtype.kind == "O" else arr.tobytes(),
            )
            for name, arr in decoded.tensors.items()
        },
        decoded.datatypes,
    )


def _general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(v2, "_flat_input", lambda *args: None)


@settings(deadline=None, max_examples=400)
@given(st.lists(_inputs(), min_size=1, max_size=3), st.sampled_from([4, 64, 1 << 20]))
def test_every_request_decodes_as_the_general_path_decodes(
    inputs: list[dict[str, Any]], max_elements: int
) -> None:
    body = msgspec.json.encode({"inputs": inputs})
    fast = _outcome(body, max_elements)
    with pytest.MonkeyPatch.context() as mp:
        _general_path(mp)
        general = _outcome(body, max_elements)
    assert fast == general


@settings(deadline=None)
@given(
    st.sampled_from(["FP32", "FP64", "INT64", "INT32", "BOOL", "BYTES"]),
    st.sampled_from([[1], [3], [1, 3], [3, 1]]),
    st.data(),
)
def test_the_shortcut_takes_the_common_inputs(
    datatype: str, shape: list[int], data: st.DataObject
) -> None:
    # Not only a fallback: plain values of the datatype's own kind take the shortcut.
    count = int(np.prod(shape))
    leaf = {
        "FP32": st.floats(-1e6, 1e6, width=32),
        "FP64": st.floats(allow_nan=False, allow_infinity=False),
        "INT64": st.integers(-(2**63), 2**63 - 1),
        "INT32": st.integers(-(2**31), 2**31 - 1),
        "BOOL": st.booleans(),
        "BYTES": st.text(max_size=4),
    }[datatype]
    values = data.draw(st.lists(leaf, min_size=count, max_size=count))
    arr = v2._flat_input(values, shape, datatype, 1 << 20)
    assert arr is not None
    assert arr.shape == tuple(shape)
    assert arr.dtype == (np.dtype(object) if datatype == "BYTES" else V2_TO_NUMPY[datatype])
    assert arr.ravel().tolist() == values


def test_the_shortcut_leaves_what_it_cannot_check_to_the_general_path() -> None:
    assert v2._flat_input([1.0], [1], "FP32", 0) is None  # over the element limit
    assert v2._flat_input([1.0, 2.0], [1, 2], "FP32", 1) is None
    assert v2._flat_input([], [0], "FP32", 10) is None  # empty tensors
    assert v2._flat_input([[1.0, 2.0]], [1, 2], "FP32", 10) is None  # nested data
    assert v2._flat_input([1.0], [True], "FP32", 10) is None  # a boolean is no size
    assert v2._flat_input([1.0, 2.0], [True, 2], "FP32", 10) is None
    assert v2._flat_input([1.0, 2.0], [2, 1.0], "FP32", 10) is None
    assert v2._flat_input([1.0], [1, 1, 1], "FP32", 10) is None  # three dimensions
    assert v2._flat_input([True], [1], "FP32", 10) is None  # wrong kind: worded there


# ------------------------------------------------------------------------------ encoding

_OUT_DTYPES = st.sampled_from(
    [np.dtype(t) for t in ("bool", "int8", "int64", "uint64", "float16", "float32", "float64")]
)


def _reference_encode(
    *,
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: dict[str, np.ndarray],
    requested: dict[str, bool] | None,
    binary_default: bool,
) -> tuple[bytes, int | None]:
    """The response as the encoder built it from dicts (before its Structs)."""
    names = list(outputs) if requested is None else list(requested)
    out_list: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name in names:
        arr = outputs[name]
        binary = binary_default if requested is None else requested[name]
        entry: dict[str, Any] = {
            "name": name,
            "datatype": v2.v2_datatype(arr.dtype),
            "shape": list(arr.shape),
        }
        if binary:
            raw = v2.to_binary(arr)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            flat = arr.reshape(-1)
            if flat.dtype == object or flat.dtype.kind in "SU":
                entry["data"] = [
                    v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat
                ]
            else:
                entry["data"] = flat.tolist()
        out_list.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        doc["id"] = request_id
    doc["outputs"] = out_list
    head = msgspec.json.encode(doc)
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


@st.composite
def _output_arrays(draw: st.DrawFn) -> np.ndarray:
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3))
    if draw(st.booleans()):
        strings = st.text(max_size=3) | st.binary(max_size=3)
        return draw(hnp.arrays(np.dtype(object), shape, elements=strings))
    dtype = draw(_OUT_DTYPES)
    return draw(hnp.arrays(dtype, shape))  # NaN and Inf included (P15)


@settings(deadline=None, max_examples=300)
@given(
    st.dictionaries(st.sampled_from(["y", "p", "label"]), _output_arrays(), min_size=1),
    st.none() | st.text(max_size=4),
    st.booleans(),
    st.data(),
)
def test_responses_encode_as_the_dict_encoder_did(
    outputs: dict[str, np.ndarray],
    request_id: str | None,
    binary_default: bool,
    data: st.DataObject,
) -> None:
    requested = data.draw(
        st.none()
        | st.lists(st.sampled_from(sorted(outputs)), unique=True, min_size=1).flatmap(
            lambda names: st.fixed_dictionaries({n: st.booleans() for n in names})
        )
    )
    kwargs: dict[str, Any] = {
        "model_name": "m",
        "model_version": "1",
        "request_id": request_id,
        "outputs": outputs,
        "requested": requested,
        "binary_default": binary_default,
    }
    assert v2.encode(**kwargs) == _reference_encode(**kwargs)
