"""Turning request tensors into the arrays ONNX Runtime accepts."""

from __future__ import annotations

import numpy as np

from infercore.components import Array, TensorSpec
from infercore.errors import InvalidInput


def _as_str(value: object, name: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(
                f"input {name!r}: a BYTES element is not valid UTF-8",
                hint="ONNX string tensors hold text; send UTF-8 strings",
            ) from None
    raise InvalidInput(
        f"input {name!r}: expected str or bytes elements, got {type(value).__name__}"
    )


def _string_tensor(array: Array, name: str) -> Array:
    # ORT string tensors take str objects only; the codec hands over bytes or str.
    if array.dtype.kind == "U":
        return array
    flat = array.ravel()
    if array.dtype == object and all(type(v) is str for v in flat):
        return array
    out = np.empty(array.shape, dtype=object)
    out_flat = out.reshape(-1)
    for i, value in enumerate(flat):
        out_flat[i] = _as_str(value, name)
    return out


def prepare_input(spec: TensorSpec, array: Array) -> Array:
    """An array of exactly the dtype ``spec`` asks for, C-contiguous; ``array`` itself if it is.

    Args:
        spec: The model input the array is for.
        array: The request's array (already checked against the signature by the core).

    Raises:
        InvalidInput: The array's rank or a fixed dimension is not ``spec``'s (the core's
            check, again for a caller that skipped it: ONNX Runtime would refuse it with its
            own message), its values cannot become ``spec``'s dtype without changing kind
            (e.g. floats for an integer input), or BYTES elements are not UTF-8 text.
    """
    array = np.asarray(array)
    shape = array.shape
    if len(shape) != len(spec.shape) or any(
        want >= 0 and got != want for got, want in zip(shape, spec.shape, strict=False)
    ):
        raise InvalidInput(
            f"input {spec.name!r}: shape {list(shape)} does not match the model's "
            f"{list(spec.shape)}",
            hint="-1 marks a variable dimension; the number of dimensions and every other "
            "dimension must be as the model declares",
        )
    if spec.datatype == "BYTES":
        array = _string_tensor(array, spec.name)
    else:
        want = spec.dtype
        if array.dtype != want:
            # same_kind allows float64 -> float32 and int64 -> int32 (what JSON decoding yields)
            # but refuses float -> int, which would truncate silently.
            if not np.can_cast(array.dtype, want, casting="same_kind"):
                raise InvalidInput(
                    f"input {spec.name!r}: expected {spec.datatype}, got {array.dtype}",
                    hint=f"send {spec.datatype} values",
                )
            array = array.astype(want, order="C", casting="same_kind")
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    return array
