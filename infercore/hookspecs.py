"""The hooks a plugin can implement.

A plugin is a module (or object) with functions marked ``@hookimpl`` whose names match the
specs below. Every ``register_*`` hook returns a list of component classes; each class declares
``kind`` (the name recipes use) and a nested ``Config`` (a ``msgspec.Struct``). Hooks run once,
when an app is built; nothing on the request path calls them.

Example::

    from infercore import hookimpl
    from infercore.components import Model

    class EchoModel(Model):
        kind = "echo"
        ...

    @hookimpl
    def register_model_loaders():
        return [EchoModel]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from infercore.components import (
        Action,
        Batcher,
        DriftDetector,
        FeatureSource,
        Model,
        Router,
    )

hookspec = pluggy.HookspecMarker("infercore")
hookimpl = pluggy.HookimplMarker("infercore")


@hookspec
def register_model_loaders() -> list[type[Model]]:  # type: ignore[empty-body]
    """Model classes, one per artifact format (``kind: onnx``, ``kind: sklearn`` …)."""


@hookspec
def register_feature_sources() -> list[type[FeatureSource]]:  # type: ignore[empty-body]
    """Feature source classes (``kind: request``, ``kind: feast`` …)."""


@hookspec
def register_batchers() -> list[type[Batcher]]:  # type: ignore[empty-body]
    """Batcher classes (``kind: none``, ``kind: dynamic`` …)."""


@hookspec
def register_routers() -> list[type[Router]]:  # type: ignore[empty-body]
    """Router classes (``kind: single`` …)."""


@hookspec
def register_drift_detectors() -> list[type[DriftDetector]]:  # type: ignore[empty-body]
    """Drift detector classes."""


@hookspec
def register_actions() -> list[type[Action]]:  # type: ignore[empty-body]
    """Action classes run on drift events."""


@hookspec
def register_routes(runtime: Any) -> list[Any]:  # type: ignore[empty-body]
    """Extra Litestar route handlers or controllers to mount on the inference listener.

    Args:
        runtime: The app's :class:`infercore.runtime.Runtime` (models, config, metrics), for
            handlers that need it.
    """
