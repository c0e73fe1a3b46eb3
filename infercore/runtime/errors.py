"""Errors of run-time model management (loads, unloads, stage changes, approvals)."""

from __future__ import annotations

from infercore.errors import InfercoreError, ModelNotReady


class Conflict(InfercoreError):
    """The request is valid but the model's current state does not allow it; nothing changed."""

    status_code = 409
    reason = "conflict"


class LoadFailed(InfercoreError):
    """A version did not load (bad digest, corrupt file, warm-up error); nothing changed."""

    status_code = 422
    reason = "model_load_failed"


class VersionNotReady(ModelNotReady):
    """503 ``model_not_ready`` for one version the config or the repository knows.

    ``version`` names it whether the URL asked for it or the router chose it (a header such as
    ``X-Infercore-Variant``): the server counts the failure under that version's label, as it
    counts the version's other answers. Only a known version gets here, so a header value
    never becomes a label (cardinality).
    """

    def __init__(self, message: str, *, version: str = "", hint: str | None = None) -> None:
        # ``version`` has a default so that copy.copy (which rebuilds from ``args``) works.
        super().__init__(message, hint=hint)
        self.version = version
