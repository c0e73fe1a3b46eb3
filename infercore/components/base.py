"""What every pluggable component has in common."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import msgspec


class EmptyConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The options of a component that takes none."""


@dataclass(frozen=True, slots=True)
class ComponentContext:
    """Where a component sits, handed to its ``__init__`` next to its validated config.

    Attributes:
        path: The config path of the component's node, e.g. ``models.iris.versions.1.loader``;
            use it in error messages.
        model_root: The folder every model artifact path must resolve inside.
        model_name: The model the component serves, when it serves one.
        version: The model version, for a model loader.
        extra: Free-form values a host application passes down.
    """

    path: str
    model_root: Path
    model_name: str | None = None
    version: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Component:
    """Base class of models, feature sources, batchers, routers, drift detectors and actions.

    A subclass declares ``kind`` (the name a recipe uses) and ``Config`` (a ``msgspec.Struct``
    with ``forbid_unknown_fields=True``); infercore validates the recipe's options into
    ``Config`` before calling ``__init__``, so ``__init__`` never sees a typo. ``start`` and
    ``stop`` run on the event loop; blocking work belongs in a thread (``asyncio.to_thread``).
    A failure raises an exception (an :class:`~infercore.errors.InfercoreError` where the user
    can fix it); it never returns ``False``.
    """

    kind: ClassVar[str]
    Config: ClassVar[type[msgspec.Struct]] = EmptyConfig

    def __init__(self, config: Any, context: ComponentContext) -> None:
        self.config = config
        self.context = context

    async def start(self) -> None:
        """Acquire resources (load a model, open a connection). Default: nothing."""

    async def stop(self) -> None:
        """Release resources. Called once, after the HTTP server stopped. Default: nothing."""
