"""JSON and binary tensor data <-> numpy, with the checks that keep bad input a 400.

Sizes are checked before anything is allocated: the element count a shape declares must match
the data sent, and never exceeds what the body could hold.
"""

from __future__ import annotations

import functools
import gc
import itertools
import math
import re
import struct
import warnings
from types import GenericAlias
from typing import Any

import msgspec
import numpy as np

from infercore.components.model import Array
from infercore.components.tensors import V2_TO_NUMPY
from infercore.errors import InvalidInput

MAX_DIMS = 8


def check_shape(name: str, shape: Any, *, max_elements: int) -> int:
    """Validate a declared shape; return its element count.

    Every dimension counts towards the limit except zeros, so an empty tensor cannot declare
    dimensions numpy could not even represent.
    """
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise InvalidInput(f"input {name!r}: shape must be a list of at most {MAX_DIMS} integers")
    count = 1
    extent = 1  # product of the non-zero dimensions
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise InvalidInput(
                f"input {name!r}: shape {shape} has a dimension that is not a non-negative integer"
            )
        count *= dim
        extent *= max(dim, 1)
        if extent > max_elements:
            raise InvalidInput(
                f"input {name!r}: shape {shape} declares more elements than the request body "
                "can carry"
            )
    return count


def _integral_range(dtype: np.dtype[Any]) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


_TEXT = (str, bytes)


def coerce(name: str, arr: Array, datatype: str) -> Array:
    """Convert an array inferred from JSON to ``datatype``, refusing lossy or wrong-kind values.

    Strings never become numbers, booleans never become numbers (or the other way round),
    non-integral values never become integers, integers must fit the target type, and finite
    values must stay finite.
    """
    dtype = arr.dtype
    kind = dtype.kind
    target = V2_TO_NUMPY[datatype]
    if datatype == "BYTES":
        if kind in "US":
            return arr.astype(object)
        if kind == "O":
            # A loop, not all() over a generator: most BYTES tensors hold one or two values.
            for v in arr.flat:
                if not isinstance(v, _TEXT):
                    break
            else:
                return arr
        raise InvalidInput(f"input {name!r}: expected strings for BYTES, got {_describe(arr)}")
    if dtype == target:
        # Already the type: nothing to convert, and every value fits its own type.
        return arr
    if datatype == "BOOL":
        if kind == "b":
            return arr
        raise InvalidInput(f"input {name!r}: expected true/false for BOOL, got {_describe(arr)}")
    if kind not in "iuf":
        raise InvalidInput(f"input {name!r}: expected numbers for {datatype}, got {_describe(arr)}")
    if target.kind in "iu":
        if arr.size:
            lo, hi = _integral_range(target)
            if kind == "f":
                if not np.all(np.isfinite(arr) & (arr == np.floor(arr))):
                    raise InvalidInput(f"input {name!r}: expected integers for {datatype}")
                # Python compares float with int exactly; hi + 1 is a power of two.
                bad = float(arr.min()) < lo or float(arr.max()) >= hi + 1
            else:
                bad = int(arr.min()) < lo or int(arr.max()) > hi
            if bad:
                raise InvalidInput(
                    f"input {name!r}: value out of range for {datatype} ({lo}..{hi})"
                )
        return arr.astype(target, copy=False)
    if arr.size:
        # Finite and within the target's range (NaN fails both comparisons): the cast can
        # neither overflow nor warn, so it needs no errstate (a tenth of a small request).
        bound = _float_max(target)
        if arr.size <= 8:
            # A few values (one field of one transaction, say): Python compares them faster
            # than numpy starts two reductions.
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


@functools.lru_cache(maxsize=8)
def _float_max(dtype: np.dtype[Any]) -> float:
    return float(np.finfo(dtype).max)


def _describe(arr: Array) -> str:
    kind = arr.dtype.kind
    if kind in "US":
        return "strings"
    if kind == "b":
        return "booleans"
    if kind == "O":
        if all(isinstance(v, str | bytes) for v in arr.flat):
            return "strings"
        return "mixed or null values"
    return "numbers"


_Number = int | float
_EXPECTED: dict[Any, str] = {_Number: "numbers", bool: "true/false", str: "strings"}
_KIND: dict[Any, str] = {_Number: "a number", bool: "a boolean", str: "a string"}
_GOT = re.compile(r"got `([^`]+)` - at `\$([^`]*)`")


def _leaf_type(datatype: str) -> Any:
    """The JSON values a V2 datatype accepts (booleans are not numbers, nor the reverse)."""
    if datatype == "BYTES":
        return str
    if datatype == "BOOL":
        return bool
    return _Number


@functools.lru_cache(maxsize=64)
def _nested(leaf: Any, depth: int) -> Any:
    typ = leaf
    for _ in range(depth):
        typ = GenericAlias(list, (typ,))  # list[typ]
    return typ


def _first_leaf(data: list[Any]) -> tuple[int, Any]:
    """The nesting depth of ``data`` along its first elements, and its first leaf (or ``[]``)."""
    depth, value = 0, data
    while isinstance(value, list):
        depth += 1
        if not value:
            break
        value = value[0]
    return depth, value


def json_array(what: str, data: list[Any], datatype: str | None = None) -> Array:
    """An array from JSON ``data`` (nested lists) whose leaves must all be of one JSON type.

    Integers stay exact (int64, else uint64); only a float ``datatype`` takes integers beyond
    64 bits.

    Args:
        what: How errors name the data, e.g. ``input 'x'``.
        data: Decoded JSON lists.
        datatype: The V2 datatype the data is for; ``None``: leaves of the first leaf's type.

    Raises:
        InvalidInput: Mixed leaf types (``true`` among numbers, a number among strings), nulls,
            objects, ragged nesting, nesting deeper than ``MAX_DIMS``, or out-of-range numbers.
    """
    depth, first = _first_leaf(data)
    if depth > MAX_DIMS:
        raise InvalidInput(f"{what}: data is nested deeper than {MAX_DIMS} levels")
    leaf = None if datatype is None else _leaf_type(datatype)
    if leaf is None:
        if isinstance(first, bool):
            leaf = bool
        elif isinstance(first, str):
            leaf = str
        elif isinstance(first, int | float | list):  # a list: no leaves at all
            leaf = _Number
        else:
            raise InvalidInput(
                f"{what}: values must be numbers, booleans or strings, got "
                f"{'null' if first is None else type(first).__name__}"
            )
    out_of_range = f"{what}: value out of range for {datatype or '64 bits'}"
    try:
        # A float first leaf rules integers out without a failed conversion (an exception).
        if (
            leaf is _Number
            and not isinstance(first, float)
            and _conforms(data, _nested(int, depth))
        ):
            ints = _exact_ints(data)
            if ints is not None:
                return ints
            if datatype is None or V2_TO_NUMPY[datatype].kind != "f":
                raise InvalidInput(out_of_range)
            return np.array(data, dtype=np.float64)
        msgspec.convert(data, _nested(leaf, depth))
        if leaf is not str:
            return np.array(data)
        # Not numpy's fixed-width strings: they drop trailing NUL characters.
        arr = np.array(data, dtype=object)
        if arr.ndim != depth:  # numpy makes an array of lists of ragged ones
            raise ValueError("ragged")
        return arr
    except msgspec.ValidationError as exc:
        found = _GOT.search(str(exc))
        detail = f"{found.group(1)} at data{found.group(2)}" if found else str(exc)
        if datatype is None:
            # No datatype to hold the values to (V1): the first value set the kind, so the
            # client mixed kinds; which one it meant is not known.
            raise InvalidInput(
                f"{what}: values of one kind expected; the first is {_KIND[leaf]}, then {detail}",
                hint="send all numbers, all booleans or all strings",
            ) from None
        raise InvalidInput(f"{what}: expected {_EXPECTED[leaf]}, got {detail}") from None
    except ValueError:
        raise InvalidInput(f"{what}: data is ragged (nested lists of different lengths)") from None
    except OverflowError:
        raise InvalidInput(out_of_range) from None


def _conforms(data: list[Any], typ: Any) -> bool:
    try:
        msgspec.convert(data, typ)
    except msgspec.ValidationError:
        return False
    return True


def _exact_ints(data: list[Any]) -> Array | None:
    """JSON integers as int64, else uint64; ``None`` beyond 64 bits.

    ``np.array`` alone would turn ``[1, 2**63]`` into float64 and lose the large value.
    """
    try:
        return np.array(data, dtype=np.int64)
    except OverflowError:
        pass
    try:
        with warnings.catch_warnings():
            # numpy 1.x wraps a negative value into uint64 with only a DeprecationWarning.
            warnings.simplefilter("error", DeprecationWarning)
            return np.array(data, dtype=np.uint64)
    except (OverflowError, DeprecationWarning):
        return None


def _flat_bounds() -> dict[str, tuple[type, float | int, float | int]]:
    """Per datatype: the Python leaf type a flat list may hold, and the values' range."""
    bounds: dict[str, tuple[type, float | int, float | int]] = {}
    for name, dtype in V2_TO_NUMPY.items():
        if dtype.kind == "f":
            bounds[name] = (float, -float(np.finfo(dtype).max), float(np.finfo(dtype).max))
        elif dtype.kind in "iu":
            bounds[name] = (int, *_integral_range(dtype))
    bounds["BOOL"] = (bool, False, True)
    bounds["BYTES"] = (str, 0, 0)
    return bounds


_FLAT = _flat_bounds()
#: Integers up to this magnitude are exact as doubles, so numpy converts them to a float type
#: with one rounding, as it does an int64 array.
_EXACT_INT = 2**53


def _from_flat_json(data: list[Any], datatype: str, count: int) -> Array | None:
    """A small flat list of plain leaves of the datatype's own kind, built at once.

    The common case (a few values per input) without the general path's type inference,
    conversions and checks, which give the same array for these inputs; ``None`` where that
    path is needed (nesting, other leaf types, values out of range, errors to word).
    """
    if len(data) != count or count > 64:
        return None
    leaf, lo, hi = _FLAT[datatype]
    if leaf is float:
        for v in data:
            t = type(v)
            if t is float:
                if not lo <= v <= hi:
                    return None
            elif t is not int or not -_EXACT_INT <= v <= _EXACT_INT or not lo <= v <= hi:
                return None
    elif leaf is int:
        for v in data:
            if type(v) is not int or not lo <= v <= hi:
                return None
    else:
        for v in data:
            if type(v) is not leaf:
                return None
        if leaf is str:
            return np.array(data, dtype=object)
    return np.array(data, dtype=V2_TO_NUMPY[datatype])


def from_json(name: str, data: Any, shape: list[int], datatype: str, count: int) -> Array:
    """A tensor from V2 JSON ``data`` (flat or nested, row-major) and its declared shape."""
    if not isinstance(data, list):
        data = [data]
    if count:
        flat = _from_flat_json(data, datatype, count)
        if flat is not None:
            return flat.reshape(shape)
    return _from_json(name, data, shape, datatype, count)


def _from_json(name: str, data: list[Any], shape: list[int], datatype: str, count: int) -> Array:
    """:func:`from_json` by the general path: any nesting, every check, worded errors."""
    _check_extent(name, data, shape, count)
    arr = json_array(f"input {name!r}", data, datatype)
    if arr.size != count:
        raise InvalidInput(
            f"input {name!r}: shape {shape} needs {count} elements, data has {arr.size}"
        )
    target = V2_TO_NUMPY[datatype]
    if count == 0:
        return np.empty(shape, dtype=target)
    arr = coerce(name, arr, datatype)
    return arr.reshape(shape)


def _check_extent(name: str, data: list[Any], shape: list[int], count: int) -> None:
    """Refuse ``data`` that cannot hold the declared shape's ``count`` elements, before any
    value is converted (RELIABILITY P14): the conversion costs the event loop time in
    proportion to what the client sent, which may be far more than the shape declares.

    Flat data: its length. Nested data: the product of the lengths along its first elements
    (a few steps), then every list's length level by level (C-speed ``map``, one pass over
    the lists but never over the values), so that ragged data with one huge list is refused
    too. Nesting other than the shape's with the same element count stays accepted, as the
    general path accepts it; an empty tensor's nesting may not exceed its shape's.
    """
    if data:
        first = data[0]
        if type(first) is not list:
            if len(data) != count:
                raise InvalidInput(
                    f"input {name!r}: shape {shape} needs {count} elements, data has {len(data)}"
                )
            return
        if first and type(first[0]) is not list and len(data) * len(first) == count and count:
            # Rows of values, the usual nesting: their lengths alone, at C speed.
            try:
                if set(map(len, data)) == {len(first)}:
                    return
            except TypeError:
                pass  # a value among the rows: worded below
    lengths = []
    value: Any = data
    while type(value) is list:
        lengths.append(len(value))
        if not value or len(lengths) > MAX_DIMS:
            break
        value = value[0]
    if len(lengths) > MAX_DIMS:
        return  # json_array refuses it before converting anything
    if len(lengths) == 1:
        if lengths[0] != count:
            raise InvalidInput(
                f"input {name!r}: shape {shape} needs {count} elements, data has {lengths[0]}"
            )
        return
    if count:
        if math.prod(lengths) != count:
            if math.prod(lengths[:-1]) <= count and not _regular(data, lengths):
                # Few enough lists to walk: ragged data is named as such.
                raise InvalidInput(
                    f"input {name!r}: data is ragged (nested lists of different lengths)"
                )
            raise InvalidInput(
                f"input {name!r}: shape {shape} needs {count} elements, data has "
                f"{math.prod(lengths)} (nested {lengths})"
            )
    elif len(lengths) > len(shape) or any(
        n > max(dim, 1) for n, dim in zip(lengths, shape, strict=False)
    ):
        raise InvalidInput(
            f"input {name!r}: shape {shape} holds no elements, but data is nested {lengths}",
            hint="send `data: []` for an empty tensor",
        )
    if not _regular(data, lengths):
        raise InvalidInput(f"input {name!r}: data is ragged (nested lists of different lengths)")


def _regular(data: list[Any], lengths: list[int]) -> bool:
    """Whether every list of ``data`` at each depth has the length its first one has: one
    pass over the lists, never over the values, at C speed (``map``)."""
    level = data
    last = len(lengths) - 1
    for depth in range(1, last + 1):
        try:
            if not set(map(len, level)) <= {lengths[depth]}:
                return False
        except TypeError:  # a value where a list should be
            return False
        if depth < last:
            level = list(itertools.chain.from_iterable(level))
    return True


def from_binary(name: str, raw: memoryview, shape: list[int], datatype: str, count: int) -> Array:
    """A tensor from the binary tensor extension (little-endian, row-major)."""
    if datatype == "BYTES":
        items: list[bytes] = []
        offset = 0
        size = len(raw)
        while offset < size:
            if len(items) == count:
                # More elements than the shape declares: refused before reading them all.
                raise InvalidInput(
                    f"input {name!r}: shape {shape} needs {count} elements, data has more"
                )
            if offset + 4 > size:
                raise InvalidInput(f"input {name!r}: truncated BYTES element length")
            (length,) = struct.unpack_from("<I", raw, offset)
            offset += 4
            if offset + length > size:
                raise InvalidInput(f"input {name!r}: BYTES element runs past its data")
            items.append(bytes(raw[offset : offset + length]))
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
    if datatype == "BOOL" and count and int(np.frombuffer(raw, dtype=np.uint8).max()) > 1:
        raise InvalidInput(f"input {name!r}: BOOL bytes must be 0 or 1")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def non_finite(name: str, arr: Array) -> str | None:
    """Where a float tensor holds NaN or an infinity (``input 'x': element [0, 2] is NaN``);
    ``None`` when every value is finite or the tensor holds no floats.

    JSON cannot carry such values; the binary tensor extension can. Whether a model accepts
    them is the model's to say (``accepts_non_finite``): the request path refuses them for
    any other model, as JSON would have.
    """
    if arr.dtype.kind != "f" or not arr.size:
        return None
    finite = np.isfinite(arr)
    if finite.all():
        return None
    at = np.unravel_index(int(np.argmin(finite)), arr.shape)
    value = float(arr[at])
    what = "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    return f"input {name!r}: element {[int(i) for i in at]} is {what}"


def to_json_data(arr: Array) -> list[Any]:
    """Flat row-major JSON data. Non-finite floats become ``null`` (P15: always valid JSON)."""
    flat = arr.reshape(-1)
    if flat.dtype.kind in "OSU":  # objects, bytes, str
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat]
    # Floats go out as they are: msgspec writes NaN and ±Inf as null (P15: valid JSON).
    values: list[Any] = flat.tolist()
    return values


def to_binary(arr: Array) -> bytes:
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


#: What msgspec raises for a body it cannot read as JSON: a syntax error (``DecodeError``), a
#: string that is not UTF-8 (``UnicodeDecodeError``), nesting past Python's recursion limit
#: (``RecursionError``: a 2 KB body of brackets is enough). Each is the client's 400, never a 500.
#: ``msgspec.ValidationError`` is a ``DecodeError``: callers that report it apart catch it first.
UNREADABLE_JSON = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


#: Bodies from this size are parsed with the garbage collector paused. A body of millions of
#: small lists or objects (``[[],[],...]`` fits 2.7 million in 8 MiB) makes the parse allocate
#: that many containers, each allocation counting towards a collection that walks all of them
#: again, all still reachable: 1.0 s instead of 0.18 s for that body. Small bodies (every
#: usual request) are parsed as they are, at the cost of one comparison.
GC_PAUSE_BYTES = 1 << 18


def parse_json(decoder: msgspec.json.Decoder[Any], body: bytes) -> Any:
    """``decoder.decode(body)``; a large body with the garbage collector paused."""
    if len(body) < GC_PAUSE_BYTES or not gc.isenabled():
        return decoder.decode(body)
    gc.disable()
    try:
        return decoder.decode(body)
    finally:
        gc.enable()


#: Where msgspec says a syntax error is: ``... (byte 61)``.
_ERROR_BYTE = re.compile(r"\(byte (\d+)\)")
#: What Python's ``json.dumps`` (and so tritonclient's JSON encoder) writes for non-finite
#: floats: not JSON (RFC 8259 has no such numbers), so msgspec refuses them as syntax.
_NON_FINITE_LITERALS = (b"NaN", b"Infinity", b"-Infinity")
_BOM = b"\xef\xbb\xbf"
#: Largest body parsed a second time (by the standard library, which reads NaN and 1e999) to
#: name the field of a non-finite number: on the error path only, and bounded, so that a
#: client cannot make every rejection cost the event loop a large parse.
REPARSE_MAX_BYTES = 1 << 20


def malformed_json(exc: Exception, body: bytes) -> InvalidInput:
    """The 400 for a body msgspec could not decode, naming the field where that is possible.

    ``NaN``, ``Infinity`` and ``-Infinity`` (Python's ``json.dumps`` writes them) and a UTF-8
    byte order mark at the start get a message saying what was found and what to send instead.
    msgspec refuses numbers that overflow a double (``1e999``) without naming the key; the
    standard library parses them (and the literals above), so on those rare paths the field
    is found by a second, slower parse of a body up to :data:`REPARSE_MAX_BYTES`.
    """
    if body[:3] == _BOM:
        return InvalidInput(
            "malformed JSON: the body starts with a UTF-8 byte order mark (BOM)",
            hint="remove the BOM: JSON sent over a network must not start with one (RFC 8259)",
        )
    if isinstance(exc, UnicodeDecodeError):
        return InvalidInput(
            f"malformed JSON: a string is not valid UTF-8 ({exc.reason}: byte "
            f"0x{exc.object[exc.start]:02x})",
            hint="encode the body as UTF-8",
        )
    if isinstance(exc, RecursionError):
        return InvalidInput(
            "malformed JSON: nested too deeply", hint="arrays and objects nest a few levels deep"
        )
    text = str(exc)
    found = _ERROR_BYTE.search(text)
    seen = _literal_at(body, int(found.group(1))) if found else None
    if seen is not None:
        literal, at = seen
        where = _non_finite_field(body)
        place = f"in {where}" if where else f"at byte {at}"
        return InvalidInput(
            f"malformed JSON: {literal} {place} is not a JSON number (JSON has no NaN or Infinity)",
            hint="send finite numbers; a tensor that must carry NaN or Infinity goes in "
            "binary (the binary tensor extension: Inference-Header-Content-Length), for a "
            "model that accepts them",
        )
    if "out of range" in text:
        where = _non_finite_field(body)
        if where:
            return InvalidInput(
                f"{where}: number out of range (values must be finite)", hint="fix the value"
            )
    return InvalidInput(f"malformed JSON: {text}")


def _literal_at(body: bytes, at: int) -> tuple[str, int] | None:
    """The non-finite literal (``NaN``, ``Infinity``, ``-Infinity``) msgspec stopped at, with
    its byte offset; ``None`` when it stopped at something else."""
    if at > 0 and body[at - 1 : at] == b"-":
        at -= 1  # msgspec reports the byte after the sign
    for literal in _NON_FINITE_LITERALS:
        if body.startswith(literal, at):
            return literal.decode(), at
    return None


def _non_finite_field(body: bytes) -> str | None:
    """Where the first non-finite number of ``body`` is (``inputs[0].data[3]``, with the V2
    input's name when it has one), by the standard library's parse; ``None`` if not found or
    the body is too large to parse again."""
    if len(body) > REPARSE_MAX_BYTES:
        return None
    import json

    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    where = _first_non_finite(doc, "")
    if where is None or not where.startswith("inputs["):
        return where
    # A V2 body: the input's name says more than its index.
    index = where[7 : where.index("]")]
    inputs = doc.get("inputs") if isinstance(doc, dict) else None
    if isinstance(inputs, list) and index.isdigit() and int(index) < len(inputs):
        tensor = inputs[int(index)]
        name = tensor.get("name") if isinstance(tensor, dict) else None
        if isinstance(name, str):
            return f"input {name[:64]!r} ({where})"
    return where


def _first_non_finite(value: Any, path: str) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return path or "<body>"
    if isinstance(value, dict):
        for key, item in value.items():
            found = _first_non_finite(item, f"{path}.{key}" if path else str(key))
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _first_non_finite(item, f"{path}[{i}]")
            if found:
                return found
    return None
