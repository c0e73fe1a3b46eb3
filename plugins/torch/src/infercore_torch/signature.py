"""Tensor specs for torch models: from the config, or from an exported program's signature."""

from __future__ import annotations

from typing import Any

import numpy as np

from infercore.components import Array, TensorSpec
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


def check_declared(
    declared: list[TensorSpec], found: list[TensorSpec], *, role: str, config_path: str
) -> None:
    """Refuse declared ``inputs`` / ``outputs`` that contradict an exported program's graph.

    An input must have the graph's dtype (requests are cast to the declared one, and the
    program accepts only its own); an output's graph dtype must cast to the declared one within
    the same kind. Ranks must agree, and a dimension the graph fixes must be declared as that
    size (a ``-1`` there would admit requests the program refuses).

    Raises:
        ModelLoadError: Naming ``{config_path}.{role}[i]``, the declared and the graph's spec.
    """
    for index, (want, got) in enumerate(zip(declared, found, strict=True)):
        where = f"{config_path}.{role}[{index}]"
        if role == "inputs":
            dtype_ok = want.datatype == got.datatype
        else:
            dtype_ok = np.can_cast(got.dtype, want.dtype, casting="same_kind")
        shape_ok = len(want.shape) == len(got.shape) and all(
            g == -1 or w == g for w, g in zip(want.shape, got.shape, strict=True)
        )
        if not (dtype_ok and shape_ok):
            raise ModelLoadError(
                f"{where}: declared {want.name!r} as {want.datatype} {list(want.shape)}, but the "
                f"exported program's {role[:-1]} is {got.datatype} {list(got.shape)}",
                hint=f"declare {got.datatype} {list(got.shape)} (-1 where the graph's dim varies)",
            )
