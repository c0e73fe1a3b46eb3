"""infercore-lightgbm: serve LightGBM boosters from their native text model format.

``loader: {kind: lightgbm, path: ...}``. Importing this package is cheap: ``lightgbm`` is
imported when a model starts, so ``infercore plugins`` and config validation never pay for it.
"""

from __future__ import annotations

from infercore.components import Model
from infercore.hookspecs import hookimpl
from infercore_lightgbm.model import LightGBMModel

__all__ = ["LightGBMModel", "register_model_loaders"]


@hookimpl
def register_model_loaders() -> list[type[Model]]:
    """The ``lightgbm`` model loader."""
    return [LightGBMModel]
