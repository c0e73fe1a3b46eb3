"""Response outputs derived from model outputs (``models.<m>.outputs`` in a recipe).

A recipe can expose, say, the fraud column of a classifier's probabilities and a thresholded
flag instead of the raw tensors. The mapping is checked against the model's signature when the
version loads, and applied to each request's own rows after the batcher.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from infercore.components import Tensors, TensorSpec
from infercore.config.schema import OutputMapping
from infercore.errors import ModelLoadError


@dataclass(frozen=True, slots=True)
class OutputPlan:
    """How to compute each exposed output; ``specs`` describe them for model metadata."""

    mappings: tuple[tuple[str, OutputMapping], ...]
    specs: tuple[TensorSpec, ...]

    def apply(self, outputs: Tensors) -> Tensors:
        result: Tensors = {}
        for name, m in self.mappings:
            value = outputs[m.source]
            if m.column is not None:
                value = value[:, m.column]
            if m.threshold is not None:
                value = value >= m.threshold
            result[name] = value
        return result


def plan_outputs(
    mappings: Mapping[str, OutputMapping] | None,
    model_outputs: Sequence[TensorSpec],
    *,
    config_path: str,
) -> OutputPlan | None:
    """Check ``mappings`` against the model's outputs; ``None`` when there is no mapping.

    Raises:
        ModelLoadError: A mapping names an output the model lacks, a column out of range, or a
            threshold on a non-numeric output.
    """
    if not mappings:
        return None
    by_name = {s.name: s for s in model_outputs}
    specs: list[TensorSpec] = []
    for name, m in mappings.items():
        where = f"{config_path}.{name}"
        src = by_name.get(m.source)
        if src is None:
            raise ModelLoadError(
                f"{where}.source: the model has no output {m.source!r}",
                hint=f"its outputs are: {', '.join(by_name)}",
            )
        shape = src.shape
        datatype = src.datatype
        if m.column is not None:
            if len(shape) != 2:
                raise ModelLoadError(
                    f"{where}.column: output {m.source!r} has shape {list(shape)}; "
                    "column needs a 2-D output"
                )
            width = shape[1]
            if m.column < 0 or (width >= 0 and m.column >= width):
                raise ModelLoadError(
                    f"{where}.column: {m.column} is out of range for {m.source!r} (width {width})"
                )
            shape = shape[:1]
        if m.threshold is not None:
            if np.dtype(src.dtype).kind not in "iuf":
                raise ModelLoadError(f"{where}.threshold: output {m.source!r} is not numeric")
            datatype = "BOOL"
        specs.append(TensorSpec(name, datatype, tuple(shape)))
    return OutputPlan(tuple(mappings.items()), tuple(specs))
