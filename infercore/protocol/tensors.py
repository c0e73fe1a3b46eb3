"""JSON and binary tensor data <-> numpy, with the checks that keep bad input a 400.

Sizes are checked before anything is allocated: the element count a shape declares must match
the data sent, and never exceeds what the body could hold.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np

from infercore.components.tensors import V2_TO_NUMPY
from infercore.errors import InvalidInput

MAX_DIMS = 8


def check_shape(name: str, shape: Any, *, max_elements: int) -> int:
    """Validate a declared shape; return its element count."""
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise InvalidInput(f"input {name!r}: shape must be a list of at most {MAX_DIMS} integers")
    count = 1
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise InvalidInput(f"input {name!r}: shape {shape} has a dimension that is not a "
                               "non-negative integer")
        count *= dim
    if count > max_elements:
        raise InvalidInput(
            f"input {name!r}: shape {shape} declares {count} elements, more than the request "
            "body can carry"
        )
    return count


def _integral_range(dtype: np.dtype[Any]) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def coerce(name: str, arr: np.ndarray, datatype: str) -> np.ndarray:
    """Convert an array inferred from JSON to ``datatype``, refusing lossy or wrong-kind values.

    Strings never become numbers, booleans never become numbers (or the other way round),
    non-integral values never become integers, and integers must fit the target type.
    """
    kind = arr.dtype.kind
    target = V2_TO_NUMPY[datatype]
    if datatype == "BYTES":
        if kind in "US":
            return arr.astype(object)
        if kind == "O" and all(isinstance(v, str | bytes) for v in arr.flat):
            return arr
        raise InvalidInput(f"input {name!r}: expected strings for BYTES, got {_describe(arr)}")
    if datatype == "BOOL":
        if kind == "b":
            return arr
        raise InvalidInput(f"input {name!r}: expected true/false for BOOL, got {_describe(arr)}")
    if kind not in "iuf" or arr.dtype == object:
        raise InvalidInput(f"input {name!r}: expected numbers for {datatype}, got {_describe(arr)}")
    if target.kind in "iu":
        if kind == "f":
            if arr.size and not np.all(np.isfinite(arr) & (arr == np.floor(arr))):
                raise InvalidInput(f"input {name!r}: expected integers for {datatype}")
        if arr.size:
            lo, hi = _integral_range(target)
            amin, amax = arr.min(), arr.max()
            if amin < lo or amax > hi:
                raise InvalidInput(
                    f"input {name!r}: value out of range for {datatype} ({lo}..{hi})"
                )
    elif target.kind == "f" and arr.size and target.itemsize < arr.dtype.itemsize and kind == "f":
        finfo = np.finfo(target)
        if np.any(np.abs(arr[np.isfinite(arr)]) > finfo.max):
            raise InvalidInput(f"input {name!r}: value out of range for {datatype}")
    return arr.astype(target, copy=False)


def _describe(arr: np.ndarray) -> str:
    kind = arr.dtype.kind
    if kind in "US":
        return "strings"
    if kind == "b":
        return "booleans"
    if kind == "O":
        return "mixed or null values"
    return "numbers"


def from_json(name: str, data: Any, shape: list[int], datatype: str, count: int) -> np.ndarray:
    """A tensor from V2 JSON ``data`` (flat or nested, row-major) and its declared shape."""
    if not isinstance(data, list):
        data = [data]
    try:
        arr = np.array(data)
    except ValueError:
        raise InvalidInput(
            f"input {name!r}: data is ragged (nested lists of different lengths)"
        ) from None
    if arr.dtype == object and datatype != "BYTES":
        raise InvalidInput(
            f"input {name!r}: data must be numbers (no nulls or nested objects) for {datatype}"
        )
    if arr.size != count:
        raise InvalidInput(
            f"input {name!r}: shape {shape} needs {count} elements, data has {arr.size}"
        )
    arr = coerce(name, arr, datatype)
    return arr.reshape(shape)


def from_binary(name: str, raw: memoryview, shape: list[int], datatype: str, count: int
                ) -> np.ndarray:
    """A tensor from the binary tensor extension (little-endian, row-major)."""
    if datatype == "BYTES":
        items: list[bytes] = []
        offset = 0
        size = len(raw)
        while offset < size:
            if offset + 4 > size:
                raise InvalidInput(f"input {name!r}: truncated BYTES element length")
            (length,) = struct.unpack_from("<I", raw, offset)
            offset += 4
            if offset + length > size:
                raise InvalidInput(f"input {name!r}: BYTES element runs past its data")
            items.append(bytes(raw[offset:offset + length]))
            offset += length
        if len(items) != count:
            raise InvalidInput(
                f"input {name!r}: shape {shape} needs {count} elements, data has {len(items)}"
            )
        arr = np.empty(len(items), dtype=object)
        arr[:] = items
        return arr.reshape(shape)
    dtype = V2_TO_NUMPY[datatype].newbyteorder("<")
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(
            f"input {name!r}: shape {shape} of {datatype} needs {count * dtype.itemsize} bytes, "
            f"got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def to_json_data(arr: np.ndarray) -> list[Any]:
    """Flat row-major JSON data. Non-finite floats become ``null`` (P15: always valid JSON)."""
    flat = arr.reshape(-1)
    if flat.dtype == object or flat.dtype.kind in "SU":
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat]
    if flat.dtype.kind == "f":
        values = flat.tolist()
        # msgspec writes NaN and ±Inf as null; say so by the same rule everywhere.
        return values
    return flat.tolist()


def to_binary(arr: np.ndarray) -> bytes:
    """Binary tensor extension encoding of one output."""
    if arr.dtype == object or arr.dtype.kind in "SU":
        parts = []
        for v in arr.reshape(-1):
            b = v if isinstance(v, bytes) else str(v).encode("utf-8")
            parts.append(struct.pack("<I", len(b)))
            parts.append(b)
        return b"".join(parts)
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


def element_count(shape: tuple[int, ...]) -> int:
    return math.prod(shape)
