"""What the codecs refuse rather than ignore or misread, and how they say it.

* Triton extensions this server does not serve (GET /v2 lists ``binary_tensor_data`` and
  ``schedule_policy``)
  were ignored: classification came back as raw probabilities, an input in shared memory
  was "missing its data", a sequence was answered request by request. Each is a 400 naming
  the parameter and what to send instead.
* An input with both ``data`` and ``binary_data_size`` had its binary data used silently.
* ``NaN``/``Infinity`` (Python's ``json.dumps``, so tritonclient, writes them) and a UTF-8 BOM
  were "invalid character (byte 67)".
* V1: ``instances`` and ``inputs`` are alternatives; a body with both used ``instances``.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from infercore.errors import InvalidInput
from infercore.protocol import v1, v2

X = {"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}


def decode(doc: dict[str, Any] | bytes, header_length: int | None = None) -> v2.DecodedV2:
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return v2.decode(raw, header_length, max_elements=1 << 20)


def refused(doc: dict[str, Any] | bytes, header_length: int | None = None) -> str:
    with pytest.raises(InvalidInput) as info:
        decode(doc, header_length)
    assert info.value.status_code == 400
    return str(info.value)


# --- Triton extensions ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"]
)
def test_an_input_in_shared_memory_is_refused_as_such(key: str) -> None:
    tensor = {"name": "x", "shape": [1, 2], "datatype": "FP32", "parameters": {key: 0}}
    text = refused({"inputs": [tensor]})
    assert text.startswith(f"input 'x': parameters.{key}: shared memory is not supported")
    assert "`data` is missing" not in text
    assert "GET /v2 lists the extensions" in text


def test_an_output_in_shared_memory_is_refused() -> None:
    outputs = [{"name": "y", "parameters": {"shared_memory_region": "out0"}}]
    text = refused({"inputs": [X], "outputs": outputs})
    assert text.startswith("output 'y': parameters.shared_memory_region: shared memory")


def test_classification_is_refused_not_answered_with_the_raw_tensor() -> None:
    text = refused({"inputs": [X], "outputs": [{"name": "y", "parameters": {"classification": 2}}]})
    assert text.startswith("output 'y': parameters.classification: the classification extension")
    assert "top classes on the client" in text


@pytest.mark.parametrize(
    "params",
    [
        {"sequence_id": 7},
        {"sequence_id": "session-1"},
        {"sequence_start": True},
        {"sequence_end": True},
        {"sequence_id": 7, "sequence_start": True, "sequence_end": False},
    ],
)
def test_sequences_are_refused(params: dict[str, Any]) -> None:
    text = refused({"inputs": [X], "parameters": params})
    assert "sequences (Triton's sequence batcher" in text
    assert text.startswith("parameters.sequence_")


def test_sequence_parameters_that_mean_no_sequence_pass() -> None:
    params = {"sequence_id": 0, "sequence_start": False, "sequence_end": False}
    assert decode({"inputs": [X], "parameters": params}).tensors["x"].shape == (1, 2)


def test_data_and_binary_data_size_together_are_refused() -> None:
    raw = np.array([[1, 2]], np.float32).tobytes()
    tensor = {**X, "parameters": {"binary_data_size": len(raw)}}
    head = json.dumps({"inputs": [tensor]}).encode()
    text = refused(head + raw, len(head))
    assert text.startswith("input 'x': has both `data` and parameters.binary_data_size")


# --- NaN, Infinity and the BOM --------------------------------------------------------------


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_literals_are_named_with_their_input(literal: str) -> None:
    body = (
        '{"inputs": [{"name": "amount", "shape": [1, 2], "datatype": "FP32", '
        f'"data": [1.0, {literal}]}}]}}'
    ).encode()
    text = refused(body)
    assert text.startswith(
        f"malformed JSON: {literal} in input 'amount' (inputs[0].data[1]) is not a JSON number"
    )
    assert "binary tensor extension" in text


def test_a_literal_in_a_body_too_large_to_parse_again_gets_its_byte_offset() -> None:
    from infercore.protocol.tensors import REPARSE_MAX_BYTES

    pad = " " * REPARSE_MAX_BYTES
    body = f'{{"inputs": [{{"name": "x", "shape": [1], "datatype": "FP32", "data": [NaN]}}]}}{pad}'
    text = refused(body.encode())
    at = body.index("NaN")
    assert text.startswith(f"malformed JSON: NaN at byte {at} is not a JSON number"), text


def test_v1_names_the_field_of_a_literal() -> None:
    body = b'{"instances": [{"a": 1.0}, {"a": Infinity}]}'
    with pytest.raises(InvalidInput, match=r"Infinity in instances\[1\]\.a is not a JSON number"):
        v1.decode(body, default_input=None, max_rows=10)


def test_a_byte_order_mark_says_so() -> None:
    body = b"\xef\xbb\xbf" + json.dumps({"inputs": [X]}).encode()
    text = refused(body)
    assert text.startswith("malformed JSON: the body starts with a UTF-8 byte order mark")
    assert "remove the BOM" in text


def test_other_syntax_errors_are_worded_as_before() -> None:
    assert refused(b'{"inputs": [}').startswith("malformed JSON: JSON is malformed")


def test_binary_nan_is_decoded_and_reported_for_the_model_to_decide() -> None:
    # JSON cannot carry NaN; binary can. The codec keeps the values (a model may take NaN as a
    # missing value) and says where the first one is; the request path refuses it for a
    # model that does not accept such values.
    arr = np.array([[1.0, np.nan], [np.inf, 2.0]], np.float32)
    tensor = {"name": "x", "shape": [2, 2], "datatype": "FP32"}
    tensor["parameters"] = {"binary_data_size": arr.nbytes}
    head = json.dumps({"inputs": [tensor]}).encode()
    decoded = decode(head + arr.tobytes(), len(head))
    assert np.isnan(decoded.tensors["x"][0, 1])
    assert decoded.non_finite == "input 'x': element [0, 1] is NaN"
    finite = np.ones((2, 2), np.float32)
    assert decode(head + finite.tobytes(), len(head)).non_finite is None
    assert decode({"inputs": [X]}).non_finite is None


# --- V1 -------------------------------------------------------------------------------------


def test_v1_instances_and_inputs_together_are_refused() -> None:
    body = b'{"instances": [[1, 2]], "inputs": [[3, 4]]}'
    with pytest.raises(InvalidInput) as info:
        v1.decode(body, default_input="x", max_rows=10)
    assert str(info.value).startswith("the body has both `instances` and `inputs`")
    assert "send one" in str(info.value)
