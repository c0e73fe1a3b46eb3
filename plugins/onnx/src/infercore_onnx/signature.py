"""ONNX Runtime signatures as infercore tensor specs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from infercore.components import TensorSpec
from infercore.errors import ModelLoadError

#: ORT type string -> Open Inference Protocol datatype.
ORT_TO_V2: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def _dim(value: Any) -> int:
    # ORT reports a symbolic dim as its name (str) and an unnamed one as None; both vary per call.
    if isinstance(value, int) and value >= 0:
        return value
    return -1


def tensor_spec(node_arg: Any, *, role: str, config_path: str) -> TensorSpec:
    """Turn one ORT ``NodeArg`` (``name``, ``type``, ``shape``) into a :class:`TensorSpec`.

    Args:
        node_arg: An element of ``session.get_inputs()`` or ``session.get_outputs()``.
        role: ``"input"`` or ``"output"``, for the message.
        config_path: The loader's config path, for the message.

    Raises:
        ModelLoadError: The value is not a tensor (a sequence or map, such as the output of
            skl2onnx's ZipMap) or has an element type the protocol cannot carry.
    """
    name: str = node_arg.name
    ort_type: str = node_arg.type
    datatype = ORT_TO_V2.get(ort_type)
    if datatype is None:
        if not ort_type.startswith("tensor("):
            hint = "export the model so that every input and output is a plain tensor"
            if role == "output" and ort_type.startswith(("seq(", "map(")):
                hint = (
                    "a seq(map(...)) output usually comes from skl2onnx's ZipMap: export with "
                    "zipmap disabled, e.g. to_onnx(..., options={'zipmap': False})"
                )
            raise ModelLoadError(
                f"{config_path}: model {role} {name!r} has type {ort_type}, which is not a tensor",
                hint=hint,
            )
        raise ModelLoadError(
            f"{config_path}: model {role} {name!r} has element type {ort_type}, which the "
            "Open Inference Protocol cannot carry",
            hint=f"export it with one of: {', '.join(sorted(ORT_TO_V2))}",
        )
    shape: Sequence[Any] = node_arg.shape or ()
    return TensorSpec(name=name, datatype=datatype, shape=tuple(_dim(d) for d in shape))


def tensor_specs(node_args: Sequence[Any], *, role: str, config_path: str) -> list[TensorSpec]:
    """:func:`tensor_spec` for each element, in the session's order."""
    return [tensor_spec(a, role=role, config_path=config_path) for a in node_args]
