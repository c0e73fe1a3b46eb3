"""Tensor signatures and the Open Inference Protocol datatypes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: V2 datatype name -> numpy dtype. BYTES holds Python ``bytes`` objects in an object array.
V2_TO_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}

NUMPY_TO_V2: dict[np.dtype[Any], str] = {
    dt: name for name, dt in V2_TO_NUMPY.items() if name != "BYTES"
}


def v2_datatype(dtype: np.dtype[Any]) -> str:
    """The V2 datatype name of a numpy dtype (strings and objects are ``BYTES``)."""
    if dtype.kind in "OSU":
        return "BYTES"
    try:
        return NUMPY_TO_V2[dtype]
    except KeyError:
        raise ValueError(f"numpy dtype {dtype} has no Open Inference Protocol datatype") from None


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One named input or output of a model.

    Attributes:
        name: The tensor name clients use.
        datatype: A V2 datatype name (``FP32``, ``INT64``, ``BYTES`` …).
        shape: Dimensions; ``-1`` marks a variable one. A model whose every input and output has
            a variable first dimension accepts batches along that dimension.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.datatype not in V2_TO_NUMPY:
            raise ValueError(f"tensor {self.name!r}: unknown datatype {self.datatype!r}")

    @property
    def dtype(self) -> np.dtype[Any]:
        return V2_TO_NUMPY[self.datatype]

    @property
    def batched(self) -> bool:
        """Whether the first dimension is the (variable) batch dimension."""
        return len(self.shape) > 0 and self.shape[0] == -1

    def to_metadata(self) -> dict[str, object]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}
