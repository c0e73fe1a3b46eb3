"""V1 (TensorFlow Serving style): ``{"instances": [...]}`` -> ``{"predictions": [...]}``.

``instances`` is a list with one entry per row: either values for the model's only input
(numbers or nested lists), or objects whose keys are input or field names. The columnar form
``{"inputs": {name: [...]}}`` is accepted too.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Generator
from typing import Any

import msgspec
import numpy as np

from infercore.components.model import Array
from infercore.errors import InvalidInput
from infercore.protocol.names import listed
from infercore.protocol.tensors import (
    GC_PAUSE_BYTES,
    MAX_DIMS,
    UNREADABLE_JSON,
    json_array,
    malformed_json,
    parse_json,
)

_decoder = msgspec.json.Decoder()
#: Behind a feature source the names are its request fields (an entity key, a few values), not
#: the model's inputs; the model's V2 metadata lists whichever a request carries.
_NAMES_HINT = "GET /v2/models/<model> lists the names a request carries, under `inputs`"


def _several_inputs(message: str, names: Callable[[], str] | None) -> InvalidInput:
    # `names` is called only here, on the error path: the request path computes nothing.
    return InvalidInput(message, hint=f"{names()}; {_NAMES_HINT}" if names else _NAMES_HINT)


_encoder = msgspec.json.Encoder()


def _column(name: str, values: list[Any], max_rows: int) -> Array:
    """One field's values across instances; every value must have the type of the first."""
    what = f"field {name!r}"
    if values and type(values[0]) is list and values[0] and type(values[0][0]) is list:
        _check_nesting(what, values, max_rows)
    return json_array(what, values)


def _check_nesting(what: str, values: list[Any], max_rows: int) -> None:
    """Refuse, before any value is converted (RELIABILITY P14), nesting that would cost the
    conversion time out of proportion to the values it carries: lists at one depth of
    different lengths, lists beside values, or lists holding no values at all (more of them
    than ``max_rows``, as the rows are limited). One pass over the lists of each depth at
    C speed (``map``), never over the values.

    Called for rows whose first holds lists (three levels or more): flat values and rows of
    values cost the conversion what their values cost, and the typed conversion refuses a
    list among values at once, without walking it.
    """
    level = values
    lists = 0
    for _ in range(MAX_DIMS):  # deeper: json_array refuses it before converting
        if set(map(type, level)) != {list}:
            raise InvalidInput(
                f"{what}: data is ragged (lists and values at the same depth)",
                hint="every row needs the same nesting",
            )
        sizes = set(map(len, level))
        if len(sizes) > 1:
            raise InvalidInput(f"{what}: data is ragged (nested lists of different lengths)")
        lists += len(level)
        if not level[0]:  # every list empty: no values at all
            if lists > max_rows:
                raise InvalidInput(
                    f"{what}: data is {lists} nested lists without a value; the limit is "
                    f"{max_rows} (as for rows)",
                    hint="send the values; a row without values is `[]` (server.max_request_rows)",
                )
            return
        if type(level[0][0]) is not list:
            return  # the next depth holds values
        level = list(itertools.chain.from_iterable(level))


def decode(
    body: bytes,
    *,
    default_input: str | None,
    max_rows: int,
    names: Callable[[], str] | None = None,
    unbatched: Callable[[str], bool] | None = None,
) -> dict[str, Array]:
    """Decode a V1 predict body into named columns (rows along axis 0).

    ``names`` says what a request carries (the model's inputs, or its feature source's
    fields), for the error of plain values sent to a model of several inputs.

    ``max_rows`` holds for ``instances`` and for each ``inputs`` column, checked before any
    value is converted (RELIABILITY P14), except for a column ``unbatched`` names (an input
    whose first dimension is a fixed size, not the batch dimension; called only for a column
    over the limit).
    """
    try:
        # A small body (the usual one) decoded at once, without parse_json's call.
        doc = _decoder.decode(body) if len(body) < GC_PAUSE_BYTES else parse_json(_decoder, body)
    except UNREADABLE_JSON as exc:
        raise malformed_json(exc, body) from None
    if not isinstance(doc, dict):
        raise InvalidInput("the body must be a JSON object with `instances` or `inputs`")
    if "instances" in doc and "inputs" in doc:
        # Alternatives in TF Serving's and KServe's V1 (the row and the columnar format):
        # which one the client meant is not known.
        raise InvalidInput(
            "the body has both `instances` and `inputs`",
            hint="send one: `instances` (a list, one entry per row) or `inputs` (columns)",
        )
    if "instances" in doc:
        instances = doc["instances"]
        if not isinstance(instances, list):
            raise InvalidInput("`instances` must be a list")
        if not instances:
            raise InvalidInput("`instances` is empty", hint="send at least one instance")
        if len(instances) > max_rows:
            raise InvalidInput(
                f"`instances` has {len(instances)} entries; the limit is {max_rows}",
                hint="split the request (server.max_request_rows)",
            )
        if all(isinstance(i, dict) for i in instances):
            keys = list(instances[0])
            for n, inst in enumerate(instances):
                if list(inst) != keys and set(inst) != set(keys):
                    missing = set(keys) ^ set(inst)
                    raise InvalidInput(
                        f"instances[{n}]: fields differ from instances[0] "
                        f"({listed(sorted(missing))})"
                    )
            return {k: _column(k, [inst[k] for inst in instances], max_rows) for k in keys}
        if any(isinstance(i, dict) for i in instances):
            raise InvalidInput("`instances` mixes objects and values")
        if default_input is None:
            raise _several_inputs(
                "this model has several inputs: send instances as objects keyed by name", names
            )
        return {default_input: _column(default_input, instances, max_rows)}
    if "inputs" in doc:
        inputs = doc["inputs"]
        if isinstance(inputs, dict):
            return {k: _input_column(k, v, max_rows, unbatched) for k, v in inputs.items()}
        if default_input is None:
            raise _several_inputs(
                "this model has several inputs: send `inputs` as an object", names
            )
        return {default_input: _input_column(default_input, inputs, max_rows, unbatched)}
    raise InvalidInput("the body needs `instances` (a list) or `inputs`")


def _input_column(
    name: str, values: Any, max_rows: int, unbatched: Callable[[str], bool] | None
) -> Array:
    """An ``inputs`` column (rows along its first dimension), its rows counted first."""
    if not isinstance(values, list):
        values = [values]
    elif len(values) > max_rows and (unbatched is None or not unbatched(name)):
        # Imported here, on the error path: the runtime package imports this one's siblings.
        from infercore.runtime.errors import quoted

        raise InvalidInput(
            f"`inputs` {quoted(name)} has {len(values)} rows; the limit is {max_rows}",
            hint="split the request (server.max_request_rows)",
        )
    return _column(name, values, max_rows)


def _row_value(arr: Array, i: int) -> Any:
    return _to_json(arr[i])


def _to_json(v: Any) -> Any:
    """Plain JSON values; nested lists keep their shape, bytes become strings."""
    if isinstance(v, np.ndarray):
        if v.dtype != object:
            return v.tolist()
        return [_to_json(x) for x in v]
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.generic):
        return v.item()
    return v


def encode(outputs: dict[str, Array], rows: int) -> bytes:
    """``{"predictions": [...]}``: one entry per row; an object per row for several outputs."""
    names = list(outputs)
    if len(names) == 1:
        arr = outputs[names[0]]
        preds = arr.tolist() if arr.dtype != object else [_row_value(arr, i) for i in range(rows)]
    else:
        # One tolist() per output, not one numpy scalar per row and output: the same values.
        columns = {n: _column_values(outputs[n], rows) for n in names}
        preds = [{n: columns[n][i] for n in names} for i in range(rows)]
    return _encoder.encode({"predictions": preds})


def _column_values(arr: Array, rows: int) -> list[Any]:
    if arr.dtype != object and arr.ndim >= 1:
        values: list[Any] = arr.tolist()
        return values
    return [_row_value(arr, i) for i in range(rows)]


def encode_parts(
    outputs: dict[str, Array], rows: int, part_values: int
) -> Generator[bytes, None, None]:
    """:func:`encode` in parts of about ``part_values`` values (whole rows), for a large
    response: the caller can let the event loop run between parts. The parts joined are
    :func:`encode`'s body, byte for byte."""
    names = list(outputs)
    first = outputs[names[0]]
    if len(names) == 1 and first.dtype != object and first.ndim == 0:
        yield encode(outputs, rows)  # one value: nothing to split
        return
    per_row = sum(_row_size(outputs[n]) for n in names)
    step = max(1, part_values // per_row)
    yield b'{"predictions":['
    if len(names) == 1 and first.dtype != object:
        ends = range(0, len(first), step)
        chunks = (first[at : at + step].tolist() for at in ends)
    elif len(names) == 1:
        chunks = (
            [_row_value(first, i) for i in range(at, min(at + step, rows))]
            for at in range(0, rows, step)
        )
    else:
        chunks = (_rows(outputs, names, at, min(at + step, rows)) for at in range(0, rows, step))
    for i, chunk in enumerate(chunks):
        values = _encoder.encode(chunk)[1:-1]
        yield b"," + values if i else values
    yield b"]}"


def _row_size(arr: Array) -> int:
    """Values per row of an output (1 for a scalar)."""
    return max(1, arr.size // arr.shape[0]) if arr.ndim and arr.shape[0] else 1


def _rows(outputs: dict[str, Array], names: list[str], start: int, stop: int) -> list[Any]:
    """Rows ``start`` to ``stop`` of :func:`encode`'s predictions for several outputs."""
    columns = {n: _column_slice(outputs[n], start, stop) for n in names}
    return [{n: columns[n][i] for n in names} for i in range(stop - start)]


def _column_slice(arr: Array, start: int, stop: int) -> list[Any]:
    if arr.dtype != object and arr.ndim >= 1:
        values: list[Any] = arr[start:stop].tolist()
        return values
    return [_row_value(arr, i) for i in range(start, stop)]
