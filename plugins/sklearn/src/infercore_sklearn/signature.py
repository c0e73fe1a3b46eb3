"""The tensor signature of a fitted estimator: one input, and outputs by estimator type."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from infercore.components import TensorSpec
from infercore.errors import ConfigError, ModelLoadError

INPUT_NAME = "input"


@dataclass(frozen=True, slots=True)
class Signature:
    """What :class:`~infercore_sklearn.model.SklearnModel` serves for one estimator."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


def label_datatype(classes: Any, *, config_path: str) -> str:
    """The V2 datatype of a classifier's labels, from its ``classes_``.

    Raises:
        ModelLoadError: ``classes_`` is not one flat array of numbers, booleans or strings
            (multi-output classifiers are not supported).
    """
    if not isinstance(classes, np.ndarray) or classes.ndim != 1:
        raise ModelLoadError(
            f"{config_path}: the classifier's classes_ is not one flat array "
            "(multi-output and multi-label classifiers are not supported)",
            hint="serve one classifier per output",
        )
    kind = classes.dtype.kind
    if kind in "iu":
        return "INT64"
    if kind == "b":
        return "BOOL"
    if kind == "f":
        return "FP64"
    if kind in "US" or (kind == "O" and all(isinstance(c, str | bytes) for c in classes)):
        return "BYTES"
    raise ModelLoadError(
        f"{config_path}: the classifier's classes have dtype {classes.dtype}, which has no "
        "tensor datatype",
        hint="train it with integer or string class labels",
    )


def describe(
    estimator: Any,
    *,
    input_datatype: str,
    requested: list[Literal["label", "probabilities"]] | None,
    config_path: str,
) -> Signature:
    """Build the signature of ``estimator``; runs scikit-learn code, so call it in a thread.

    A regressor is probed with one zero row to learn whether it returns one value or ``k``
    values per row.

    Raises:
        ModelLoadError: The object is not a fitted classifier or regressor with
            ``n_features_in_``.
        ConfigError: ``outputs`` asks for something this estimator cannot give.
    """
    from sklearn.base import is_classifier, is_regressor

    if not callable(getattr(estimator, "predict", None)):
        raise ModelLoadError(
            f"{config_path}: the artifact holds a {type(estimator).__name__}, not an estimator "
            "with predict()",
            hint="save the fitted classifier or regressor (or a Pipeline ending in one)",
        )
    n_features = getattr(estimator, "n_features_in_", None)
    if not isinstance(n_features, int | np.integer) or n_features < 1:
        raise ModelLoadError(
            f"{config_path}: the {type(estimator).__name__} has no n_features_in_, so its "
            "input width is unknown",
            hint="save a fitted estimator trained on a 2-D array (scikit-learn >= 1.0 sets "
            "n_features_in_)",
        )
    width = int(n_features)
    inputs = [TensorSpec(INPUT_NAME, input_datatype, (-1, width))]

    if is_classifier(estimator):
        datatype = label_datatype(getattr(estimator, "classes_", None), config_path=config_path)
        has_proba = hasattr(estimator, "predict_proba")
        names = requested or (["label", "probabilities"] if has_proba else ["label"])
        if "probabilities" in names and not has_proba:
            raise ConfigError(
                f"{config_path}.outputs: 'probabilities' requested, but the "
                f"{type(estimator).__name__} has no predict_proba",
                hint="ask for ['label'] only, or train a classifier that gives probabilities",
            )
        n_classes = len(estimator.classes_)
        specs = {
            "label": TensorSpec("label", datatype, (-1,)),
            "probabilities": TensorSpec("probabilities", "FP64", (-1, n_classes)),
        }
        return Signature(inputs, [specs[name] for name in names])

    if is_regressor(estimator):
        if requested is not None:
            raise ConfigError(
                f"{config_path}.outputs: only classifiers choose their outputs; a regressor "
                "always returns 'prediction'",
                hint="remove `outputs:`",
            )
        probe = np.asarray(estimator.predict(np.zeros((1, width), dtype=inputs[0].dtype)))
        if probe.ndim == 1:
            shape: tuple[int, ...] = (-1,)
        elif probe.ndim == 2:
            shape = (-1, int(probe.shape[1]))
        else:
            raise ModelLoadError(
                f"{config_path}: the regressor returns {probe.ndim}-D predictions; "
                "expected 1-D or 2-D"
            )
        return Signature(inputs, [TensorSpec("prediction", "FP64", shape)])

    raise ModelLoadError(
        f"{config_path}: the {type(estimator).__name__} is neither a classifier nor a regressor",
        hint="kind: sklearn serves classifiers and regressors (or Pipelines ending in one)",
    )
