"""Open Inference Protocol (KServe V2) REST: request decoding and response encoding.

Supports JSON tensors and Triton's binary tensor data extension (``Inference-Header-Content-
Length``), which standard clients such as ``tritonclient[http]`` use by default.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import msgspec

from infercore.components.batching import Batcher
from infercore.components.model import Array
from infercore.components.tensors import V2_TO_NUMPY, v2_datatype
from infercore.errors import InvalidInput
from infercore.protocol.tensors import (
    GC_PAUSE_BYTES,
    UNREADABLE_JSON,
    _from_flat_json,
    check_shape,
    from_binary,
    from_json,
    malformed_json,
    non_finite,
    parse_json,
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
    #: The client's ``parameters.timeout`` (Triton's schedule-policy extension), in seconds;
    #: ``None`` when it sent none (or 0, which Triton reads as "no timeout").
    timeout_s: float | None = None
    #: Where the first binary input holds NaN or an infinity (JSON cannot carry them), for
    #: the request path to refuse unless the model accepts them; ``None``: nowhere.
    non_finite: str | None = None
    #: The client's ``parameters.priority`` (Triton's schedule-policy extension): 1 is the
    #: highest level; 0 when it sent none (or 0, the model's default level). What it means
    #: for a version is :func:`priority_level`'s to say.
    priority: int = 0


def _validation_message(exc: msgspec.ValidationError) -> str:
    text = str(exc)
    return text.replace("`$.", "`").replace("`$`", "the body").replace(" - at ", " at ")


def _flat_input(
    data: list[Any], shape: list[Any], datatype: str, max_elements: int
) -> Array | None:
    """The tensor of a flat JSON ``data`` list with a 1-D or 2-D ``shape`` of positive sizes
    whose plain values need no conversion; ``None``: the general path decides (and words
    any error)."""
    if len(shape) == 1:
        count = shape[0]
        if type(count) is not int or not 0 < count <= max_elements:
            return None
        return _from_flat_json(data, datatype, count)  # already of the shape
    if len(shape) == 2:
        rows, cols = shape
        if type(rows) is not int or type(cols) is not int or rows <= 0 or cols <= 0:
            return None
        count = rows * cols
        if count > max_elements:
            return None
        arr = _from_flat_json(data, datatype, count)
        return None if arr is None else arr.reshape(rows, cols)
    return None


def _too_many_rows(name: str, shape: list[int], max_rows: int) -> InvalidInput:
    return InvalidInput(
        f"input {name!r}: shape {shape} has {shape[0]} rows; the limit is {max_rows}",
        hint="split the request (server.max_request_rows)",
    )


def decode(
    body: bytes,
    header_length: int | None,
    *,
    max_elements: int,
    max_rows: int | None = None,
    unbatched: Callable[[str], bool] | None = None,
) -> DecodedV2:
    """Decode a V2 inference request body.

    Args:
        body: The raw body.
        header_length: ``Inference-Header-Content-Length`` when the binary extension is used.
        max_elements: Upper bound on the elements any one tensor may declare.
        max_rows: Most rows (first-dimension entries) one input may declare, checked from the
            declared shape before its data is converted (RELIABILITY P14); ``None``: no limit
            here (the request path checks rows again against the model's signature).
        unbatched: Whether the model takes an input of this name whose first dimension is
            not the batch dimension (a fixed size): such an input is not held to
            ``max_rows``. Called only for an input over the limit.

    Raises:
        InvalidInput: Anything malformed, naming the input.
    """
    if header_length is not None:
        if header_length < 0:
            raise InvalidInput(
                f"Inference-Header-Content-Length is negative ({header_length})",
                hint="it must be the byte length of the JSON header that starts the body",
            )
        if header_length > len(body):
            raise InvalidInput(
                "Inference-Header-Content-Length is larger than the body",
                hint="it must be the byte length of the JSON header that starts the body",
            )
        head, blob = body[:header_length], memoryview(body)[header_length:]
    else:
        head, blob = body, memoryview(b"")
    try:
        # A small body (the usual one) decoded at once, without parse_json's call.
        req = _decoder.decode(head) if len(head) < GC_PAUSE_BYTES else parse_json(_decoder, head)
    except msgspec.ValidationError as exc:
        raise InvalidInput(f"invalid V2 request: {_validation_message(exc)}") from None
    except UNREADABLE_JSON as exc:
        error = malformed_json(exc, head)
        if header_length is None:
            raise error from None
        # The header's length cut the JSON (or took binary bytes into it): say so.
        raise InvalidInput(
            f"{error.message} (the JSON header is the first {header_length} bytes of the "
            f"{len(body)}-byte body, as Inference-Header-Content-Length says)",
            hint="Inference-Header-Content-Length must be the byte length of the JSON header "
            "that starts the body" + (f"; {error.hint}" if error.hint else ""),
        ) from None
    if not req.inputs:
        raise InvalidInput("`inputs` is empty", hint="send at least one input tensor")
    tensors: dict[str, Array] = {}
    datatypes: dict[str, str] = {}
    offset = 0
    bad: str | None = None
    for inp in req.inputs:
        name = inp.name
        if name in tensors:
            raise InvalidInput(f"input {name!r} appears twice")
        datatype = inp.datatype
        if not isinstance(datatype, str) or datatype not in V2_TO_NUMPY:
            raise InvalidInput(
                f"input {name!r}: unknown datatype {datatype!r}",
                hint=f"one of {', '.join(V2_TO_NUMPY)}",
            )
        shape = inp.shape
        params = inp.parameters
        if params is None and type(shape) is list and type(inp.data) is list:
            # The common input (a few values, one or two dimensions, JSON data): what the
            # general path below gives, without its checks that cannot fail here.
            arr = _flat_input(inp.data, shape, datatype, max_elements)
            if arr is not None:
                tensors[name] = arr
                datatypes[name] = datatype
                continue
        count = check_shape(name, shape, max_elements=max_elements)
        # From the declared shape, before the data is converted (or the binary read).
        if (
            max_rows is not None
            and shape
            and shape[0] > max_rows
            and (unbatched is None or not unbatched(name))
        ):
            raise _too_many_rows(name, shape, max_rows)
        size = None
        if params is not None:
            _refuse_shared_memory(params, f"input {name!r}")
            size = params.get("binary_data_size")
            if size is not None and inp.data is not None:
                raise InvalidInput(
                    f"input {name!r}: has both `data` and parameters.binary_data_size",
                    hint="send its values one way: JSON `data`, or binary_data_size with the "
                    "bytes after the JSON header (the binary tensor extension)",
                )
        if size is not None:
            if type(size) is not int or size < 0:
                raise InvalidInput(
                    f"input {name!r}: binary_data_size must be a byte count (an integer, 0 "
                    f"or more), got {size!r:.40}"
                )
            if offset + size > len(blob):
                raise InvalidInput(f"input {name!r}: binary_data_size runs past the body")
            arr = from_binary(name, blob[offset : offset + size], shape, datatype, count)
            offset += size
            if bad is None:
                bad = non_finite(name, arr)
        else:
            if inp.data is None:
                raise InvalidInput(f"input {name!r}: `data` is missing")
            arr = from_json(name, inp.data, shape, datatype, count)
        tensors[name] = arr
        datatypes[name] = datatype
    if offset != len(blob):
        raise InvalidInput("binary data left over after the last input's binary_data_size")
    params = req.parameters
    binary_default = False
    timeout_s = None
    priority = 0
    if params:
        _refuse_sequences(params)
        binary_default = _flag(params, "binary_data_output", False, "parameters")
        timeout = params.get("timeout")
        if timeout is not None:
            timeout_s = _timeout(timeout)
        asked = params.get("priority")
        if asked is not None:
            priority = _priority(asked)
    outputs: dict[str, bool] | None = None
    if req.outputs:
        outputs = {}
        for out in req.outputs:
            where = f"output {out.name!r}: parameters"
            out_params = out.parameters or {}
            if out_params:
                _refuse_output_extensions(out_params, f"output {out.name!r}")
            outputs[out.name] = _flag(out_params, "binary_data", binary_default, where)
    return DecodedV2(
        req.id, tensors, datatypes, outputs, binary_default, timeout_s, bad, priority=priority
    )


#: The protocol extensions served, as ``GET /v2`` lists them: the binary tensor data extension,
#: and Triton's schedule-policy one (``parameters.priority`` and ``parameters.timeout``, read by
#: :func:`decode`; a priority is honoured by a batcher with ``priority_levels``).
EXTENSIONS = ("binary_tensor_data", "schedule_policy")
#: Where the refusals below point a client that sent an extension's parameter.
_EXTENSIONS_HINT = f"GET /v2 lists the extensions this server supports ({', '.join(EXTENSIONS)})"
#: Triton's shared-memory extensions' tensor parameters (system and CUDA shared memory).
_SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
#: Triton's sequence-batcher request parameters (stateful models).
_SEQUENCE = ("sequence_id", "sequence_start", "sequence_end")


def _refuse_shared_memory(params: dict[str, Any], where: str) -> None:
    """Triton's shared-memory extensions are not served: a tensor named by a region would
    otherwise be read as a tensor without data (or its output sent back in the body)."""
    for key in _SHARED_MEMORY:
        if key in params:
            raise InvalidInput(
                f"{where}: parameters.{key}: shared memory is not supported by this server",
                hint=f"send the tensor in the request body (JSON `data`, or binary_data_size); "
                f"{_EXTENSIONS_HINT}",
            )


def _refuse_output_extensions(params: dict[str, Any], where: str) -> None:
    _refuse_shared_memory(params, where)
    if "classification" in params:
        # Triton answers BYTES "score:index[:label]" for it; the raw tensor is not that.
        raise InvalidInput(
            f"{where}: parameters.classification: the classification extension is not "
            "supported by this server",
            hint=f"ask for the output itself and take its top classes on the client; "
            f"{_EXTENSIONS_HINT}",
        )


def _refuse_sequences(params: dict[str, Any]) -> None:
    """Sequence parameters would be ignored, and each request of a sequence answered as if
    alone: refused. The values Triton's clients send outside a sequence (an id of 0 or "",
    start and end false) mean no sequence and are let through."""
    for key in _SEQUENCE:
        if params.get(key) not in (None, 0, ""):  # 0 is False too
            raise InvalidInput(
                f"parameters.{key}: sequences (Triton's sequence batcher, for stateful "
                "models) are not supported by this server",
                hint="send each request on its own, without sequence parameters; "
                + _EXTENSIONS_HINT,
            )


#: The largest ``parameters.timeout``: Triton's field is a uint64 of microseconds. A larger
#: integer (JSON has no bound) would overflow the conversion to seconds: a 500, not a 400.
MAX_TIMEOUT_US = 2**64 - 1


def _timeout(value: Any) -> float | None:
    """``parameters.timeout``: microseconds, as Triton's schedule-policy extension (and
    tritonclient's ``timeout=``) send it; 0 is no timeout of the client's own."""
    if type(value) is not int or not 0 <= value <= MAX_TIMEOUT_US:
        raise InvalidInput(
            "parameters.timeout: expected microseconds (an integer from 0 to 2**64-1), "
            f"got {value!r:.40}",
            hint="send the request's timeout in microseconds, as Triton's clients do",
        )
    return value / 1e6 if value else None


#: The largest ``parameters.priority``: Triton's field is a uint64.
MAX_PRIORITY = 2**64 - 1


def _priority(value: Any) -> int:
    """``parameters.priority``: a level, 1 the highest, 0 the model's default (tritonclient's
    ``priority=``). Checked whether or not the model has levels: a malformed one is a 400."""
    if type(value) is not int or not 0 <= value <= MAX_PRIORITY:
        raise InvalidInput(
            "parameters.priority: expected a priority level (an integer from 0 to 2**64-1; 1 "
            f"is the highest, 0 the model's default), got {value!r:.40}",
            hint="send an integer level, as Triton's clients do, or leave it out",
        )
    return value


def priority_level(priority: int, batcher: Batcher) -> int:
    """The level at which ``batcher`` queues a request that sent ``parameters.priority`` (above 0):
    ``priority`` itself, or 0 for the batcher's default level (the request then takes the plain
    :meth:`~Batcher.submit`, and request groups, as one that named no priority).

    A batcher without levels (``priority_levels`` 0, every batcher's default) ignores it, as
    Triton does.

    Raises:
        InvalidInput: ``priority`` is above the batcher's ``priority_levels``. (Triton would
            quietly queue such a request at the default level; here the client is told.)
    """
    levels = batcher.priority_levels
    if not levels:
        return 0
    default = batcher.default_priority_level
    if priority > levels:
        raise InvalidInput(
            f"parameters.priority: {priority} is not a priority level of model "
            f"{batcher.context.model_name!r}, which has levels 1 (the highest) to {levels}",
            hint=f"send a level from 1 to {levels}, or 0 (or none) for the default level, "
            f"{default}",
        )
    return 0 if priority == default else priority


def _flag(params: dict[str, Any], key: str, default: bool, where: str) -> bool:
    """A boolean parameter of the binary extension; ``"false"`` is not false, it is refused."""
    value = params.get(key, default)
    if type(value) is not bool:
        raise InvalidInput(
            f"{where}.{key}: expected true or false, got {value!r:.40}",
            hint="send a JSON boolean",
        )
    return value


class _Output(msgspec.Struct, omit_defaults=True):
    """One output of a response: ``parameters`` for binary data, else ``data``."""

    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, int] | None = None
    data: list[Any] | None = None


class _Response(msgspec.Struct, omit_defaults=True, kw_only=True):
    # Structs encode in field order, at about half the cost of the equivalent dicts.
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[_Output]


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
    if requested is None and not binary_default:
        # Every output as JSON data (the common response).
        out_list = [
            _Output(name, v2_datatype(arr.dtype), list(arr.shape), data=to_json_data(arr))
            for name, arr in outputs.items()
        ]
        head = _encoder.encode(
            _Response(
                model_name=model_name, model_version=model_version, id=request_id, outputs=out_list
            )
        )
        return head, None
    names = list(outputs) if requested is None else list(requested)
    out_list = []
    blobs: list[bytes] = []
    for name in names:
        arr = outputs[name]
        binary = binary_default if requested is None else requested[name]
        if binary:
            raw = to_binary(arr)
            entry = _Output(
                name,
                v2_datatype(arr.dtype),
                list(arr.shape),
                parameters={"binary_data_size": len(raw)},
            )
            blobs.append(raw)
        else:
            entry = _Output(name, v2_datatype(arr.dtype), list(arr.shape), data=to_json_data(arr))
        out_list.append(entry)
    head = _encoder.encode(
        _Response(
            model_name=model_name, model_version=model_version, id=request_id, outputs=out_list
        )
    )
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


def encode_parts(
    *,
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: dict[str, Array],
    requested: dict[str, bool] | None,
    binary_default: bool,
    part_values: int,
) -> Generator[bytes, None, int | None]:
    """:func:`encode` in parts, for a large response: JSON ``data`` goes out ``part_values``
    values at a time, so that the caller can let the event loop run between parts.

    The parts joined are :func:`encode`'s body, byte for byte; the generator returns the JSON
    header's length when the body carries binary data (``None`` otherwise).
    """
    names = list(outputs) if requested is None else list(requested)
    prefix = _encoder.encode(
        _Response(model_name=model_name, model_version=model_version, id=request_id, outputs=[])
    )
    head = prefix[:-2]  # without the empty list's end: `...,"outputs":[`
    head_len = len(head)
    yield head
    blobs: list[bytes] = []
    for i, name in enumerate(names):
        arr = outputs[name]
        binary = binary_default if requested is None else requested[name]
        sep = b"," if i else b""
        if binary:
            raw = to_binary(arr)
            entry = _encoder.encode(
                _Output(
                    name,
                    v2_datatype(arr.dtype),
                    list(arr.shape),
                    parameters={"binary_data_size": len(raw)},
                )
            )
            blobs.append(raw)
            head_len += len(sep) + len(entry)
            yield sep + entry
            continue
        # `data` is the last field: the entry without it, then the values part by part.
        entry = _encoder.encode(_Output(name, v2_datatype(arr.dtype), list(arr.shape)))
        start = sep + entry[:-1] + b',"data":['
        head_len += len(start)
        yield start
        flat = arr.reshape(-1)
        for at in range(0, flat.size, part_values):
            values = _encoder.encode(to_json_data(flat[at : at + part_values]))[1:-1]
            part = b"," + values if at else values
            head_len += len(part)
            yield part
        head_len += 2
        yield b"]}"
    head_len += 2
    yield b"]}"
    if not blobs:
        return None
    yield from blobs
    return head_len


def encode_json(doc: Any) -> bytes:
    return _encoder.encode(doc)
