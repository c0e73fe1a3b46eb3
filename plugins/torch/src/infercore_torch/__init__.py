"""infercore-torch: serve torch models (``loader: {kind: torch, ...}``) and batch them on a GPU
(``batching: {kind: torch-gpu, ...}``).

Importing this module is cheap on purpose: torch is imported when a torch model starts, so
``infercore plugins`` and recipes without a torch model never import it.
"""

from __future__ import annotations

from infercore.components import Batcher, Model
from infercore.hookspecs import hookimpl
from infercore_torch.batcher import TorchGpuBatcher
from infercore_torch.model import TorchModel

__all__ = ["TorchGpuBatcher", "TorchModel", "register_batchers", "register_model_loaders"]


@hookimpl
def register_model_loaders() -> list[type[Model]]:
    """The ``torch`` model loader."""
    return [TorchModel]


@hookimpl
def register_batchers() -> list[type[Batcher]]:
    """The ``torch-gpu`` batcher."""
    return [TorchGpuBatcher]
