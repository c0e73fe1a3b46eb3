"""Errors of run-time model management (loads, unloads, stage changes, approvals), and how
their messages echo the names a client sent."""

from __future__ import annotations

from infercore.errors import InfercoreError, ModelNotReady


class Conflict(InfercoreError):
    """The request is valid but the model's current state does not allow it; nothing changed."""

    status_code = 409
    reason = "conflict"


class SignatureChanged(Conflict):
    """A reload whose artifact takes or gives other tensors than the serving instance's."""


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


#: The longest valid model name (versions are at most 32): a valid name is always echoed whole,
#: and a client cannot make an error body as long as its URL.
ECHO_CHARS = 64


def quoted(name: str) -> str:
    """A model name or version a client sent, as every message that echoes one shows it.

    ``repr`` escapes control characters; past :data:`ECHO_CHARS` the name is cut and marked.
    """
    if len(name) <= ECHO_CHARS:
        return repr(name)
    return f"{name[:ECHO_CHARS]!r}… ({len(name)} characters)"
