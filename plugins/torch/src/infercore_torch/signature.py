"""Tensor specs for torch models: from the config, or from an exported program's signature."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from infercore.components import V2_TO_NUMPY, Array, TensorSpec
from infercore.errors import InvalidInput, ModelLoadError

#: V2 datatype -> torch dtype attribute name.
V2_TO_TORCH: dict[str, str] = {
    "BOOL": "bool",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
TORCH_TO_V2: dict[str, str] = {v: k for k, v in V2_TO_TORCH.items()}


def torch_dtype(torch: Any, datatype: str) -> Any:
    """The torch dtype of a V2 datatype (``BYTES`` has none)."""
    return getattr(torch, V2_TO_TORCH[datatype])


def v2_of(dtype: Any, *, what: str, config_path: str) -> str:
    """The V2 datatype of a torch dtype.

    Raises:
        ModelLoadError: The dtype has no V2 datatype (bfloat16, complex, …).
    """
    name = str(dtype).removeprefix("torch.")
    try:
        return TORCH_TO_V2[name]
    except KeyError:
        raise ModelLoadError(
            f"{config_path}: {what} has dtype {name}, which the Open Inference Protocol "
            "cannot carry",
            hint=f"cast it in the model (one of: {', '.join(sorted(TORCH_TO_V2))}) or declare "
            "`inputs:` / `outputs:`",
        ) from None


def _dims(shape: Any) -> tuple[int, ...]:
    # A dynamic dim of an exported program is a SymInt; anything not a plain int varies.
    return tuple(d if type(d) is int else -1 for d in shape)


#: A bound at or past this is no bound: torch writes "unbounded" as ``int_oo`` (which ``int()``
#: refuses), older releases as ``sys.maxsize - 1``.
_UNBOUNDED = 2**62


@dataclass(frozen=True, slots=True)
class DimRange:
    """The sizes an exported program accepts in one dynamic dimension (its range constraint).

    Attributes:
        lower: The smallest size.
        upper: The largest size; ``None`` when the program sets none.
        symbol: The program's symbol when the dimension is exactly one (``s77``), ``None``
            for a derived dimension (``2*s77 + 1``). The relations that symbols make between
            dimensions are checked by :class:`~infercore_torch.relations.DimRelations`.
    """

    lower: int
    upper: int | None
    symbol: str | None = None

    def admits(self, size: int) -> bool:
        return self.lower <= size and (self.upper is None or size <= self.upper)

    def __str__(self) -> str:
        if self.upper is None:
            return f"at least {self.lower}"
        return f"{self.lower}..{self.upper}"


#: One entry per dimension of an input: ``None`` where the program fixes the size.
InputRanges = tuple[DimRange | None, ...]


def bound_of(value: Any) -> int | None:
    """A range bound as an int; ``None`` for no bound (``int_oo``, ``-int_oo``, huge)."""
    try:
        bound = int(value)
    except (TypeError, ValueError, AttributeError, OverflowError):
        return None
    return None if abs(bound) >= _UNBOUNDED else bound


def _range_of(dim: Any, constraints: Mapping[Any, Any]) -> DimRange:
    expr = dim.node.expr
    bounds = constraints.get(expr)
    if bounds is None:
        # A derived dimension (2*s77 + 1) has no entry of its own: bound it from its symbols'.
        try:
            from torch.utils._sympy.value_ranges import bound_sympy

            bounds = bound_sympy(expr, dict(constraints))
        except Exception:  # a torch without it, or an expression it cannot bound
            return DimRange(0, None)
    symbol = str(expr) if getattr(expr, "is_Symbol", False) else None
    return DimRange(max(0, bound_of(bounds.lower) or 0), bound_of(bounds.upper), symbol)


def exported_input_ranges(program: Any) -> list[InputRanges]:
    """The range of every dynamic dimension of each input of a ``torch.export`` program, in the
    order of :func:`exported_specs`' inputs.

    torch records a ``Dim``'s ``min`` / ``max`` in ``program.range_constraints`` (with ``min``
    raised to 2 where it specialised sizes 0 and 1, as ``Dim.AUTO`` does); the program's own
    guard refuses a size outside them with an ``AssertionError`` at call time.
    """
    nodes = {node.name: node for node in program.graph.nodes}
    constraints = getattr(program, "range_constraints", None) or {}
    ranges: list[InputRanges] = []
    for name in program.graph_signature.user_inputs:
        shape = nodes[name].meta["val"].shape
        ranges.append(tuple(None if type(d) is int else _range_of(d, constraints) for d in shape))
    return ranges


def exported_dim_exprs(program: Any) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Each dimension of the program's inputs and of its outputs, in signature order: the size
    where the program fixes it, else its sympy expression over the program's root symbols
    (``s77``, ``s77 + 1``). Call it after :func:`exported_specs` (which refuses non-tensors).
    """
    nodes = {node.name: node for node in program.graph.nodes}
    signature = program.graph_signature

    def exprs(name: str) -> tuple[Any, ...]:
        shape = nodes[name].meta["val"].shape
        return tuple(d if type(d) is int else d.node.expr for d in shape)

    return (
        [exprs(n) for n in signature.user_inputs],
        [exprs(str(n)) for n in signature.user_outputs],
    )


def exported_specs(program: Any, *, config_path: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of a ``torch.export`` program, from its graph signature.

    Inputs take the names of the forward's arguments; outputs are ``output`` for a single
    tensor, else ``output_0``, ``output_1`` … (declare ``outputs:`` to name them).

    Raises:
        ModelLoadError: An input or output is not a tensor, or has a dtype V2 cannot carry.
    """
    signature = program.graph_signature
    nodes = {node.name: node for node in program.graph.nodes}

    def spec(node_name: str, name: str, role: str) -> TensorSpec:
        val = nodes[node_name].meta.get("val") if node_name in nodes else None
        if val is None or not hasattr(val, "shape") or not hasattr(val, "dtype"):
            raise ModelLoadError(
                f"{config_path}: exported {role} {name!r} is not a tensor",
                hint="export a forward that takes and returns tensors, or declare "
                "`inputs:` / `outputs:`",
            )
        datatype = v2_of(val.dtype, what=f"{role} {name!r}", config_path=config_path)
        return TensorSpec(name=name, datatype=datatype, shape=_dims(val.shape))

    inputs = [spec(n, n, "input") for n in signature.user_inputs]
    outs = [str(n) for n in signature.user_outputs]
    out_names = ["output"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))]
    outputs = [spec(n, name, "output") for n, name in zip(outs, out_names, strict=True)]
    return inputs, outputs


def as_input(spec: TensorSpec, array: Array) -> Array:
    """``array`` as ``spec``'s dtype, C-contiguous and writable (what ``torch.from_numpy`` needs).

    Raises:
        InvalidInput: The values cannot take the dtype without changing kind (float -> int).
    """
    array = np.asarray(array)
    want = spec.dtype
    if array.dtype != want:
        if not np.can_cast(array.dtype, want, casting="same_kind"):
            raise InvalidInput(
                f"input {spec.name!r}: expected {spec.datatype}, got {array.dtype}",
                hint=f"send {spec.datatype} values",
            )
        return array.astype(want, order="C", casting="same_kind")
    if not array.flags.c_contiguous or not array.flags.writeable:
        return np.array(array, order="C", copy=True)
    return array


def holds_every_value(src: np.dtype[Any], dst: np.dtype[Any]) -> bool:
    """Whether every value of ``src`` is also a value of ``dst``, so the cast changes none.

    Booleans fit every numeric type; an integer type fits a wider one of its kind (an unsigned
    one also a wider signed one: uint8 in int16, never int8 in uint8), and a float whose
    significand holds all its bits (int16 in float32, int32 in float64, never int64 in
    float64); a float fits a float at least as wide. Nothing fits ``bool``, and a float fits no
    integer type.
    """
    if src == dst or src.kind == "b":
        return True
    if dst.kind == "b" or (src.kind == "f" and dst.kind != "f"):
        return False
    if src.kind == "f":
        return dst.itemsize >= src.itemsize
    if dst.kind in "iu":
        return bool(np.can_cast(src, dst, casting="safe"))
    # An integer into a float: every value is exact while it fits the significand.
    value_bits = src.itemsize * 8 - (src.kind == "i")
    return value_bits <= np.finfo(dst).nmant + 1


def cast_checked(array: Array, datatype: str) -> tuple[Array, str | None]:
    """``array`` as ``datatype`` (a copy), and what the cast would change in it (``None`` if
    nothing), for a model output whose dtype only the run shows (TorchScript, ``module:Class``).

    The rule, where the dtype cannot hold every value (:func:`holds_every_value`): an integer
    must lie within the target's range, and into a float be exactly representable there; a
    finite float must stay finite. A float's rounding to the nearest value of a narrower float
    (to zero below its smallest subnormal) is accepted: that is what declaring FP64 output as
    FP32 asks for. NaN and infinities stay what they were.
    """
    src, dst = array.dtype, V2_TO_NUMPY[datatype]
    with np.errstate(over="ignore", invalid="ignore"):
        cast = array.astype(dst)
    if array.size == 0 or holds_every_value(src, dst):
        return cast, None
    if src.kind in "iu" and dst.kind in "iu":
        info = np.iinfo(dst)
        if int(array.min()) < info.min or int(array.max()) > info.max:
            return cast, f"a value outside {datatype}'s range {info.min}..{info.max}"
    elif src.kind == "f":
        if bool(np.any(np.isinf(cast) & np.isfinite(array))):
            return cast, f"a finite value beyond {datatype}'s largest ({np.finfo(dst).max})"
    else:  # an integer into a float
        with np.errstate(over="ignore", invalid="ignore"):
            exact = bool(np.isfinite(cast).all()) and np.array_equal(cast.astype(src), array)
        if not exact:
            return cast, f"an integer that {datatype} cannot hold exactly"
    return cast, None


def _holding(datatype: str) -> list[str]:
    """The V2 datatypes that hold every value of ``datatype`` (for a hint)."""
    src = V2_TO_NUMPY[datatype]
    return [
        name
        for name, dst in V2_TO_NUMPY.items()
        if name != "BYTES" and dst.kind != "b" and holds_every_value(src, dst)
    ]


def check_declared(
    declared: list[TensorSpec], found: list[TensorSpec], *, role: str, config_path: str
) -> None:
    """Refuse declared ``inputs`` / ``outputs`` that contradict an exported program's graph.

    An input must have the graph's dtype (requests are cast to the declared one, and the
    program accepts only its own); an output's declared datatype must hold every value of the
    graph's dtype (:func:`holds_every_value`: a declaration never changes a value, so INT64
    declared INT8 or FP64 declared FP16 is refused). Ranks must agree, and a dimension the
    graph fixes must be declared as that size (a ``-1`` there would admit requests the program
    refuses).

    Raises:
        ModelLoadError: Naming ``{config_path}.{role}[i]``, the declared and the graph's spec.
    """
    for index, (want, got) in enumerate(zip(declared, found, strict=True)):
        where = f"{config_path}.{role}[{index}]"
        shape_ok = len(want.shape) == len(got.shape) and all(
            g == -1 or w == g for w, g in zip(want.shape, got.shape, strict=True)
        )
        if role == "inputs":
            dtype_ok = want.datatype == got.datatype
        else:
            dtype_ok = holds_every_value(got.dtype, want.dtype)
            if not dtype_ok and shape_ok:
                raise ModelLoadError(
                    f"{where}: output {want.name!r} is {got.datatype} in the exported program; "
                    f"the declared {want.datatype} cannot hold every {got.datatype} value, so "
                    "serving it would change values",
                    hint=f"declare {' or '.join(_holding(got.datatype))}, or cast in the model "
                    "before exporting",
                )
        if not (dtype_ok and shape_ok):
            raise ModelLoadError(
                f"{where}: declared {want.name!r} as {want.datatype} {list(want.shape)}, but the "
                f"exported program's {role[:-1]} is {got.datatype} {list(got.shape)}",
                hint=f"declare {got.datatype} {list(got.shape)} (-1 where the graph's dim varies)",
            )
