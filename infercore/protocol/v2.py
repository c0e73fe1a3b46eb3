"""Open Inference Protocol (KServe V2) REST: request decoding and response encoding.

Supports JSON tensors and Triton's binary tensor data extension (``Inference-Header-Content-
Length``), which standard clients such as ``tritonclient[http]`` use by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from infercore.components.model import Array
from infercore.components.tensors import V2_TO_NUMPY, v2_datatype
from infercore.errors import InvalidInput
from infercore.protocol.tensors import (
    check_shape,
    from_binary,
    from_json,
    malformed_json,
    to_binary,
    to_json_data,
)


class V2Input(msgspec.Struct):
    name: str
    # Checked by ``decode`` itself, so that the error names the input.
    shape: Any
    datatype: Any
    data: Any = None
    parameters: dict[str, Any] | None = None


class V2RequestedOutput(msgspec.Struct):
    name: str
    parameters: dict[str, Any] | None = None


class V2Request(msgspec.Struct):
    inputs: list[V2Input]
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[V2RequestedOutput] | None = None


_decoder = msgspec.json.Decoder(V2Request)
_encoder = msgspec.json.Encoder()


@dataclass(slots=True)
class DecodedV2:
    """A decoded V2 request: tensors by name, plus what the response must look like."""

    id: str | None
    tensors: dict[str, Array]
    datatypes: dict[str, str]
    #: Requested output names (``None``: all), each with whether it goes back as binary.
    outputs: dict[str, bool] | None
    binary_default: bool


def _validation_message(exc: msgspec.ValidationError) -> str:
    text = str(exc)
    return text.replace("`$.", "`").replace("`$`", "the body").replace(" - at ", " at ")


def decode(body: bytes, header_length: int | None, *, max_elements: int) -> DecodedV2:
    """Decode a V2 inference request body.

    Args:
        body: The raw body.
        header_length: ``Inference-Header-Content-Length`` when the binary extension is used.
        max_elements: Upper bound on the elements any one tensor may declare.

    Raises:
        InvalidInput: Anything malformed, naming the input.
    """
    if header_length is not None:
        if header_length < 0 or header_length > len(body):
            raise InvalidInput(
                "Inference-Header-Content-Length is larger than the body",
                hint="it must be the byte length of the JSON header that starts the body",
            )
        head, blob = body[:header_length], memoryview(body)[header_length:]
    else:
        head, blob = body, memoryview(b"")
    try:
        req = _decoder.decode(head)
    except msgspec.ValidationError as exc:
        raise InvalidInput(f"invalid V2 request: {_validation_message(exc)}") from None
    except msgspec.DecodeError as exc:
        raise malformed_json(exc, head) from None
    if not req.inputs:
        raise InvalidInput("`inputs` is empty", hint="send at least one input tensor")
    tensors: dict[str, Array] = {}
    datatypes: dict[str, str] = {}
    offset = 0
    for inp in req.inputs:
        name = inp.name
        if name in tensors:
            raise InvalidInput(f"input {name!r} appears twice")
        if not isinstance(inp.datatype, str) or inp.datatype not in V2_TO_NUMPY:
            raise InvalidInput(
                f"input {name!r}: unknown datatype {inp.datatype!r}",
                hint=f"one of {', '.join(V2_TO_NUMPY)}",
            )
        count = check_shape(name, inp.shape, max_elements=max_elements)
        size = (inp.parameters or {}).get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0 or offset + size > len(blob):
                raise InvalidInput(f"input {name!r}: binary_data_size runs past the body")
            arr = from_binary(name, blob[offset : offset + size], inp.shape, inp.datatype, count)
            offset += size
        else:
            if inp.data is None:
                raise InvalidInput(f"input {name!r}: `data` is missing")
            arr = from_json(name, inp.data, inp.shape, inp.datatype, count)
        tensors[name] = arr
        datatypes[name] = inp.datatype
    if offset != len(blob):
        raise InvalidInput("binary data left over after the last input's binary_data_size")
    params = req.parameters or {}
    binary_default = bool(params.get("binary_data_output", False))
    outputs: dict[str, bool] | None = None
    if req.outputs:
        outputs = {}
        for out in req.outputs:
            outputs[out.name] = bool((out.parameters or {}).get("binary_data", binary_default))
    return DecodedV2(req.id, tensors, datatypes, outputs, binary_default)


def encode(
    *,
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: dict[str, Array],
    requested: dict[str, bool] | None,
    binary_default: bool,
) -> tuple[bytes, int | None]:
    """Encode a V2 response; returns the body and the JSON header length when binary."""
    names = list(outputs) if requested is None else list(requested)
    out_list: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name in names:
        arr = outputs[name]
        binary = binary_default if requested is None else requested[name]
        entry: dict[str, Any] = {
            "name": name,
            "datatype": v2_datatype(arr.dtype),
            "shape": list(arr.shape),
        }
        if binary:
            raw = to_binary(arr)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = to_json_data(arr)
        out_list.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        doc["id"] = request_id
    doc["outputs"] = out_list
    head = _encoder.encode(doc)
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


def encode_json(doc: Any) -> bytes:
    return _encoder.encode(doc)
