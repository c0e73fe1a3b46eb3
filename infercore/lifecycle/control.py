"""One model's rollout as drift actions see it (:class:`~infercore.components.ModelRollout`).

A thin view over :class:`~infercore.lifecycle.Lifecycle`: loads and stage moves take the same
path as the admin API (validated, atomic, audited with the caller's ``by`` as the actor, gated
by the recipe's approvals). It offers no way to approve or reject a pending step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from infercore.lifecycle.manager import Lifecycle


def _version_key(v: str) -> tuple[int, int | str]:
    return (0, int(v)) if v.isdigit() else (1, v)


class LifecycleRollout:
    """The :class:`~infercore.components.ModelRollout` of ``model`` over ``lifecycle``."""

    def __init__(self, lifecycle: Lifecycle, model: str) -> None:
        self._lifecycle = lifecycle
        self._model = model

    @property
    def model(self) -> str:
        return self._model

    @property
    def repository_path(self) -> str | None:
        served = self._lifecycle.runtime.model(self._model)
        return None if served.repository is None else f"models.{self._model}.repository"

    def repository_versions(self) -> list[str]:
        repo = self._lifecycle.runtime.model(self._model).repository
        return [] if repo is None else sorted(repo.versions(), key=_version_key)

    def versions(self) -> dict[str, dict[str, Any]]:
        served = self._lifecycle.runtime.model(self._model)
        return {v: sv.describe() for v, sv in served.versions.items()}

    async def load(self, version: str, *, by: str, reason: str = "") -> dict[str, Any]:
        return await self._lifecycle.load(self._model, version, by=by, reason=reason)

    async def promote(
        self, version: str, to: str, *, by: str, reason: str = "", weight: float | None = None
    ) -> dict[str, Any]:
        return await self._lifecycle.promote(
            self._model, version, to, weight=weight, by=by, reason=reason
        )
