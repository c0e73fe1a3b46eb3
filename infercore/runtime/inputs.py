"""Checking a request's tensors against the model's signature before they are queued."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy.typing as npt

from infercore.components import Tensors, TensorSpec
from infercore.errors import InvalidInput
from infercore.protocol.names import listed
from infercore.protocol.tensors import coerce

log = logging.getLogger("infercore.runtime")


def prepare_inputs(
    specs: Sequence[TensorSpec],
    tensors: Mapping[str, npt.NDArray[Any]],
    *,
    declared: Mapping[str, str] | None,
    max_rows: int,
    request_fields: Callable[[Sequence[str]], Sequence[str]] | None = None,
    same_rows: bool = True,
) -> Tensors:
    """Match tensors to the model's inputs by name, datatype and shape.

    Args:
        specs: The model's inputs.
        tensors: The request's tensors (after the feature source).
        declared: V2 datatypes the client declared, by input name; those must match the model
            exactly. Tensors without a declared datatype (V1, feature sources) are converted
            to the model's datatype where that loses nothing.
        max_rows: Most rows (batch-dimension entries) one request may carry.
        request_fields: The names a request may carry, given the model's input names (the
            feature source's :meth:`~infercore.components.FeatureSource.request_fields`):
            the hint of a missing or unknown input lists them. Called only then.
        same_rows: Whether every batched input must have the same first dimension: the
            model stacks requests (:attr:`~infercore.components.Model.batchable`). A model
            that does not may relate its inputs' first dimensions otherwise (a torch.export
            program's ``y: n + 1``) and checks that itself; the row limit then holds for the
            longest.

    Raises:
        InvalidInput: A missing or unknown input, a wrong datatype or shape, mismatched row
            counts, or too many rows.
    """
    out: Tensors = {}
    rows: int | None = None
    for spec in specs:
        arr = tensors.get(spec.name)
        if arr is None:
            raise InvalidInput(
                f"missing input {spec.name!r}", hint=names_hint(specs, request_fields)
            )
        dt = declared.get(spec.name) if declared else None
        if dt is not None:
            if dt != spec.datatype:
                raise InvalidInput(
                    f"input {spec.name!r}: datatype {dt} does not match the model's "
                    f"{spec.datatype}",
                    hint=f"send {spec.datatype} (a V2 datatype must match the model's exactly)",
                )
        elif arr.dtype != spec.dtype or spec.datatype == "BYTES":
            arr = coerce(spec.name, arr, spec.datatype)
        if arr.ndim != len(spec.shape):
            raise InvalidInput(
                f"input {spec.name!r}: shape {list(arr.shape)} does not match the model's "
                f"{list(spec.shape)} (rank {arr.ndim} vs {len(spec.shape)})"
            )
        for got, want in zip(arr.shape, spec.shape, strict=True):
            if want >= 0 and got != want:
                raise InvalidInput(
                    f"input {spec.name!r}: shape {list(arr.shape)} does not match the model's "
                    f"{list(spec.shape)}"
                )
        if spec.batched:
            n = arr.shape[0]
            if rows is None:
                rows = n
            elif not same_rows:
                rows = max(rows, n)
            elif n != rows:
                raise InvalidInput(
                    f"input {spec.name!r} has {n} rows but other inputs have {rows}",
                    hint="every batched input needs the same first dimension",
                )
        out[spec.name] = arr
    if len(out) != len(tensors):
        unknown = sorted(set(tensors) - set(out))
        raise InvalidInput(
            f"unknown input{'s' if len(unknown) > 1 else ''} {listed(unknown)}",
            hint=names_hint(specs, request_fields),
        )
    if rows is not None:
        if rows == 0:
            raise InvalidInput("the request has no rows")
        if rows > max_rows:
            raise InvalidInput(
                f"the request has {rows} rows; the limit is {max_rows}",
                hint="split the request (server.max_request_rows)",
            )
    return out


def names_hint(
    specs: Sequence[TensorSpec], request_fields: Callable[[Sequence[str]], Sequence[str]] | None
) -> str:
    """What the client may send. Behind a feature source that builds the model's inputs from
    request fields (an entity key and a few values), the model's input names are tensors the
    client cannot send: the hint names the fields instead."""
    names = [s.name for s in specs]
    fields = names
    if request_fields is not None:
        try:
            fields = list(dict.fromkeys(request_fields(names)))
        except Exception:
            # A plugin's bug while explaining a client's mistake must not turn the 400 into
            # a 500: the model's own inputs are still a true (if less useful) answer.
            log.exception("listing the request's fields for an error hint failed")
    if not fields or set(fields) == set(names):
        return f"the model's inputs are: {', '.join(names)}"
    if set(names).issubset(fields):
        # The source passes the model's inputs through and builds them from fields too.
        built = [f for f in fields if f not in names]
        return (
            f"the model's inputs are: {', '.join(names)}; or the fields the feature source "
            f"builds them from: {', '.join(built)}"
        )
    return f"the request's fields are: {', '.join(fields)}"
