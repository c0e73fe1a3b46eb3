"""How model tensors become the feature columns drift detectors test.

A detector sees a window as *columns*: one 1-D array per feature column, all of one length.

- A tensor of shape ``[N]`` or ``[N, 1]`` (one ONNX input per feature, as in the fraud recipe)
  becomes one column named like the tensor: ``amount``.
- A tensor of shape ``[N, k]`` (one input holding every feature, as in the iris recipe)
  becomes ``k`` columns named ``input[0]`` … ``input[k-1]``; a tensor with more dimensions is
  flattened per row first (``[N, 2, 3]`` -> ``x[0]`` … ``x[5]``).
- Numbers (and booleans) become ``float64``; ``BYTES``/string tensors become *categorical*
  columns: ``object`` arrays of ``str`` (bytes decoded as UTF-8, invalid bytes replaced).

Reference samples are read into the same shape (:mod:`infercore.drift.reference`), so a
detector can compare a window column with the reference column of the same name.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

#: Any numpy array.
Array = npt.NDArray[Any]
Columns = dict[str, Array]


def is_categorical(column: Array) -> bool:
    """Whether a column holds categories (strings) rather than numbers."""
    return column.dtype.kind in "OSU"


def _to_str(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return str(value)


def normalize_column(column: Array) -> Array:
    """A column as ``float64`` (numbers, booleans) or an ``object`` array of ``str``."""
    kind = column.dtype.kind
    if kind in "biuf":
        return column.astype(np.float64, copy=False)
    if kind == "c":
        raise ValueError("complex values cannot be monitored for drift")
    out = np.empty(column.shape[0], dtype=object)
    out[:] = [_to_str(v) for v in column.tolist()]
    return out


def tensor_columns(name: str, tensor: Array) -> list[tuple[str, Array]]:
    """The columns of one tensor (rows along its first dimension), not yet normalized."""
    arr = np.asarray(tensor)
    if arr.ndim == 0:
        raise ValueError(f"tensor {name!r} is a scalar; drift monitoring needs rows")
    if arr.ndim == 1:
        return [(name, arr)]
    flat = arr.reshape(arr.shape[0], -1)
    if flat.shape[1] == 1:
        return [(name, flat[:, 0])]
    return [(f"{name}[{i}]", flat[:, i]) for i in range(flat.shape[1])]


def spec_columns(name: str, shape: Sequence[int]) -> list[str] | None:
    """The columns a tensor the model declares with ``shape`` (rows first, ``-1`` variable)
    becomes, as :func:`tensor_columns` names them; ``None`` when a dimension after the first
    is variable (its columns are known only from data)."""
    rest = tuple(shape[1:])
    if any(d < 0 for d in rest):
        return None
    width = 1
    for d in rest:
        width *= d
    if width == 1:
        return [name]
    return [f"{name}[{i}]" for i in range(width)]


def to_columns(tensors: Mapping[str, Array], names: Collection[str] | None = None) -> Columns:
    """Named tensors (those in ``names``, or all) as normalized columns, in tensor order.

    Raises:
        ValueError: A scalar tensor, a complex one, or tensors with different row counts.
    """
    out: Columns = {}
    rows: int | None = None
    for name, tensor in tensors.items():
        if names is not None and name not in names:
            continue
        for col_name, col in tensor_columns(name, tensor):
            if rows is None:
                rows = col.shape[0]
            elif col.shape[0] != rows:
                raise ValueError(f"column {col_name!r} has {col.shape[0]} rows, others have {rows}")
            out[col_name] = normalize_column(col)
    return out


def concat_columns(parts: Sequence[Columns]) -> Columns:
    """Stack column sets row-wise, keeping the columns every part has (in the first's order).

    A numeric column that arrives as categories in some part (a client that sent strings)
    becomes categorical for the whole window.
    """
    if not parts:
        return {}
    common = [name for name in parts[0] if all(name in p for p in parts[1:])]
    out: Columns = {}
    for name in common:
        cols = [p[name] for p in parts]
        if any(is_categorical(c) for c in cols) and not all(is_categorical(c) for c in cols):
            cols = [c if is_categorical(c) else normalize_column(c.astype(str)) for c in cols]
        out[name] = np.concatenate(cols) if len(cols) > 1 else cols[0]
    return out


def row_count(columns: Columns) -> int:
    """Rows of a column set (0 when it has no columns)."""
    for col in columns.values():
        return int(col.shape[0])
    return 0


def expand_names(wanted: Iterable[str], available: Collection[str]) -> list[str]:
    """Column names for ``wanted``: a column name as is, a tensor name as all its columns.

    ``input`` expands to ``input[0]``, ``input[1]`` … when ``input`` itself is not a column.
    Names that match nothing are returned unchanged (the caller reports them).
    """
    out: list[str] = []
    for name in wanted:
        if name in available:
            out.append(name)
            continue
        prefix = f"{name}["
        matched = [c for c in available if c.startswith(prefix) and c.endswith("]")]
        out.extend(matched or [name])
    return out
