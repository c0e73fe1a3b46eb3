"""The tensor signature of a LightGBM booster, from its objective and shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from infercore.components import TensorSpec
from infercore.errors import ConfigError

INPUT_NAME = "input"

#: Objectives whose output is a probability per class (LightGBM's canonical names).
BINARY = frozenset({"binary"})
MULTICLASS = frozenset({"multiclass", "multiclassova"})

Task = Literal["binary", "multiclass", "regression"]


@dataclass(frozen=True, slots=True)
class Signature:
    """What :class:`~infercore_lightgbm.model.LightGBMModel` serves for one booster.

    Attributes:
        task: ``binary``, ``multiclass``, or ``regression`` (every other objective: regression,
            ranking, poisson, custom … whose raw prediction is served as it comes).
        n_classes: Classes of a classifier; outputs per row of anything else.
        inputs: One input, ``input``.
        outputs: ``probabilities`` and / or ``label`` for a classifier, ``prediction`` otherwise.
    """

    task: Task
    n_classes: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


def read_objective(model_text: str) -> str:
    """The objective named in the header of a LightGBM text model (``objective=binary …``).

    The header ends at the first blank line; a model trained with a custom objective function
    has no ``objective=`` line, which reads as ``custom``.
    """
    for line in model_text.splitlines():
        if not line.strip():
            break
        if line.startswith("objective="):
            words = line.removeprefix("objective=").split()
            return words[0] if words else "custom"
    return "custom"


def task_of(objective: str, outputs_per_row: int) -> Task:
    """``binary`` / ``multiclass`` for classification objectives, else ``regression``."""
    if objective in BINARY and outputs_per_row == 1:
        return "binary"
    if objective in MULTICLASS and outputs_per_row > 1:
        return "multiclass"
    return "regression"


def describe(
    *,
    objective: str,
    num_feature: int,
    outputs_per_row: int,
    input_datatype: str,
    requested: list[Literal["label", "probabilities"]] | None,
    config_path: str,
) -> Signature:
    """Build the signature of a booster.

    Args:
        objective: From :func:`read_objective`.
        num_feature: ``booster.num_feature()``.
        outputs_per_row: ``booster.num_model_per_iteration()`` (classes of a multiclass model).
        input_datatype: ``FP32`` or ``FP64``.
        requested: The ``outputs`` option.
        config_path: The loader's config path, for messages.

    Raises:
        ConfigError: ``outputs`` was set for a booster that is not a classifier.
    """
    task = task_of(objective, outputs_per_row)
    inputs = [TensorSpec(INPUT_NAME, input_datatype, (-1, num_feature))]
    if task == "regression":
        if requested is not None:
            raise ConfigError(
                f"{config_path}.outputs: only classifiers (objective binary, multiclass, "
                f"multiclassova) choose their outputs; this booster's objective is "
                f"{objective!r} and it returns 'prediction'",
                hint="remove `outputs:`",
            )
        shape: tuple[int, ...] = (-1,) if outputs_per_row == 1 else (-1, outputs_per_row)
        return Signature(task, outputs_per_row, inputs, [TensorSpec("prediction", "FP64", shape)])
    n_classes = 2 if task == "binary" else outputs_per_row
    specs = {
        "probabilities": TensorSpec("probabilities", "FP64", (-1, n_classes)),
        "label": TensorSpec("label", "INT64", (-1,)),
    }
    names = requested or ["probabilities", "label"]
    return Signature(task, n_classes, inputs, [specs[name] for name in names])
