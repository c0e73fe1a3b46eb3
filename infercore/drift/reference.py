"""Reference samples for drift detectors: parquet, npz or csv files under the model root.

The file is read once, its digest checked against the pinned ``sha256`` (when given) on the
very bytes that are then parsed, and it becomes columns in the shape of
:mod:`infercore.drift.columns`: numbers ``float64`` (missing values NaN), categories ``object``
arrays of ``str``.

- **parquet** (``.parquet``, ``.pq``; needs ``pyarrow``): one column per parquet column;
  numeric and boolean columns are numbers, string and dictionary columns are categories;
  columns of other types (timestamps, lists …) are left out.
- **npz** (``.npz``): one entry per tensor, flattened like live tensors (``[N, k]`` ->
  ``name[0]`` … ``name[k-1]``); string arrays are categories. Object arrays are refused: they
  need pickle, which is never enabled.
- **csv** (``.csv``): a header row, then rows; a column whose every non-empty cell parses as
  a number is numeric (empty cells NaN), any other column is categorical.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path, PurePath

import numpy as np

from infercore.artifacts import read_verified, resolve_artifact
from infercore.drift.columns import Columns, expand_names, is_categorical, normalize_column
from infercore.drift.columns import to_columns as _tensor_columns
from infercore.errors import ConfigError, ModelLoadError

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".npz": "npz", ".csv": "csv"}


def reference_format(path: str, *, config_path: str) -> str:
    """The format of a reference path by its suffix, checked at config time.

    Raises:
        ConfigError: The suffix is not ``.parquet``, ``.pq``, ``.npz`` or ``.csv``.
    """
    fmt = FORMATS.get(PurePath(path).suffix.lower())
    if fmt is None:
        raise ConfigError(
            f"{config_path}: reference {PurePath(path).name!r} has an unknown format",
            hint="use a .parquet, .npz or .csv file",
        )
    return fmt


def load_reference(model_root: Path, path: str, *, sha256: str | None, config_path: str) -> Columns:
    """Read a reference sample into columns.

    Args:
        model_root: The folder the file must resolve inside.
        path: The file, relative to ``model_root``.
        sha256: The pinned hex digest, or ``None``.
        config_path: The config key of ``path``
            (e.g. ``models.fraud.drift.detectors.ks.reference``).

    Raises:
        ConfigError: The path leaves the model root, the format is unknown, or parquet is
            asked for without pyarrow installed.
        ModelLoadError: Missing file, digest mismatch, unreadable content, no rows, or columns
            of different lengths.
    """
    fmt = reference_format(path, config_path=config_path)
    resolved = resolve_artifact(model_root, path, config_path=config_path)
    data = read_verified(resolved, sha256, config_path=config_path)
    name = PurePath(path).name
    try:
        if fmt == "parquet":
            columns = _read_parquet(data, config_path=config_path)
        elif fmt == "npz":
            columns = _read_npz(data)
        else:
            columns = _read_csv(data)
    except (ConfigError, ModelLoadError):
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"{config_path}: reference {name!r} could not be read as {fmt}: "
            f"{type(exc).__name__}: {_short(exc)}"
        ) from None
    if not columns:
        raise ModelLoadError(f"{config_path}: reference {name!r} has no usable columns")
    lengths = {c.shape[0] for c in columns.values()}
    if len(lengths) != 1:
        raise ModelLoadError(f"{config_path}: reference {name!r} has columns of different lengths")
    if lengths.pop() < 2:
        raise ModelLoadError(f"{config_path}: reference {name!r} needs at least 2 rows")
    return columns


def select_columns(
    reference: Columns,
    features: Sequence[str] | None,
    *,
    config_path: str,
    numeric: bool | None = None,
) -> list[str]:
    """The reference columns a detector tests.

    Args:
        reference: Columns from :func:`load_reference`.
        features: Column or tensor names from the config (a tensor name stands for all its
            columns), or ``None`` for every column of the wanted type.
        config_path: The config key of ``features``, for messages.
        numeric: ``True``: numeric columns only; ``False``: categorical only; ``None``: any.

    Raises:
        ConfigError: A name that is not a reference column, a column of the wrong type, or
            nothing left to test.
    """
    available = list(reference)
    if features is None:
        names = [
            n for n in available if numeric is None or is_categorical(reference[n]) is (not numeric)
        ]
        if not names:
            want = "numeric" if numeric else "categorical" if numeric is False else "any"
            raise ConfigError(
                f"{config_path}: the reference has no {want} columns to test",
                hint=f"reference columns: {', '.join(available)}",
            )
        return names
    names = expand_names(features, available)
    missing = [n for n in names if n not in reference]
    if missing:
        raise ConfigError(
            f"{config_path}: {', '.join(map(repr, missing))} not in the reference",
            hint=f"reference columns: {', '.join(available)}",
        )
    if numeric is not None:
        wrong = [n for n in names if is_categorical(reference[n]) is numeric]
        if wrong:
            kind = "categorical" if numeric else "numeric"
            raise ConfigError(
                f"{config_path}: {', '.join(map(repr, wrong))} "
                f"{'is' if len(wrong) == 1 else 'are'} "
                f"{kind} in the reference; this detector tests "
                f"{'numeric' if numeric else 'categorical'} columns",
                hint="pick another detector for them, or leave them out of `features`",
            )
    if len(set(names)) != len(names):
        raise ConfigError(f"{config_path}: a column is named twice")
    return names


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text[:200]


def _read_parquet(data: bytes, *, config_path: str) -> Columns:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(
            f"{config_path}: reading a parquet reference needs pyarrow",
            hint="pip install pyarrow, or use an .npz or .csv reference",
        ) from None
    table = pq.read_table(pa.BufferReader(data))
    out: Columns = {}
    for name, col in zip(table.column_names, table.columns, strict=True):
        typ = col.type
        if pa.types.is_dictionary(typ):
            col = col.cast(typ.value_type)
            typ = col.type
        if pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ):
            # nulls become NaN
            values = col.cast(pa.float64()).to_numpy(zero_copy_only=False)
            out[name] = np.asarray(values, dtype=np.float64)
        elif pa.types.is_string(typ) or pa.types.is_large_string(typ):
            values = col.to_pylist()
            out[name] = normalize_column(np.asarray(values, dtype=object))
    return out


def _read_npz(data: bytes) -> Columns:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        tensors = {name: npz[name] for name in npz.files}
    return _tensor_columns(tensors)


def _read_csv(data: bytes) -> Columns:
    text = data.decode("utf-8-sig")
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return {}
    header, body = rows[0], rows[1:]
    if len(set(header)) != len(header):
        raise ValueError("the header names a column twice")
    out: Columns = {}
    for i, name in enumerate(header):
        cells = [r[i] if i < len(r) else "" for r in body]
        try:
            out[name] = np.array(
                [float(c) if c.strip() else np.nan for c in cells], dtype=np.float64
            )
        except ValueError:
            out[name] = np.array(cells, dtype=object)
    return out
