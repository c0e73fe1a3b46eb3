"""infercore-feast: model inputs from Feast's online store (``features: {kind: feast, ...}``).

Importing this module is cheap on purpose: ``feast`` takes seconds to import and is imported
when a feature source starts, so ``infercore plugins`` and config validation never pay for it.
Feast is used as an in-process client only; its servers are never started.
"""

from __future__ import annotations

from infercore.components import FeatureSource
from infercore.hookspecs import hookimpl
from infercore_feast.config import EntitySpec, FeastSourceConfig, InputSpec
from infercore_feast.source import FeastFeatureSource

__all__ = [
    "EntitySpec",
    "FeastFeatureSource",
    "FeastSourceConfig",
    "InputSpec",
    "register_feature_sources",
]


@hookimpl
def register_feature_sources() -> list[type[FeatureSource]]:
    """The ``feast`` feature source."""
    return [FeastFeatureSource]
