"""infercore-onnx: serve ONNX models with ONNX Runtime (``loader: {kind: onnx, ...}``).

Importing this module is cheap on purpose: ``onnxruntime`` is imported when a model starts, so
``infercore plugins`` and config validation never pay for it.
"""

from __future__ import annotations

from infercore.components import Model
from infercore.hookspecs import hookimpl
from infercore_onnx.model import ModelTooLarge, OnnxModel

__all__ = ["ModelTooLarge", "OnnxModel", "register_model_loaders"]


@hookimpl
def register_model_loaders() -> list[type[Model]]:
    """The ``onnx`` model loader."""
    return [OnnxModel]
