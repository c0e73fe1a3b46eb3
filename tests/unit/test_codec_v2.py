"""The Open Inference Protocol (V2) codec: JSON and binary tensors, limits and error messages."""

from __future__ import annotations

import json
import re
import struct
import tracemalloc
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tritonclient.http import _utils as triton_utils

from infercore.errors import InvalidInput
from infercore.protocol import v2
from infercore.protocol.tensors import from_binary, to_binary, to_json_data

NUMERIC = [
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "FP16",
    "FP32",
    "FP64",
]
ALL_TYPES = ["BOOL", *NUMERIC, "BYTES"]
NP = {
    "BOOL": np.bool_,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
LIMIT = 1 << 20


def sample(datatype: str) -> np.ndarray:
    """A 2x3 array of ``datatype`` that includes each type's extremes."""
    if datatype == "BYTES":
        return np.array([["a", "", "héllo"], ["x y", "{}", "\u2603"]], dtype=object)
    if datatype == "BOOL":
        return np.array([[True, False, True], [False, False, True]])
    dt = np.dtype(NP[datatype])
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return np.array([[info.min, info.max, 0], [1, info.max - 1, info.min + 1]], dtype=dt)
    info = np.finfo(dt)
    return np.array([[info.min, info.max, 0.0], [-0.0, info.tiny, 1.5]], dtype=dt)


def body(inputs: list[dict[str, Any]], **extra: Any) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


def decode(raw: bytes, header_length: int | None = None) -> v2.DecodedV2:
    return v2.decode(raw, header_length, max_elements=max(len(raw), 1))


def triton_request(
    arrays: dict[str, tuple[np.ndarray, str]],
    *,
    binary: bool,
    outputs: list[Any] | None = None,
    request_id: str = "",
) -> tuple[bytes, int | None]:
    """A request body exactly as ``tritonclient[http]`` builds it."""
    inputs = []
    for name, (arr, datatype) in arrays.items():
        inp = triton.InferInput(name, list(arr.shape), datatype)
        inp.set_data_from_numpy(arr, binary_data=binary)
        inputs.append(inp)
    raw, json_size = triton_utils._get_inference_request(
        inputs=inputs,
        request_id=request_id,
        outputs=outputs,
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        custom_parameters=None,
    )
    return raw, json_size


def triton_result(raw: bytes, header_length: int | None) -> Any:
    """Parse a response the way ``tritonclient[http]`` does."""
    return triton.InferResult.from_response_body(raw, header_length=header_length)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal shape, dtype and bits (so -0.0 and NaN payloads count)."""
    if a.dtype == object or b.dtype == object:
        return a.shape == b.shape and [_as_bytes(x) for x in a.flat] == [
            _as_bytes(x) for x in b.flat
        ]
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _as_bytes(v: Any) -> bytes:
    return v.encode() if isinstance(v, str) else bytes(v)


def strict_json(raw: bytes) -> Any:
    """``json.loads`` that refuses the NaN/Infinity extensions Python accepts by default."""

    def refuse(token: str) -> Any:
        raise ValueError(f"not JSON: {token}")

    return json.loads(raw, parse_constant=refuse)


def expect_invalid(raw: bytes, *needles: str, header_length: int | None = None) -> str:
    with pytest.raises(InvalidInput) as info:
        decode(raw, header_length)
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    assert info.value.status_code == 400
    return message


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("datatype", ALL_TYPES)
@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_json_round_trip_every_datatype(datatype: str, nested: bool) -> None:
    arr = sample(datatype)
    data = arr.tolist() if nested else arr.reshape(-1).tolist()
    decoded = decode(body([{"name": "t", "shape": [2, 3], "datatype": datatype, "data": data}]))
    got = decoded.tensors["t"]
    assert decoded.datatypes == {"t": datatype}
    assert got.shape == (2, 3)
    if datatype == "BYTES":
        assert got.tolist() == arr.tolist()
    else:
        assert same(got, arr)
    raw, head = v2.encode(
        model_name="m",
        model_version="1",
        request_id=None,
        outputs={"t": got},
        requested=None,
        binary_default=False,
    )
    assert head is None
    out = strict_json(raw)["outputs"][0]
    assert out == {
        "name": "t",
        "datatype": datatype,
        "shape": [2, 3],
        "data": arr.reshape(-1).tolist(),
    }


@pytest.mark.parametrize("datatype", ALL_TYPES)
def test_binary_round_trip_through_tritonclient(datatype: str) -> None:
    arr = sample(datatype)
    if datatype == "BYTES":
        arr = np.array([[s.encode() for s in row] for row in arr.tolist()], dtype=object)
    raw, json_size = triton_request(
        {"t": (arr, datatype)},
        binary=True,
        request_id="req-7",
        outputs=[triton.InferRequestedOutput("t", binary_data=True)],
    )
    assert json_size is not None
    decoded = decode(raw, json_size)
    assert decoded.id == "req-7"
    assert decoded.outputs == {"t": True}
    assert same(decoded.tensors["t"], arr)
    out, head = v2.encode(
        model_name="m",
        model_version="1",
        request_id=decoded.id,
        outputs=decoded.tensors,
        requested=decoded.outputs,
        binary_default=decoded.binary_default,
    )
    assert head is not None and head < len(out)
    result = triton_result(out, head)
    assert result.get_response()["id"] == "req-7"
    assert result.get_output("t")["datatype"] == datatype
    assert same(result.as_numpy("t"), arr)


@pytest.mark.parametrize("datatype", ALL_TYPES)
def test_json_request_from_tritonclient(datatype: str) -> None:
    arr = sample(datatype)
    raw, json_size = triton_request(
        {"t": (arr, datatype)},
        binary=False,
        outputs=[triton.InferRequestedOutput("t", binary_data=False)],
    )
    assert json_size is None
    decoded = decode(raw)
    assert decoded.outputs == {"t": False}
    out, head = v2.encode(
        model_name="m",
        model_version="1",
        request_id=None,
        outputs=decoded.tensors,
        requested=decoded.outputs,
        binary_default=False,
    )
    assert head is None
    got = triton_result(out, None).as_numpy("t")
    if datatype == "BYTES":
        assert [v.decode() if isinstance(v, bytes) else v for v in got.flat] == list(arr.flat)
    else:
        assert same(got, arr)


def test_hand_built_binary_body_mixes_binary_and_json_inputs() -> None:
    floats = np.arange(6, dtype="<f4").reshape(2, 3)
    words = [b"ab", b"", b"\x00\xff"]
    blob_words = b"".join(struct.pack("<I", len(w)) + w for w in words)
    head = json.dumps(
        {
            "id": "42",
            "inputs": [
                {
                    "name": "f",
                    "shape": [2, 3],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": floats.nbytes},
                },
                {"name": "j", "shape": [2], "datatype": "INT64", "data": [7, -7]},
                {
                    "name": "w",
                    "shape": [3],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(blob_words)},
                },
            ],
        }
    ).encode()
    decoded = decode(head + floats.tobytes() + blob_words, len(head))
    assert decoded.id == "42"
    assert same(decoded.tensors["f"], floats)
    assert decoded.tensors["j"].tolist() == [7, -7]
    assert decoded.tensors["j"].dtype == np.int64
    assert decoded.tensors["w"].tolist() == words
    assert to_binary(decoded.tensors["w"]) == blob_words
    assert decoded.datatypes == {"f": "FP32", "j": "INT64", "w": "BYTES"}


# -------------------------------------------------------------------- property round trips

_DTYPES = st.sampled_from([NP[d] for d in NUMERIC] + [np.bool_])
_SHAPES = hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_property_json_round_trip(data: st.DataObject) -> None:
    dtype = np.dtype(data.draw(_DTYPES))
    arr = data.draw(
        hnp.arrays(
            dtype,
            _SHAPES,
            elements={"allow_nan": False, "allow_infinity": False} if dtype.kind == "f" else None,
        )
    )
    datatype = v2.v2_datatype(dtype)
    nested = data.draw(st.booleans())
    payload = arr.tolist() if nested and arr.size else arr.reshape(-1).tolist()
    decoded = decode(
        body([{"name": "a", "shape": list(arr.shape), "datatype": datatype, "data": payload}])
    )
    assert same(decoded.tensors["a"], arr)
    raw, _ = v2.encode(
        model_name="m",
        model_version="1",
        request_id=None,
        outputs=decoded.tensors,
        requested=None,
        binary_default=False,
    )
    out = strict_json(raw)["outputs"][0]
    assert out["shape"] == list(arr.shape) and out["datatype"] == datatype
    again = decode(body([{"name": "a", **out}]))
    assert same(again.tensors["a"], arr)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_property_binary_round_trip(data: st.DataObject) -> None:
    dtype = np.dtype(data.draw(_DTYPES))
    arr = data.draw(hnp.arrays(dtype, _SHAPES))  # NaN and Inf included: binary carries them
    datatype = v2.v2_datatype(dtype)
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "a",
                    "shape": list(arr.shape),
                    "datatype": datatype,
                    "parameters": {"binary_data_size": arr.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    blob = arr.astype(dtype.newbyteorder("<")).tobytes()
    decoded = decode(head + blob, len(head))
    assert same(decoded.tensors["a"], arr)
    out, head_len = v2.encode(
        model_name="m",
        model_version="1",
        request_id=None,
        outputs=decoded.tensors,
        requested=decoded.outputs,
        binary_default=decoded.binary_default,
    )
    assert head_len is not None
    assert out[head_len:] == blob
    meta = strict_json(out[:head_len])["outputs"][0]
    assert meta["parameters"] == {"binary_data_size": len(blob)}
    assert same(triton_result(out, head_len).as_numpy("a"), arr)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(max_size=12), min_size=0, max_size=6))
def test_property_bytes_binary_round_trip(items: list[bytes]) -> None:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    blob = to_binary(arr)
    got = from_binary("w", memoryview(blob), [len(items)], "BYTES", len(items))
    assert got.tolist() == items
    assert to_binary(got) == blob


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(max_size=8), min_size=1, max_size=6))
def test_property_bytes_json_round_trip(items: list[str]) -> None:
    decoded = decode(
        body([{"name": "s", "shape": [len(items)], "datatype": "BYTES", "data": items}])
    )
    assert decoded.tensors["s"].tolist() == items
    assert to_json_data(decoded.tensors["s"]) == items


# ------------------------------------------------------------------- outputs and the id


def test_requested_outputs_binary_flags_and_id() -> None:
    raw = body(
        [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],
        id="abc",
        parameters={"binary_data_output": True},
        outputs=[{"name": "y", "parameters": {"binary_data": False}}, {"name": "z"}],
    )
    decoded = decode(raw)
    assert decoded.id == "abc"
    assert decoded.binary_default is True
    # z takes the request-level default, y overrides it; order follows the request.
    assert decoded.outputs == {"y": False, "z": True}
    outputs = {
        "z": np.array([1, 2], np.int32),
        "y": np.array([0.5], np.float32),
        "unrequested": np.array([9.0]),
    }
    out, head = v2.encode(
        model_name="m",
        model_version="3",
        request_id=decoded.id,
        outputs=outputs,
        requested=decoded.outputs,
        binary_default=decoded.binary_default,
    )
    assert head is not None
    doc = strict_json(out[:head])
    assert doc["id"] == "abc" and doc["model_name"] == "m" and doc["model_version"] == "3"
    assert [o["name"] for o in doc["outputs"]] == ["y", "z"]
    assert doc["outputs"][0]["data"] == [0.5]
    assert doc["outputs"][1]["parameters"] == {"binary_data_size": 8}
    assert out[head:] == np.array([1, 2], "<i4").tobytes()
    result = triton_result(out, head)
    assert result.as_numpy("y").tolist() == [0.5]
    assert result.as_numpy("z").tolist() == [1, 2]


@pytest.mark.parametrize("value", ["false", "true", 0, 1, None, [], {}])
@pytest.mark.parametrize("where", ["request", "output"])
def test_a_binary_flag_that_is_not_a_boolean_is_refused(value: Any, where: str) -> None:
    # "false" is truthy: read loosely it sent binary tensors to a client that asked for JSON.
    flags = {"binary_data_output" if where == "request" else "binary_data": value}
    extra: dict[str, Any] = (
        {"parameters": flags}
        if where == "request"
        else {"outputs": [{"name": "y", "parameters": flags}]}
    )
    raw = body([{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], **extra)
    named = "parameters.binary_data_output" if where == "request" else "'y': parameters.binary"
    with pytest.raises(InvalidInput, match=re.escape(named) + ".*expected true or false"):
        decode(raw)


def test_all_outputs_json_by_default_and_no_id_when_absent() -> None:
    decoded = decode(body([{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]))
    assert decoded.outputs is None and decoded.binary_default is False and decoded.id is None
    out, head = v2.encode(
        model_name="m",
        model_version="1",
        request_id=None,
        outputs={"a": np.array([1.0]), "b": np.array([True])},
        requested=None,
        binary_default=False,
    )
    assert head is None
    doc = strict_json(out)
    assert "id" not in doc
    assert [(o["name"], o["data"]) for o in doc["outputs"]] == [("a", [1.0]), ("b", [True])]


def test_binary_data_output_without_requested_outputs_sends_all_binary() -> None:
    out, head = v2.encode(
        model_name="m",
        model_version="1",
        request_id="i",
        outputs={"a": np.array([1.0, 2.0]), "b": np.array([3], np.uint8)},
        requested=None,
        binary_default=True,
    )
    assert head is not None
    assert out[head:] == np.array([1.0, 2.0], "<f8").tobytes() + b"\x03"
    result = triton_result(out, head)
    assert result.as_numpy("a").tolist() == [1.0, 2.0]
    assert result.as_numpy("b").tolist() == [3]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_nan_and_inf_outputs_encode_as_null(dtype: type) -> None:
    arr = np.array([np.nan, np.inf, -np.inf, 1.5], dtype=dtype)
    out, head = v2.encode(
        model_name="m",
        model_version="1",
        request_id=None,
        outputs={"y": arr},
        requested=None,
        binary_default=False,
    )
    assert head is None
    assert strict_json(out)["outputs"][0]["data"] == [None, None, None, 1.5]


def test_nan_output_in_binary_keeps_its_bits() -> None:
    arr = np.array([np.nan, -np.inf], np.float32)
    out, head = v2.encode(
        model_name="m",
        model_version="1",
        request_id=None,
        outputs={"y": arr},
        requested={"y": True},
        binary_default=False,
    )
    assert head is not None
    strict_json(out[:head])
    assert out[head:] == arr.tobytes()


# ------------------------------------------------------------------------------ bad input


def inp(
    name: str = "in_0", shape: Any = (2,), datatype: str = "FP32", data: Any = (1, 2), **extra: Any
) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": name,
        "shape": list(shape) if isinstance(shape, tuple) else shape,
        "datatype": datatype,
        **extra,
    }
    if data is not None:
        d["data"] = list(data) if isinstance(data, tuple) else data
    return d


@pytest.mark.parametrize("raw", [b'{"inputs": [', b"not json", b"", b"\xff\xfe"])
def test_malformed_json(raw: bytes) -> None:
    expect_invalid(raw, "malformed JSON")


def test_body_not_an_object() -> None:
    expect_invalid(b"[1, 2]", "invalid V2 request")


def test_missing_inputs() -> None:
    expect_invalid(b'{"id": "1"}', "inputs")


def test_empty_inputs() -> None:
    expect_invalid(body([]), "`inputs` is empty")


def test_duplicate_input_names() -> None:
    expect_invalid(body([inp(), inp()]), "'in_0'", "twice")


@pytest.mark.parametrize("datatype", ["FP8", "fp32", "STRING", "", 5, None])
def test_unknown_datatype(datatype: Any) -> None:
    expect_invalid(body([inp(datatype=datatype)]), "'in_0'", "datatype")


@pytest.mark.parametrize(
    "shape", [[-1], [2, -3], [1.5], [True], ["2"], [None], "2", 2, [[2]], [1] * 9]
)
def test_bad_shape_dims_name_the_input(shape: Any) -> None:
    expect_invalid(body([inp(shape=shape)]), "'in_0'", "shape")


@pytest.mark.parametrize(
    ("shape", "data"),
    [
        ([3], [1, 2]),
        ([2], [1, 2, 3]),
        ([2, 2], [1, 2, 3]),
        ([0], [1]),
        ([2, 2], [[1, 2, 3]]),
        ([1], []),
    ],
)
def test_shape_data_mismatch(shape: list[int], data: list[Any]) -> None:
    expect_invalid(body([inp(shape=shape, data=data)]), "'in_0'")


@pytest.mark.parametrize("data", [[[1, 2], [3]], [[1, 2], 3], [1, [2, 3]], [[[1]], [2]]])
def test_ragged_nested_lists(data: list[Any]) -> None:
    expect_invalid(body([inp(shape=[2, 2], data=data)]), "'in_0'")


@pytest.mark.parametrize("datatype", NUMERIC)
@pytest.mark.parametrize(
    "data", [["1", "2"], [1, "2"], [True, False], [1, True], [True, 2.5], [{"a": 1}, 2], [[1], 2]]
)
def test_wrong_kinds_for_numbers(datatype: str, data: list[Any]) -> None:
    expect_invalid(body([inp(datatype=datatype, data=data)]), "'in_0'")


@pytest.mark.parametrize("data", [[1, 0], [True, 1], [1.0, 0.0], ["true", "false"], [True, None]])
def test_numbers_for_bool(data: list[Any]) -> None:
    expect_invalid(body([inp(datatype="BOOL", data=data)]), "'in_0'")


@pytest.mark.parametrize("data", [[1, 2], ["a", 1], ["a", True], ["a", None], [["a"], "b"]])
def test_non_strings_for_bytes(data: list[Any]) -> None:
    expect_invalid(body([inp(datatype="BYTES", data=data)]), "'in_0'")


@pytest.mark.parametrize("datatype", ALL_TYPES)
@pytest.mark.parametrize("data", [[1, None], [None, None], [[None], [1]]])
def test_null_in_data(datatype: str, data: list[Any]) -> None:
    shape = [2, 1] if isinstance(data[0], list) else [2]
    expect_invalid(body([inp(datatype=datatype, shape=shape, data=data)]), "'in_0'")


def test_missing_data() -> None:
    expect_invalid(body([inp(data=None)]), "'in_0'", "data")
    expect_invalid(body([{**inp(), "data": None}]), "'in_0'", "data")


@pytest.mark.parametrize(
    ("datatype", "value"),
    [
        ("INT8", 128),
        ("INT8", -129),
        ("UINT8", 256),
        ("UINT8", -1),
        ("INT16", 2**15),
        ("UINT16", 2**16),
        ("INT32", 2**31),
        ("UINT32", -1),
        ("INT64", 2**63),
        ("INT64", -(2**63) - 1),
        ("UINT64", 2**64),
        ("UINT64", -1),
        ("INT64", 2**70),
        ("INT8", 128.0),
        ("INT64", 9.223372036854775808e18),
        ("UINT64", 1.8446744073709552e19),
        ("FP16", 70000),
        ("FP16", 1e10),
        ("FP32", 1e39),
        ("FP32", 10**39),
        ("FP64", 10**400),
    ],
)
def test_values_out_of_range(datatype: str, value: Any) -> None:
    expect_invalid(body([inp(datatype=datatype, shape=[1], data=[value])]), "'in_0'", "range")


@pytest.mark.parametrize(
    ("datatype", "value"),
    [
        ("INT8", 127),
        ("INT8", -128),
        ("UINT8", 255),
        ("INT64", 2**63 - 1),
        ("INT64", -(2**63)),
        ("UINT64", 2**64 - 1),
        ("INT32", 5.0),
        ("FP16", 65504),
        ("FP64", 2**70),
        ("FP32", 3),
    ],
)
def test_values_at_the_edge_of_range_are_kept(datatype: str, value: Any) -> None:
    decoded = decode(body([inp(datatype=datatype, shape=[1], data=[value])]))
    arr = decoded.tensors["in_0"]
    assert arr.dtype == NP[datatype]
    assert arr[0] == value
    assert int(arr[0]) == int(value)


@pytest.mark.parametrize("datatype", [d for d in NUMERIC if not d.startswith("FP")])
@pytest.mark.parametrize("value", [1.5, -0.25, 1e-9])
def test_non_integral_floats_for_int_types(datatype: str, value: float) -> None:
    expect_invalid(body([inp(datatype=datatype, shape=[2], data=[1, value])]), "'in_0'", "integers")


@pytest.mark.parametrize(
    "shape", [[10**12, 10**12], [2**40], [0, 10**30], [0, 2**62, 2**62], [10**6] * 8]
)
@pytest.mark.parametrize("binary", [False, True])
def test_huge_declared_shape_fails_before_allocating(shape: list[int], binary: bool) -> None:
    tensor: dict[str, Any] = {"name": "in_0", "shape": shape, "datatype": "FP64"}
    if binary:
        tensor["parameters"] = {"binary_data_size": 8}
        head = json.dumps({"inputs": [tensor]}).encode()
        raw, header_length = head + b"\x00" * 8, len(head)
    else:
        tensor["data"] = [1.0]
        raw, header_length = json.dumps({"inputs": [tensor]}).encode(), None
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInput) as info:
            v2.decode(raw, header_length, max_elements=LIMIT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "'in_0'" in str(info.value)
    assert peak < LIMIT


@pytest.mark.parametrize("shape", [[0, 10**30], [0, 2**40, 2**40], [2**40, 0]])
@pytest.mark.parametrize("binary", [False, True])
def test_empty_tensor_with_a_huge_dimension_is_refused(shape: list[int], binary: bool) -> None:
    # No element at all, so no count can catch it: numpy could not even represent the shape.
    tensor: dict[str, Any] = {"name": "in_0", "shape": shape, "datatype": "FP32"}
    if binary:
        tensor["parameters"] = {"binary_data_size": 0}
    else:
        tensor["data"] = []
    raw = json.dumps({"inputs": [tensor]}).encode()
    with pytest.raises(InvalidInput, match="in_0"):
        v2.decode(raw, len(raw) if binary else None, max_elements=LIMIT)


def test_declared_shape_much_larger_than_data_allocates_little() -> None:
    # Within the element limit, yet far more than the data sent: refused without allocating.
    raw = body([inp(shape=[LIMIT], datatype="FP64", data=[1.0])])
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInput, match="in_0"):
            v2.decode(raw, None, max_elements=LIMIT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < LIMIT  # 8 MiB if the declared tensor had been allocated


def binary_body(tensors: list[dict[str, Any]], blob: bytes) -> tuple[bytes, int]:
    head = json.dumps({"inputs": tensors}).encode()
    return head + blob, len(head)


def test_binary_data_size_past_the_end() -> None:
    raw, n = binary_body([inp(data=None, parameters={"binary_data_size": 12})], b"\x00" * 8)
    expect_invalid(raw, "'in_0'", "binary_data_size", header_length=n)


def test_binary_data_size_of_second_input_past_the_end() -> None:
    raw, n = binary_body(
        [
            inp(data=None, parameters={"binary_data_size": 8}),
            inp(name="in_1", data=None, parameters={"binary_data_size": 8}),
        ],
        b"\x00" * 12,
    )
    expect_invalid(raw, "'in_1'", header_length=n)


@pytest.mark.parametrize("size", [-1, 1.5, "8", True])
def test_binary_data_size_not_a_size(size: Any) -> None:
    raw, n = binary_body([inp(data=None, parameters={"binary_data_size": size})], b"\x00" * 8)
    expect_invalid(raw, "'in_0'", header_length=n)


def test_binary_data_size_wrong_for_shape() -> None:
    raw, n = binary_body([inp(data=None, parameters={"binary_data_size": 4})], b"\x00" * 4)
    expect_invalid(raw, "'in_0'", "bytes", header_length=n)


def test_leftover_binary_bytes() -> None:
    raw, n = binary_body([inp(data=None, parameters={"binary_data_size": 8})], b"\x00" * 9)
    expect_invalid(raw, "left over", header_length=n)


def test_binary_bytes_without_any_binary_input() -> None:
    raw, n = binary_body([inp()], b"\x00" * 4)
    expect_invalid(raw, "left over", header_length=n)


@pytest.mark.parametrize("delta", [1, 100])
def test_header_length_larger_than_body(delta: int) -> None:
    raw, n = binary_body([inp()], b"")
    expect_invalid(raw, "Inference-Header-Content-Length", header_length=n + delta)


def test_negative_header_length() -> None:
    raw, _ = binary_body([inp()], b"")
    expect_invalid(raw, "Inference-Header-Content-Length", header_length=-1)


def test_header_length_cutting_the_json() -> None:
    raw, n = binary_body([inp()], b"")
    expect_invalid(raw, "malformed JSON", header_length=n - 3)


@pytest.mark.parametrize(
    "blob",
    [
        b"\x02\x00\x00",
        b"\x05\x00\x00\x00ab",
        b"\x01\x00\x00\x00a\x01\x00",
    ],
)
def test_truncated_binary_bytes(blob: bytes) -> None:
    raw, n = binary_body(
        [inp(datatype="BYTES", shape=[1], data=None, parameters={"binary_data_size": len(blob)})],
        blob,
    )
    expect_invalid(raw, "'in_0'", header_length=n)


def test_binary_bytes_element_count_mismatch() -> None:
    blob = b"\x01\x00\x00\x00a" * 3
    raw, n = binary_body(
        [inp(datatype="BYTES", shape=[2], data=None, parameters={"binary_data_size": len(blob)})],
        blob,
    )
    expect_invalid(raw, "'in_0'", "2 elements", header_length=n)


def test_binary_bool_bytes_must_be_zero_or_one() -> None:
    raw, n = binary_body(
        [inp(datatype="BOOL", shape=[2], data=None, parameters={"binary_data_size": 2})],
        b"\x01\x02",
    )
    expect_invalid(raw, "'in_0'", "BOOL", header_length=n)


def test_an_error_after_a_rejection_leaves_the_codec_usable() -> None:
    expect_invalid(body([inp(shape=[10**12, 10**12])]), "'in_0'")
    assert decode(body([inp()])).tensors["in_0"].tolist() == [1.0, 2.0]


def test_empty_tensor_with_zero_dim_is_accepted() -> None:
    decoded = decode(body([inp(shape=[0, 3], data=[])]))
    assert decoded.tensors["in_0"].shape == (0, 3)
    assert decoded.tensors["in_0"].dtype == np.float32


def test_bytes_keep_trailing_nul_characters() -> None:
    # numpy's fixed-width strings would silently drop them.
    items = ["a\x00", "\x00", "", "b\x00\x00"]
    decoded = decode(body([inp(datatype="BYTES", shape=[4], data=items)]))
    assert decoded.tensors["in_0"].tolist() == items
    raw, _ = v2.encode(
        model_name="m",
        model_version="1",
        request_id=None,
        outputs=decoded.tensors,
        requested=None,
        binary_default=False,
    )
    assert strict_json(raw)["outputs"][0]["data"] == items


def test_nested_and_ragged_bytes() -> None:
    nested = [["a", "b"], ["c", "d"]]
    decoded = decode(body([inp(datatype="BYTES", shape=[2, 2], data=nested)]))
    assert decoded.tensors["in_0"].shape == (2, 2)
    assert decoded.tensors["in_0"].tolist() == nested
    expect_invalid(
        body([inp(datatype="BYTES", shape=[3], data=[["a", "b"], ["c"]])]), "'in_0'", "ragged"
    )
