"""The drift detector and action interfaces, driven by :class:`infercore.drift.DriftMonitor`."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from infercore.components.base import Component
from infercore.components.model import Tensors
from infercore.errors import InfercoreError


@dataclass(frozen=True, slots=True)
class DriftResult:
    """The outcome of one detector run over a window of samples.

    Attributes:
        detector: The detector's config name.
        drift: Whether drift was detected.
        scores: Per-feature test statistic.
        p_values: Per-feature p-value, where the test has one.
        feature_drift: Per-feature drift flag, where the test decides per feature (after any
            multiple-testing correction).
        info: Detector-specific details that are plain JSON values (the corrected threshold,
            the correction used …); shown in the event history.
    """

    detector: str
    drift: bool
    scores: dict[str, float] = field(default_factory=dict)
    p_values: dict[str, float] = field(default_factory=dict)
    feature_drift: dict[str, bool] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


class DriftDetector(Component):
    """Compares a window of live model inputs with a reference sample.

    :meth:`detect` runs off the event loop (in the drift monitor's worker thread), never on
    the request path; it may block. The monitor hands it one window as *columns*: one 1-D
    array per feature column, all of the same length, numbers as ``float64`` and categories
    as ``object`` arrays of ``str`` (see :mod:`infercore.drift.columns` for how tensors become
    columns). An exception it raises is counted and logged by the monitor and affects
    nothing else.

    A detector that keeps the columns it tests in a ``features`` list (set by the end of
    :meth:`start`) has them checked against the model's monitored columns when the server
    starts: a name the model lacks is a config error then, not a failure every window. The
    error names the option ``features`` (or the one the detector's ``features_option`` names,
    where its columns come from another option).
    """

    @abc.abstractmethod
    def detect(self, window: Tensors) -> DriftResult:
        """Test one window of samples (rows along axis 0) against the reference."""


@runtime_checkable
class ModelRollout(Protocol):
    """One model's rollout, as a drift action may drive it (the server's lifecycle).

    Every call goes through the same code path as the admin API (atomic loads, stage rules,
    the approval gate, the audit log, with ``by`` as the actor). There is deliberately no way
    to approve a pending step here: moving a version into real traffic stays a person's
    decision when the recipe gates it (``models.<m>.rollout.approvals``).
    """

    @property
    def model(self) -> str:
        """The model's name."""

    @property
    def repository_path(self) -> str | None:
        """The config path of the model's repository folder (``models.<m>.repository``),
        or ``None`` when the recipe configures none."""

    def repository_versions(self) -> list[str]:
        """Version names with a folder in the repository (pinned or not); ``[]`` without one."""

    def versions(self) -> dict[str, dict[str, Any]]:
        """Versions the server knows (recipe and loaded ones): name -> stage, state, ready …"""

    async def load(self, version: str, *, by: str, reason: str = "") -> dict[str, Any]:
        """Load a version (a new one starts as a ``candidate``); raises
        :class:`~infercore.errors.InfercoreError` when refused or failed (nothing changes)."""

    async def promote(
        self, version: str, to: str, *, by: str, reason: str = "", weight: float | None = None
    ) -> dict[str, Any]:
        """Move a version to stage ``to``; ``{"status": "pending", ...}`` when the move needs
        a person's approval, ``{"status": "applied", ...}`` otherwise."""


@dataclass(frozen=True, slots=True)
class DriftEvent:
    """What an action receives when a detector reports drift.

    Attributes:
        model: The model name.
        version: Its primary version when the event was made.
        result: The detector's result.
        extra: ``id``, ``time``, ``window``, ``samples``.
        actions: With ``action_order: sequential``, what the actions before this one did for
            this event: action name -> ``{status, details, error}`` (empty otherwise).
        rollout: The model's rollout control when the monitor runs inside a server (``None``
            in a bare monitor); an action loads or moves versions through it.
    """

    model: str
    version: str
    result: DriftResult
    extra: dict[str, Any] = field(default_factory=dict)
    actions: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    rollout: ModelRollout | None = field(default=None, compare=False, repr=False)


class ActionFailed(InfercoreError):
    """An action that ran and failed; ``details`` (plain JSON values) go to the event history.

    Args:
        message: What failed (no secrets, no absolute paths).
        details: E.g. ``{"exit_code": 3, "output_tail": "..."}`` for a command.
    """

    reason = "action_failed"

    def __init__(
        self, message: str, *, details: dict[str, Any] | None = None, hint: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.details = dict(details or {})


class Action(Component):
    """Something done when drift is detected: a log line, a webhook, a retraining command.

    The drift monitor runs :meth:`run` on the event loop as its own task, never two runs of
    the same action at once, and not again within the monitor's cooldown.
    """

    #: The model's rollout control, set by :meth:`bind_rollout` inside a server.
    rollout: ModelRollout | None = None

    def bind_rollout(self, rollout: ModelRollout) -> None:
        """Called once by the server, before :meth:`start`, with the model's rollout control.

        The default keeps it in :attr:`rollout`. An action that needs something of the model
        (a repository folder …) checks it here and raises
        :class:`~infercore.errors.ConfigError` naming the config path, so the server does not
        start with an action that can never work.
        """
        self.rollout = rollout

    @abc.abstractmethod
    async def run(self, event: DriftEvent) -> dict[str, Any] | None:
        """Carry out the action; raise on failure (:class:`ActionFailed` to attach details).

        Returns:
            Optional details (plain JSON values) recorded in the event history, e.g. the
            HTTP status of a webhook or the exit code of a command.
        """
