"""scikit-learn model loader for infercore (``kind: sklearn``).

Importing this package is cheap: scikit-learn, skops and joblib are imported when a model
starts, not when the plugin registers.
"""

from __future__ import annotations

from infercore.components import Model
from infercore.hookspecs import hookimpl
from infercore_sklearn.model import SklearnModel

__all__ = ["SklearnModel", "register_model_loaders"]


@hookimpl
def register_model_loaders() -> list[type[Model]]:
    """The ``sklearn`` model loader."""
    return [SklearnModel]
