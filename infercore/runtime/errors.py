"""Errors of run-time model management (loads, unloads, stage changes, approvals)."""

from __future__ import annotations

from infercore.errors import InfercoreError


class Conflict(InfercoreError):
    """The request is valid but the model's current state does not allow it; nothing changed."""

    status_code = 409
    reason = "conflict"


class LoadFailed(InfercoreError):
    """A version did not load (bad digest, corrupt file, warm-up error); nothing changed."""

    status_code = 422
    reason = "model_load_failed"
