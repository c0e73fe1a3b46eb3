"""``register_candidate``: a retrained repository version joins the rollout, never further
than shadow; and the monitor's sequential action order that feeds it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from infercore.builtins.candidate import RegisterCandidateAction
from infercore.components import ComponentContext, DriftDetector, DriftEvent, DriftResult, Tensors
from infercore.components.drift import Action, ActionFailed, ModelRollout
from infercore.drift import DriftMonitor
from infercore.errors import ConfigError, InvalidInput
from infercore.hookspecs import hookimpl
from infercore.plugin_manager import make_plugin_manager
from infercore.registry import Registry


class FakeRollout:
    """An in-memory model rollout: versions with stages, a repository, an approval gate."""

    def __init__(
        self,
        repository: list[str] | None,
        known: dict[str, str] | None = None,
        *,
        pinned: set[str] | None = None,
        gated: tuple[str, ...] = ("canary", "primary"),
    ) -> None:
        self._repo = repository
        self.stages = dict(known or {"1": "primary"})
        self.pinned = set(repository or []) if pinned is None else pinned
        self.gated = gated
        self.calls: list[tuple[str, ...]] = []

    @property
    def model(self) -> str:
        return "fraud"

    @property
    def repository_path(self) -> str | None:
        return None if self._repo is None else "models.fraud.repository"

    def repository_versions(self) -> list[str]:
        return list(self._repo or [])

    def versions(self) -> dict[str, dict[str, Any]]:
        return {v: {"version": v, "stage": s} for v, s in self.stages.items()}

    async def load(self, version: str, *, by: str, reason: str = "") -> dict[str, Any]:
        self.calls.append(("load", version, by))
        if version not in self.pinned:
            raise InvalidInput(f"model 'fraud' version {version!r}: no digest pinned")
        self.stages.setdefault(version, "candidate")
        return {"status": "loaded", "version": {"version": version, "stage": "candidate"}}

    async def promote(
        self, version: str, to: str, *, by: str, reason: str = "", weight: float | None = None
    ) -> dict[str, Any]:
        self.calls.append(("promote", version, to, by))
        if to in self.gated:
            return {"status": "pending", "approval": {"id": "ab12cd34"}}
        self.stages[version] = to
        return {"status": "applied"}


def test_the_fake_is_a_model_rollout() -> None:
    assert isinstance(FakeRollout([]), ModelRollout)


@pytest.fixture(scope="module")
def registry() -> Registry:
    pm, _ = make_plugin_manager()
    return Registry(pm)


def build(registry: Registry, rollout: FakeRollout | None = None, **options: Any) -> Any:
    action = registry.build(
        "action",
        {"kind": "register_candidate", **options},
        ComponentContext("models.fraud.drift.actions[1]", Path("."), model_name="fraud"),
    )
    assert isinstance(action, RegisterCandidateAction)
    if rollout is not None:
        action.bind_rollout(rollout)
    return action


def event(
    rollout: FakeRollout | None, actions: dict[str, dict[str, Any]] | None = None
) -> DriftEvent:
    result = DriftResult("numeric_ks", True, feature_drift={"amount": True})
    return DriftEvent("fraud", "1", result, extra={"id": 4}, actions=actions or {}, rollout=rollout)


def test_registered_as_a_builtin_action(registry: Registry) -> None:
    kind = registry.kinds("action")["register_candidate"]
    assert kind.cls is RegisterCandidateAction and kind.plugin == "builtins.actions"


def test_the_newest_new_version_becomes_a_candidate(registry: Registry) -> None:
    rollout = FakeRollout(["1", "2", "3", "10"], {"1": "primary", "2": "shadow"})
    action = build(registry, rollout)
    details = asyncio.run(action.run(event(rollout)))
    assert details == {"version": "10", "stage": "candidate"}
    assert rollout.calls == [("load", "10", "drift:numeric_ks")]
    assert rollout.stages["10"] == "candidate"


def test_shadow_true_moves_it_to_shadow_and_no_further(registry: Registry) -> None:
    rollout = FakeRollout(["1", "2"])
    details = asyncio.run(build(registry, rollout, shadow=True).run(event(rollout)))
    assert details == {"version": "2", "stage": "shadow", "shadow": "applied"}
    assert rollout.stages == {"1": "primary", "2": "shadow"}
    assert [c[0] for c in rollout.calls] == ["load", "promote"]
    assert rollout.calls[1] == ("promote", "2", "shadow", "drift:numeric_ks")


def test_a_gated_shadow_stays_a_pending_approval(registry: Registry) -> None:
    rollout = FakeRollout(["1", "2"], gated=("shadow", "canary", "primary"))
    details = asyncio.run(build(registry, rollout, shadow=True).run(event(rollout)))
    assert details["stage"] == "candidate" and details["shadow"] == "pending"
    assert details["approval"] == "ab12cd34"
    assert rollout.stages["2"] == "candidate"


def test_it_never_moves_a_version_past_shadow(registry: Registry) -> None:
    for shadow in (False, True):
        rollout = FakeRollout(["1", "2"])
        asyncio.run(build(registry, rollout, shadow=shadow).run(event(rollout)))
        targets = {c[2] for c in rollout.calls if c[0] == "promote"}
        assert targets <= {"shadow"}
        assert rollout.stages["1"] == "primary"
    # the rollout control it gets offers no approval at all
    assert not hasattr(ModelRollout, "approve")


def test_no_new_version_is_a_recorded_failure_and_changes_nothing(registry: Registry) -> None:
    rollout = FakeRollout(["1", "2"], {"1": "primary", "2": "shadow"})
    with pytest.raises(ActionFailed, match="no new version") as info:
        asyncio.run(build(registry, rollout).run(event(rollout)))
    assert info.value.details == {"known_versions": ["1", "2"]}
    assert rollout.calls == [] and rollout.stages == {"1": "primary", "2": "shadow"}


def test_an_unpinned_digest_is_refused(registry: Registry) -> None:
    rollout = FakeRollout(["1", "2", "3"], {"1": "primary", "2": "shadow"}, pinned={"1", "2"})
    with pytest.raises(ActionFailed, match=r"version '3' was not registered: .*no digest") as info:
        asyncio.run(build(registry, rollout, shadow=True).run(event(rollout)))
    assert info.value.details == {"version": "3", "error_reason": "invalid_input"}
    assert rollout.stages == {"1": "primary", "2": "shadow"}
    assert [c[0] for c in rollout.calls] == ["load"]  # no stage move after a refused load


def test_after_a_failed_command_nothing_is_loaded(registry: Registry) -> None:
    rollout = FakeRollout(["1", "2"])
    action = build(registry, rollout, after="command")
    failed = {"command": {"status": "error", "error": "command 'python' exited with 1"}}
    with pytest.raises(ActionFailed, match="did not succeed"):
        asyncio.run(action.run(event(rollout, failed)))
    with pytest.raises(ActionFailed, match="did not run before"):
        asyncio.run(action.run(event(rollout, {})))
    assert rollout.calls == []
    ok = {"command": {"status": "ok", "details": {"exit_code": 0}}}
    assert asyncio.run(action.run(event(rollout, ok)))["version"] == "2"


def test_version_from_the_commands_output(registry: Registry) -> None:
    rollout = FakeRollout(["1", "2", "7"])
    action = build(registry, rollout, after="command", version="output")
    done = {
        "command": {"status": "ok", "details": {"output_tail": "...\nINFERCORE_NEW_VERSION=2\n"}}
    }
    assert asyncio.run(action.run(event(rollout, done)))["version"] == "2"  # not the newest
    silent = {"command": {"status": "ok", "details": {"output_tail": "trained\n"}}}
    with pytest.raises(ActionFailed, match="printed no INFERCORE_NEW_VERSION"):
        asyncio.run(action.run(event(rollout, silent)))
    with pytest.raises(ActionFailed, match="already known"):
        asyncio.run(action.run(event(rollout, done)))


def test_config_errors(registry: Registry) -> None:
    with pytest.raises(ConfigError, match=r"actions\[1\]\.version: 'output'"):
        build(registry, version="output")
    with pytest.raises(ConfigError, match=r"models\.fraud\.repository is not set"):
        build(registry, FakeRollout(None))
    with pytest.raises(ConfigError, match=r"shadw"):
        build(registry, shadw=True)
    bare = build(registry)  # a bare monitor (no server) cannot start it
    with pytest.raises(ConfigError, match="runs inside a server"):
        asyncio.run(bare.start())


# --- the monitor's sequential action order --------------------------------------------------


class Always(DriftDetector):
    kind = "always"

    def detect(self, window: Tensors) -> DriftResult:
        return DriftResult("always", True, feature_drift={"x": True})


class Recorder(Action):
    """Records the order it ran in and what it saw of the actions before it."""

    kind = "recorder"
    log: list[tuple[str, dict[str, Any], bool]] = []

    async def run(self, event: DriftEvent) -> dict[str, Any] | None:
        name = self.context.path
        await asyncio.sleep(0.05 if name.endswith("[0]") else 0)
        self.log.append(
            (name, {k: dict(v) for k, v in event.actions.items()}, event.rollout is None)
        )
        if name.endswith("[0]"):
            raise ActionFailed("first failed", details={"exit_code": 3})
        return {"ran": name}


class _Plugin:
    @hookimpl
    def register_drift_detectors(self) -> list[type[DriftDetector]]:
        return [Always]

    @hookimpl
    def register_actions(self) -> list[type[Action]]:
        return [Recorder]


def _monitor(order: str) -> DriftMonitor:
    pm, _ = make_plugin_manager([("seq", _Plugin())])
    return DriftMonitor.build(
        Registry(pm),
        {
            "window_size": 4,
            "cooldown_s": 0,
            "action_order": order,
            "detectors": {"always": {"kind": "always"}},
            "actions": [{"kind": "recorder"}, {"kind": "recorder"}],
        },
        model="m",
        model_root=Path("."),
    )


def test_sequential_actions_run_in_order_and_see_earlier_results() -> None:
    Recorder.log = []
    monitor = _monitor("sequential")
    rollout = FakeRollout(["1"])
    monitor.bind_rollout(rollout)

    async def main() -> list[dict[str, Any]]:
        await monitor.start()
        try:
            monitor.offer({"x": np.zeros((4, 1), np.float32)})
            await monitor.flush()
            assert monitor.events()[-1]["actions"]["recorder#2"]["status"] == "pending"
            # a second event while the sequence runs: every action skipped as busy
            monitor.offer({"x": np.zeros((4, 1), np.float32)})
            await monitor.flush()
            await monitor.wait_actions(5)
            return monitor.events()
        finally:
            await monitor.stop()

    events = asyncio.run(main())
    first, second = Recorder.log
    assert first[0].endswith("[0]") and first[1] == {}
    assert second[0].endswith("[1]")
    assert second[1]["recorder"]["status"] == "error"
    assert second[1]["recorder"]["details"] == {"exit_code": 3}
    assert first[2] is False and second[2] is False  # the event carried the rollout
    assert events[0]["actions"]["recorder"]["status"] == "error"
    assert events[0]["actions"]["recorder#2"]["status"] == "ok"
    assert {a["reason"] for a in events[1]["actions"].values()} == {"busy"}


def test_concurrent_actions_start_together_and_see_nothing() -> None:
    Recorder.log = []
    monitor = _monitor("concurrent")

    async def main() -> None:
        await monitor.start()
        try:
            monitor.offer({"x": np.zeros((4, 1), np.float32)})
            await monitor.flush()
            await monitor.wait_actions(5)
        finally:
            await monitor.stop()

    asyncio.run(main())
    # the second started without waiting for the slow first one
    assert [name[-3:] for name, _, _ in Recorder.log] == ["[1]", "[0]"]
    assert all(seen == {} and bare for _, seen, bare in Recorder.log)
