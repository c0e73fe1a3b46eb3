"""Limits the V2 and V1 decoders check before converting a tensor's data (RELIABILITY P14),
and error messages that stay small whatever the client sent.

Each refusal is shown to happen before conversion with an instrumented converter that fails
the test if it is called, never by timing.
"""

from __future__ import annotations

import asyncio
import gc
import json
import struct
from typing import Any

import msgspec
import numpy as np
import pytest

from infercore.components import TensorSpec
from infercore.errors import InvalidInput
from infercore.protocol import tensors, v1, v2
from infercore.protocol.names import listed
from infercore.runtime.inputs import prepare_inputs

MAX_ELEMENTS = 8 << 20


def body(*inputs: dict[str, Any]) -> bytes:
    return json.dumps({"inputs": list(inputs)}).encode()


def tensor(shape: list[int], data: Any, datatype: str = "FP32", name: str = "x") -> dict[str, Any]:
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


@pytest.fixture
def no_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    """Converting any JSON or binary data fails the test."""

    def converted(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the data was converted before the refusal")

    # The general path's conversion; the shortcut (a few values, counted first) converts
    # nothing for data of another length than the shape's.
    monkeypatch.setattr(tensors, "json_array", converted)
    monkeypatch.setattr(v2, "from_binary", converted)
    monkeypatch.setattr(v2, "_flat_input", lambda *args: None)


def refused(raw: bytes, *needles: str, header_length: int | None = None, **kw: Any) -> str:
    with pytest.raises(InvalidInput) as info:
        v2.decode(raw, header_length, max_elements=MAX_ELEMENTS, **kw)
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    return message


# --- rows, from the declared shape ---------------------------------------------------------


@pytest.mark.usefixtures("no_conversion")
def test_rows_over_the_limit_are_refused_from_the_declared_shape() -> None:
    raw = body(tensor([5000, 4], [0] * 20000))
    refused(
        raw,
        "input 'x'",
        "shape [5000, 4] has 5000 rows; the limit is 4096",
        "max_request_rows",
        max_rows=4096,
    )


@pytest.mark.usefixtures("no_conversion")
def test_binary_rows_over_the_limit_are_refused_before_reading() -> None:
    blob = b"".join(struct.pack("<I", 0) for _ in range(5000))
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "s",
                    "shape": [5000],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(blob)},
                }
            ]
        }
    ).encode()
    refused(head + blob, "input 's'", "5000 rows", header_length=len(head), max_rows=4096)


def test_rows_at_the_limit_and_unbatched_inputs_pass() -> None:
    raw = body(tensor([4096, 1], [0.5] * 4096), tensor([5000], [1.0] * 5000, name="fixed"))
    asked: list[str] = []

    def unbatched(name: str) -> bool:
        asked.append(name)
        return name == "fixed"

    decoded = v2.decode(raw, None, max_elements=MAX_ELEMENTS, max_rows=4096, unbatched=unbatched)
    assert decoded.tensors["x"].shape == (4096, 1)
    assert decoded.tensors["fixed"].shape == (5000,)
    assert asked == ["fixed"]  # asked only for the input over the limit
    refused(raw, "input 'fixed'", "5000 rows", max_rows=4096, unbatched=lambda name: False)


# --- data against the declared shape, before converting ------------------------------------


@pytest.mark.usefixtures("no_conversion")
@pytest.mark.parametrize(
    ("shape", "data", "needle"),
    [
        ([1, 4], [[]] * 3000, "needs 4 elements, data has 0"),  # the audit's [[],[],...]
        ([1, 4], [0] * 4000, "needs 4 elements, data has 4000"),
        ([1, 4], [[0] * 4000], "needs 4 elements, data has 4000"),
        ([2, 4], [[0, 0, 0, 0], [0] * 4000], "ragged"),  # one huge list after a good one
        ([2, 4], [[0, 0, 0, 0], 7], "ragged"),
        ([0, 4], [[]] * 3000, "holds no elements"),
        ([1, 0], [[]] * 3000, "holds no elements"),
        ([3, 0], [[], [], [0] * 4000], "ragged"),
    ],
)
def test_data_that_cannot_fit_the_shape_is_refused_unconverted(
    shape: list[int], data: Any, needle: str
) -> None:
    refused(body(tensor(shape, data)), "input 'x'", needle, max_rows=4096)


@pytest.mark.usefixtures("no_conversion")
def test_bytes_data_longer_than_the_shape_is_refused_unconverted() -> None:
    refused(body(tensor([1], [""] * 3000, "BYTES", "s")), "input 's'", "data has 3000")


def test_binary_bytes_stop_at_the_declared_count(monkeypatch: pytest.MonkeyPatch) -> None:
    blob = b"".join(struct.pack("<I", 0) for _ in range(3000))
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "s",
                    "shape": [2],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(blob)},
                }
            ]
        }
    ).encode()
    reads = 0
    unpack_from = struct.unpack_from

    class CountingStruct:
        @staticmethod
        def unpack_from(fmt: str, buffer: Any, offset: int = 0) -> tuple[Any, ...]:
            nonlocal reads
            reads += 1
            return unpack_from(fmt, buffer, offset)

    monkeypatch.setattr(tensors, "struct", CountingStruct)
    refused(head + blob, "input 's'", "needs 2 elements, data has more", header_length=len(head))
    assert reads == 2  # not 3000


@pytest.mark.parametrize(
    ("shape", "data"),
    [
        ([2, 2], [[1, 2], [3, 4]]),
        ([2, 2], [1, 2, 3, 4]),
        ([4], [[1, 2, 3, 4]]),  # another nesting of the same count stays accepted
        ([2, 2, 2], [[1, 2], [3, 4], [5, 6], [7, 8]]),
        ([0, 3], []),
        ([3, 0], [[], [], []]),
        ([2, 1, 3], [[[1, 2, 3]], [[4, 5, 6]]]),
    ],
)
def test_data_that_fits_is_decoded_as_before(shape: list[int], data: Any) -> None:
    decoded = v2.decode(body(tensor(shape, data)), None, max_elements=MAX_ELEMENTS, max_rows=4096)
    got = decoded.tensors["x"]
    assert got.shape == tuple(shape)
    assert got.ravel().tolist() == np.asarray(data, dtype=np.float32).ravel().tolist()


# --- a large body is parsed with the collector paused --------------------------------------


def test_a_large_body_is_parsed_without_garbage_collections() -> None:
    seen: list[bool] = []

    class Recorder:
        def decode(self, raw: bytes) -> Any:
            seen.append(gc.isenabled())
            return msgspec.json.decode(raw)

    assert gc.isenabled()
    tensors.parse_json(Recorder(), b"[" + b" " * tensors.GC_PAUSE_BYTES + b"]")  # type: ignore[arg-type]
    tensors.parse_json(Recorder(), b"[]")  # type: ignore[arg-type]
    assert seen == [False, True]
    assert gc.isenabled()


# --- Inference-Header-Content-Length that cuts the JSON -----------------------------------


@pytest.mark.parametrize("cut", [0, 5, 20])
def test_a_short_header_length_is_named(cut: int) -> None:
    raw = body(tensor([1], [1.0]))
    message = refused(raw, "malformed JSON", header_length=cut)
    assert "Inference-Header-Content-Length" in message
    assert f"first {cut} bytes of the {len(raw)}-byte body" in message


def test_malformed_json_without_the_header_is_worded_as_before() -> None:
    message = refused(b'{"inputs": [', "malformed JSON")
    assert "Inference-Header-Content-Length" not in message


# --- names in error messages, bounded ------------------------------------------------------


def test_listed_shows_a_few_names_each_cut() -> None:
    assert listed(["a", "b"]) == "'a', 'b'"
    many = listed(f"n{i}" for i in range(20000))
    assert many.endswith("'n9', … and 19990 more") and len(many) < 200
    assert listed(["x" * 100_000]) == f"{'x' * 64!r}… (100000 characters)"


def test_unknown_inputs_are_listed_bounded() -> None:
    specs = [TensorSpec("x", "FP32", (-1, 1))]
    sent = {"x": np.zeros((1, 1), np.float32)}
    sent.update({f"extra{i:05}": np.zeros(1, np.float32) for i in range(20000)})
    with pytest.raises(InvalidInput) as info:
        prepare_inputs(specs, sent, declared=None, max_rows=16)
    message = str(info.value)
    assert "unknown inputs 'extra00000'" in message and "… and 19990 more" in message
    assert len(message) < 1000


def test_v1_fields_that_differ_are_listed_bounded() -> None:
    instances = [{"a": 1}, {f"f{i}": 1 for i in range(30000)}]
    with pytest.raises(InvalidInput) as info:
        v1.decode(json.dumps({"instances": instances}).encode(), default_input=None, max_rows=16)
    message = str(info.value)
    assert "instances[1]: fields differ" in message and "… and 29991 more" in message
    assert len(message) < 1000


def test_a_missing_assembled_input_lists_what_came_bounded() -> None:
    from infercore.builtins.features import RequestFeatureSource, RequestFeatureSourceConfig

    source = RequestFeatureSource.__new__(RequestFeatureSource)
    source.config = RequestFeatureSourceConfig(assemble={"input": ["a", "b"]})
    source._columns = frozenset({"a", "b"})
    fields = {f"u{i}": np.zeros(1) for i in range(20000)}
    with pytest.raises(InvalidInput) as info:
        asyncio.run(source.fetch(fields, deadline=0.0))
    message = str(info.value)
    assert "missing input 'input' (got 'u0'" in message and "… and 19990 more" in message
    assert len(message) < 1000


# --- V1: rows of `inputs` columns and nesting, before converting ----------------------------


@pytest.fixture
def no_v1_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    """Converting a V1 column fails the test."""

    def converted(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the data was converted before the refusal")

    monkeypatch.setattr(v1, "json_array", converted)


def v1_refused(doc: Any, *needles: str, **kw: Any) -> str:
    kw.setdefault("default_input", "x")
    with pytest.raises(InvalidInput) as info:
        v1.decode(json.dumps(doc).encode(), max_rows=16, **kw)
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    return message


@pytest.mark.usefixtures("no_v1_conversion")
@pytest.mark.parametrize(
    ("doc", "name"),
    [
        ({"inputs": [[]] * 3000}, "x"),  # the audit's 2.7M empty lists, smaller
        ({"inputs": [0] * 3000}, "x"),
        ({"inputs": {"x": [[]] * 3000}}, "x"),
        # Each column before its own conversion, as V2 checks each input before its own.
        ({"inputs": {"b": [[1.0]] * 17, "a": [[1.0]]}}, "b"),
    ],
)
def test_v1_inputs_rows_over_the_limit_are_refused_unconverted(doc: Any, name: str) -> None:
    rows = len(doc["inputs"] if isinstance(doc["inputs"], list) else doc["inputs"][name])
    v1_refused(
        doc, f"`inputs` '{name}' has {rows} rows; the limit is 16", "server.max_request_rows"
    )


def test_v1_inputs_rows_at_the_limit_and_unbatched_inputs_pass() -> None:
    doc = {"inputs": {"x": [[0.5]] * 16, "fixed": [1.0] * 5000}}
    asked: list[str] = []

    def unbatched(name: str) -> bool:
        asked.append(name)
        return name == "fixed"

    raw = json.dumps(doc).encode()
    columns = v1.decode(raw, default_input=None, max_rows=16, unbatched=unbatched)
    assert columns["x"].shape == (16, 1)
    assert columns["fixed"].shape == (5000,)
    assert asked == ["fixed"]  # asked only for the column over the limit
    v1_refused(doc, "`inputs` 'fixed' has 5000 rows", default_input=None)


@pytest.mark.usefixtures("no_v1_conversion")
@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        # One row of many empty lists (the audit's 2.7 million, smaller): no values at all.
        ({"instances": [[[]] * 3000]}, "3001 nested lists without a value; the limit is 16"),
        ({"instances": [[[[]] * 100] * 30]}, "3031 nested lists without a value"),
        ({"inputs": [[[]] * 3000]}, "3001 nested lists without a value; the limit is 16"),
        ({"inputs": {"x": [[[]] * 3000]}}, "3001 nested lists without a value"),
        ({"instances": [{"x": [[]] * 3000}]}, "3001 nested lists without a value"),
        # Ragged, or lists beside values, found before the converter walks the good part.
        ({"instances": [[[]] * 3000 + [[0]]]}, "ragged (nested lists of different lengths)"),
        ({"instances": [[[0]] * 3000, [[0], [0]]]}, "ragged (nested lists of different lengths)"),
        ({"instances": [[[]] * 3000, "x"]}, "ragged (lists and values at the same depth)"),
        ({"instances": [[[0]] * 3000 + [0]]}, "ragged (lists and values at the same depth)"),
    ],
)
def test_v1_nesting_without_values_or_ragged_is_refused_unconverted(doc: Any, needle: str) -> None:
    message = v1_refused(doc, needle)
    assert "field 'x'" in message  # the input, by name
    if "without a value" in needle:
        assert "server.max_request_rows" in message  # the limit's setting


@pytest.mark.parametrize(
    ("doc", "shape"),
    [
        ({"instances": [[[1, 2], [3, 4]], [[5, 6], [7, 8]]]}, (2, 2, 2)),
        ({"instances": [[[]] * 15]}, (1, 15, 0)),  # 16 lists: at the limit
        ({"instances": [[[[0.5]] * 3] * 2]}, (1, 2, 3, 1)),
        ({"inputs": [[[1], [2]]] * 16}, (16, 2, 1)),
        ({"inputs": {"x": [[1, 2]] * 16}}, (16, 2)),
        ({"instances": [[1, 2]] * 16}, (16, 2)),
        ({"inputs": 3}, (1,)),
    ],
)
def test_v1_data_that_fits_is_decoded_as_before(doc: Any, shape: tuple[int, ...]) -> None:
    raw = json.dumps(doc).encode()
    assert v1.decode(raw, default_input="x", max_rows=16)["x"].shape == shape
