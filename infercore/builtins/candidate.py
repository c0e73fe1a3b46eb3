"""Built-in drift action ``register_candidate``: a retrained version joins the rollout.

After a retraining run has written a new version folder into the model's repository folder
(``models.<m>.repository``) and pinned its digest in the folder's manifest, this action loads
it through the lifecycle, exactly as ``infercore models load <m> <v>`` would: atomically (the
versions serving keep serving whatever happens), digest-checked, audit-logged with the actor
``drift:<detector>``. A new version starts as a ``candidate``; with ``shadow: true`` it then
moves to ``shadow`` (copies of the primary's traffic, nobody sees its answers). It never moves
a version further: a canary or a new primary goes through the recipe's approval gate, and
this action has no way to approve anything (:class:`~infercore.components.ModelRollout`).

Run it after the retraining ``command`` in one list with ``action_order: sequential``::

    drift:
      action_order: sequential
      actions:
        - {kind: command, argv: ["{python}", "fraud/retrain.py", "{event_file}"]}
        - {kind: register_candidate, after: command, shadow: true}

Which version: ``version: newest`` takes the highest version in the repository folder that
the server does not know yet; ``version: output`` takes the version the ``after`` action
printed on a line ``INFERCORE_NEW_VERSION=<v>``.

``after`` is checked when the app is built, where the drift monitor tells its actions about
their list (``ComponentContext.extra``: ``drift_actions``, the names of the list's actions in
order; ``drift_action_index``, this action's position; ``drift_action_order``): it must name an
action earlier in the list, and the list must run ``sequential``. Built without them (a host
that does not pass them), the same mistakes fail when drift fires, on the event.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import msgspec

from infercore.components import Action, ComponentContext, ModelRollout
from infercore.components.drift import ActionFailed, DriftEvent
from infercore.config.schema import VERSION_RE
from infercore.errors import ConfigError, InfercoreError

#: The line a retraining command prints to name the version it wrote.
VERSION_LINE = re.compile(r"^INFERCORE_NEW_VERSION=(\S+)\s*$", re.MULTILINE)
_MAX_ACTOR = 64


def _version_key(v: str) -> tuple[int, int | str]:
    return (0, int(v)) if v.isdigit() else (1, v)


class RegisterCandidateConfig(
    msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True
):
    #: ``newest``: the highest repository version the server does not know yet; ``output``:
    #: the version the ``after`` action printed (``INFERCORE_NEW_VERSION=<v>``).
    version: Literal["newest", "output"] = "newest"
    #: Name of an earlier action of the same list (``command``) that must have succeeded for
    #: this event; without it nothing is loaded. Needs ``action_order: sequential``.
    after: str | None = None
    #: Move the loaded candidate to ``shadow`` (copies of the primary's traffic).
    shadow: bool = False
    #: Seconds the load (digest check, warm-up) and the stage move may take together.
    timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 300.0


class RegisterCandidateAction(Action):
    """Loads a retrained version from the repository folder as a candidate (or shadow)."""

    kind = "register_candidate"
    Config = RegisterCandidateConfig
    config: RegisterCandidateConfig

    def __init__(self, config: RegisterCandidateConfig, context: ComponentContext) -> None:
        super().__init__(config, context)
        if config.version == "output" and config.after is None:
            raise ConfigError(
                f"{context.path}.version: 'output' reads the version from the `after` "
                "action's output; `after` is not set",
                hint="set after: command (the retraining action), or version: newest",
            )
        if config.after is not None:
            _check_after(config.after, context)

    def bind_rollout(self, rollout: ModelRollout) -> None:
        if rollout.repository_path is None:
            raise ConfigError(
                f"{self.context.path}: register_candidate loads versions from the model's "
                f"repository folder, but models.{rollout.model}.repository is not set",
                hint="add models.<m>.repository {folder, version_folder, loader, manifest}, "
                "or remove this action",
            )
        super().bind_rollout(rollout)

    async def start(self) -> None:
        if self.rollout is None:
            raise ConfigError(
                f"{self.context.path}: register_candidate needs the model's lifecycle; it "
                "runs inside a server (infercore serve), not in a bare drift monitor"
            )

    def _pick(self, event: DriftEvent, rollout: ModelRollout) -> str:
        cfg = self.config
        known = rollout.versions()
        if cfg.version == "output":
            assert cfg.after is not None
            tail = str(event.actions.get(cfg.after, {}).get("details", {}).get("output_tail", ""))
            found = VERSION_LINE.findall(tail)
            if not found:
                raise ActionFailed(
                    f"action {cfg.after!r} printed no INFERCORE_NEW_VERSION=<version> line; "
                    "nothing loaded"
                )
            version = str(found[-1])
            if not VERSION_RE.fullmatch(version):
                raise ActionFailed(
                    f"action {cfg.after!r} named an invalid version {version[:40]!r}"
                )
            if version in known:
                raise ActionFailed(
                    f"version {version!r} is already known to the server "
                    f"({known[version].get('stage')}); nothing loaded"
                )
            return version
        new = [v for v in rollout.repository_versions() if v not in known]
        if not new:
            raise ActionFailed(
                "no new version in the repository folder; nothing loaded",
                details={"known_versions": sorted(known, key=_version_key)},
            )
        return max(new, key=_version_key)

    async def run(self, event: DriftEvent) -> dict[str, Any] | None:
        rollout = event.rollout or self.rollout
        if rollout is None:
            raise ActionFailed("no rollout control: register_candidate runs inside a server")
        cfg = self.config
        if cfg.after is not None:
            before = event.actions.get(cfg.after)
            if before is None:
                raise ActionFailed(
                    f"action {cfg.after!r} did not run before this one for this event "
                    "(it needs drift.action_order: sequential, with it earlier in the list)"
                )
            if before.get("status") != "ok":
                raise ActionFailed(
                    f"action {cfg.after!r} did not succeed ({before.get('status')}); "
                    "nothing loaded",
                    details={"after_status": before.get("status")},
                )
        version = self._pick(event, rollout)
        actor = f"drift:{event.result.detector}"[:_MAX_ACTOR]
        reason = f"drift event {event.extra.get('id')}: retrained version"
        details: dict[str, Any] = {"version": version}
        try:
            async with asyncio.timeout(cfg.timeout_s):
                loaded = await rollout.load(version, by=actor, reason=reason)
                details["stage"] = loaded.get("version", {}).get("stage")
                if cfg.shadow:
                    moved = await rollout.promote(version, "shadow", by=actor, reason=reason)
                    details["shadow"] = moved.get("status")
                    if moved.get("status") == "applied":
                        details["stage"] = "shadow"
                    elif moved.get("status") == "pending":
                        details["approval"] = moved.get("approval", {}).get("id")
        except TimeoutError:
            raise ActionFailed(
                f"loading version {version!r} took over {cfg.timeout_s:g} s",
                details=details,
            ) from None
        except InfercoreError as exc:
            details["error_reason"] = exc.reason
            raise ActionFailed(
                f"version {version!r} was not registered: {exc.message}",
                details=details,
                hint=exc.hint,
            ) from None
        return details


def _check_after(after: str, context: ComponentContext) -> None:
    """``after`` names an action earlier in the list, and the list runs ``sequential``.

    What the drift monitor passes about the list (``drift_actions``, ``drift_action_index``,
    ``drift_action_order`` in ``context.extra``); without it, nothing to check here (the
    run-time check in :meth:`RegisterCandidateAction.run` remains).

    Raises:
        ConfigError: Naming ``<path>.after``, the value and the fix.
    """
    names, index = context.extra.get("drift_actions"), context.extra.get("drift_action_index")
    order = context.extra.get("drift_action_order")
    if (
        not isinstance(names, Sequence)
        or isinstance(names, str)
        or not isinstance(index, int)
        or not 0 <= index < len(names)
    ):
        return
    names = [str(name) for name in names]
    where = f"{context.path}.after"
    drift = context.path.rpartition(".actions[")[0] or "drift"
    listed = ", ".join(names)
    if after not in names:
        earlier = ", ".join(names[:index]) or "none"
        raise ConfigError(
            f"{where}: {after!r} is not an action of {drift}.actions (they are: {listed})",
            hint=f"set after: to the retraining action, earlier in the list (here: {earlier}); "
            "an action is named by its kind, a second one of a kind kind#2",
        )
    position = names.index(after)
    if position == index:
        raise ConfigError(
            f"{where}: {after!r} is this action itself ({drift}.actions[{index}])",
            hint="name the retraining action earlier in the list, e.g. after: command",
        )
    if position > index:
        raise ConfigError(
            f"{where}: {after!r} ({drift}.actions[{position}]) comes after this action "
            f"({drift}.actions[{index}]); actions run in list order, so it would not have "
            "run yet",
            hint=f"move {names[index]} below {after} in {drift}.actions",
        )
    if order is not None and order != "sequential":
        raise ConfigError(
            f"{where}: {after!r} needs {drift}.action_order: sequential, but it is "
            f"{order!r} (every action of an event starts at once, so {after} would not have "
            "finished when this one looks at it)",
            hint=f"set {drift}.action_order: sequential",
        )
