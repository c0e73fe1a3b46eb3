"""The abstract interfaces every plugin component implements."""

from infercore.components.base import Component, ComponentContext, EmptyConfig
from infercore.components.batching import (
    Batcher,
    BatchObserver,
    NullObserver,
    submission_requests,
)
from infercore.components.drift import (
    Action,
    DriftDetector,
    DriftEvent,
    DriftResult,
    ModelRollout,
)
from infercore.components.features import FeatureSource
from infercore.components.model import Array, Model, Tensors
from infercore.components.routing import (
    Router,
    RouteRequest,
    RoutingTable,
    ShadowPolicy,
    WrappingRouter,
)
from infercore.components.tensors import V2_TO_NUMPY, TensorSpec, v2_datatype

__all__ = [
    "V2_TO_NUMPY",
    "Action",
    "Array",
    "BatchObserver",
    "Batcher",
    "Component",
    "ComponentContext",
    "DriftDetector",
    "DriftEvent",
    "DriftResult",
    "EmptyConfig",
    "FeatureSource",
    "Model",
    "ModelRollout",
    "NullObserver",
    "RouteRequest",
    "Router",
    "RoutingTable",
    "ShadowPolicy",
    "TensorSpec",
    "Tensors",
    "WrappingRouter",
    "submission_requests",
    "v2_datatype",
]
