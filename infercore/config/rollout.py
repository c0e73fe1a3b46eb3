"""Config of rollouts: version stages, the canary guard, approvals, repository folders, admin.

These Structs are part of the closed schema (:mod:`infercore.config.schema` imports them):
``models.<m>.versions.<v>.stage``/``weight``, ``models.<m>.rollout``, ``models.<m>.repository``
and the top-level ``admin`` section.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

Node = dict[str, Any]

#: The stages a version moves through, in order (``retired`` is off to the side).
Stage = Literal["candidate", "shadow", "canary", "primary", "retired"]
#: Stages a recipe may give a non-primary version at start.
InitialStage = Literal["candidate", "shadow", "canary", "retired"]
#: Stages whose entry a recipe may gate behind a person's approval.
GatedStage = Literal["shadow", "canary", "primary"]

Percent = Annotated[float, msgspec.Meta(ge=0, le=100)]
Positive = Annotated[float, msgspec.Meta(gt=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]


class GuardConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Drops a canary's weight to 0 when it does worse than the primary over a window.

    Attributes:
        window_s: The sliding window the rates and p99s are computed over.
        min_requests: Canary requests needed in the window before the guard judges it.
        max_error_rate_delta: Trip when the canary's error rate (5xx, timeouts) exceeds the
            primary's by more than this (0.05 = five percentage points). Only what the version
            answers for counts: not a 4xx, not a 503 for a request it never ran (queue_full,
            queue_timeout, shutting_down, feature_store_unavailable), not a client that went
            away, and not a timeout against a deadline the client shortened unless the version
            had already taken longer than the latency bound below.
        max_p99_ratio: Trip when the canary's p99 latency exceeds the primary's times this,
            plus ``p99_slack_ms`` (judged once the primary has ``min_requests`` too).
        p99_slack_ms: Added to the bound so that sub-millisecond noise never trips it.
        check_interval_s: How often (at most) the guard is evaluated on the request path; a
            canary's failure is judged at once (at most every 50 ms) when the canary's own
            error rate over ``min_requests`` or more requests is already past the bound.
    """

    window_s: Positive = 60.0
    min_requests: Annotated[int, msgspec.Meta(ge=1)] = 50
    max_error_rate_delta: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.05
    max_p99_ratio: Annotated[float, msgspec.Meta(ge=1)] = 2.0
    p99_slack_ms: NonNegative = 5.0
    check_interval_s: NonNegative = 1.0


class RolloutConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """How versions of a model may move between stages.

    Attributes:
        approvals: Stages whose entry needs a person's approval (``[canary, primary]``): the
            promotion call creates a pending approval instead of acting. A move that passes a
            gated stage (``shadow`` straight to ``primary`` when ``canary`` is gated) needs one too.
            With ``primary`` gated, no weights may leave the primary 0 % of the traffic.
        distinct_approver: The person approving must not be the one who asked.
        guard: The canary guard; ``null`` turns it off.
    """

    approvals: list[GatedStage] = msgspec.field(default_factory=list)
    distinct_approver: bool = False
    guard: GuardConfig | None = msgspec.field(default_factory=GuardConfig)


class RepositoryConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Versions the admin API may load that the recipe does not list: one folder per version.

    ``POST /v2/repository/models/{m}/load`` with version ``3`` loads
    ``<model_root>/<folder>/<version_folder with {version}=3>/<loader.path>``. The folder must
    be a real folder inside the model root (a symlink out of it is refused), and the artifact's
    digest must be pinned in ``manifest`` (``sha256sum`` format, paths relative to ``folder``);
    it is checked before the loader reads a byte.

    Attributes:
        folder: The repository folder, relative to the model root.
        version_folder: Each version's folder inside it; ``{version}`` is the version name.
        loader: The loader node; its ``path`` is relative to the version folder.
        manifest: The digest file inside ``folder``.
        warmup: Warm a loaded version up before it takes traffic.
    """

    folder: Annotated[str, msgspec.Meta(min_length=1)]
    loader: Node
    version_folder: Annotated[str, msgspec.Meta(min_length=1)] = "{version}"
    manifest: Annotated[str, msgspec.Meta(min_length=1)] = "SHA256SUMS"
    warmup: bool = True


class AdminConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """The admin listener (repository extension, rollouts, approvals): off by default.

    Attributes:
        enabled: Start the admin listener beside the inference listener.
        host: Its address; loopback by default.
        port: Its TCP port.
        uds: Listen on this Unix socket (created owner-only) instead of ``host:port``.
        auth_env: The environment variable holding the shared bearer token.
        auth_file: Read the shared token from this file instead.
        tokens_file: Named tokens instead of the shared one: a file of ``name:token`` or
            ``name:sha256:<64 hex>`` lines, the latter the token's SHA-256 digest, so that the
            file holds no token (``infercore models token NAME`` prints a new token and its
            line; ``#`` starts a comment line; names of 1-64 letters, digits, ``.``, ``_``,
            ``-``, ``@``; plain tokens of at least 16 printable ASCII characters, no spaces;
            no name and no token twice, in either form), not readable or writable by other
            users (mode 0600 or 0640).
            Each call's token names who decides: a decision's ``by`` defaults to the token's
            name and may not name anyone else (403), so ``rollout.distinct_approver`` holds
            between people, not between names typed. It replaces the shared token
            (``auth_env``'s variable is then not accepted; ``auth_file`` with it is a config
            error). Read at start-up; a restart picks up a changed file.
        audit_log: Append every decision here as JSON lines; unset keeps them in memory only.
            Opened at start-up; only the file's own folder is created, inside an existing one.
            The latest records are read back at start-up (``GET /admin/audit``).
        state_file: Save the rollout state here after every change (stages, weights, the
            versions loaded at run time, pending approvals, the canary guard's trips, the drift
            actions' cooldown) and restore it at start-up; unset (the default): a restart
            serves the recipe's rollout again. Restored all or nothing: a state that cannot be
            applied in full (a version's folder gone, a digest that no longer matches, a recipe
            whose versions, stages or primary changed) is an ERROR, and the recipe is served.
            Locked while a server runs (one server per file); needs ``server.workers=1``.
        max_body_bytes: Largest admin request body.
    """

    enabled: bool = False
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8081
    uds: str | None = None
    auth_env: Annotated[str, msgspec.Meta(min_length=1)] = "INFERCORE_ADMIN_TOKEN"
    auth_file: str | None = None
    tokens_file: str | None = None
    audit_log: str | None = None
    state_file: str | None = None
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 64 * 1024

    def __post_init__(self) -> None:
        # `admin.audit_log=` / `admin.state_file=` on the command line give '': unset, for
        # every reader (cli, workers, lifecycle), not the working folder.
        for key in ("audit_log", "state_file", "tokens_file"):
            if getattr(self, key) == "":
                msgspec.structs.force_setattr(self, key, None)
