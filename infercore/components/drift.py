"""The drift detector and action interfaces (the drift monitor that drives them is to come)."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

from infercore.components.base import Component
from infercore.components.model import Tensors


@dataclass(frozen=True, slots=True)
class DriftResult:
    """The outcome of one detector run over a window of samples.

    Attributes:
        detector: The detector's config name.
        drift: Whether drift was detected.
        scores: Per-feature test statistic.
        p_values: Per-feature p-value, where the test has one.
    """

    detector: str
    drift: bool
    scores: dict[str, float] = field(default_factory=dict)
    p_values: dict[str, float] = field(default_factory=dict)


class DriftDetector(Component):
    """Compares a window of live model inputs with a reference sample.

    :meth:`detect` runs off the event loop (in a worker thread), never on the request path.
    """

    @abc.abstractmethod
    def detect(self, window: Tensors) -> DriftResult:
        """Test one window of samples (rows along axis 0) against the reference."""


@dataclass(frozen=True, slots=True)
class DriftEvent:
    """What an action receives when a detector reports drift."""

    model: str
    version: str
    result: DriftResult
    extra: dict[str, Any] = field(default_factory=dict)


class Action(Component):
    """Something done when drift is detected: a log line, a webhook, a retraining command."""

    @abc.abstractmethod
    async def run(self, event: DriftEvent) -> None:
        """Carry out the action; raise on failure."""
