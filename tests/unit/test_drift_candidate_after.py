"""``register_candidate``'s ``after`` is checked when the app is built, not when drift fires.

QA's case: ``after: command`` with ``action_order: concurrent``, or ``after`` naming an action
that is not in the list, passed ``config validate`` and ``serve`` and failed only on the first
drift event, after the retraining had run. The action checks it at construction from what
the drift monitor tells each action about its list (``ComponentContext.extra``:
``drift_actions``, ``drift_action_index``, ``drift_action_order``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from infercore.builtins.candidate import RegisterCandidateAction
from infercore.components import ComponentContext
from infercore.drift import DriftMonitor
from infercore.errors import ConfigError
from infercore.plugin_manager import make_plugin_manager
from infercore.registry import Registry

DRIFT = "models.fraud.drift"


@pytest.fixture(scope="module")
def registry() -> Registry:
    pm, _ = make_plugin_manager()
    return Registry(pm)


def build(
    registry: Registry,
    names: list[str],
    index: int,
    order: str | None = "sequential",
    **options: Any,
) -> Any:
    extra: dict[str, Any] = {"drift_actions": tuple(names), "drift_action_index": index}
    if order is not None:
        extra["drift_action_order"] = order
    return registry.build(
        "action",
        {"kind": "register_candidate", **options},
        ComponentContext(f"{DRIFT}.actions[{index}]", Path("."), model_name="fraud", extra=extra),
    )


LIST = ["log", "command", "register_candidate"]


def test_after_an_earlier_action_with_sequential_order_is_accepted(registry: Registry) -> None:
    action = build(registry, LIST, 2, after="command", shadow=True)
    assert isinstance(action, RegisterCandidateAction)
    assert isinstance(build(registry, LIST, 2, after="log"), RegisterCandidateAction)
    # A second action of a kind is named kind#2.
    names = ["command", "command#2", "register_candidate"]
    assert isinstance(build(registry, names, 2, after="command#2"), RegisterCandidateAction)


def test_after_with_concurrent_order_names_action_order(registry: Registry) -> None:
    with pytest.raises(ConfigError) as info:
        build(registry, LIST, 2, order="concurrent", after="command")
    assert str(info.value).startswith(
        f"{DRIFT}.actions[2].after: 'command' needs {DRIFT}.action_order: sequential, but it "
        "is 'concurrent'"
    )
    assert info.value.hint == f"set {DRIFT}.action_order: sequential"


def test_after_naming_an_action_not_in_the_list(registry: Registry) -> None:
    with pytest.raises(ConfigError) as info:
        build(registry, LIST, 2, after="retrain")
    assert str(info.value).startswith(
        f"{DRIFT}.actions[2].after: 'retrain' is not an action of {DRIFT}.actions (they are: "
        "log, command, register_candidate)"
    )
    assert "earlier in the list (here: log, command)" in str(info.value.hint)
    # The unknown name is reported before the order (the fix is the name first).
    with pytest.raises(ConfigError, match="'retrain' is not an action"):
        build(registry, LIST, 2, order="concurrent", after="retrain")


def test_after_naming_a_later_action_or_itself(registry: Registry) -> None:
    names = ["log", "register_candidate", "command"]
    with pytest.raises(ConfigError) as info:
        build(registry, names, 1, after="command")
    assert str(info.value).startswith(
        f"{DRIFT}.actions[1].after: 'command' ({DRIFT}.actions[2]) comes after this action "
        f"({DRIFT}.actions[1])"
    )
    assert info.value.hint == f"move register_candidate below command in {DRIFT}.actions"
    with pytest.raises(ConfigError, match=r"'register_candidate' is this action itself"):
        build(registry, LIST, 2, after="register_candidate")


def test_built_without_the_lists_names_it_is_checked_when_it_runs(registry: Registry) -> None:
    """A host that does not pass the list (a bare ComponentContext) builds it as before; the
    run-time check on the event remains (tests/unit/test_drift_candidate.py)."""
    action = registry.build(
        "action",
        {"kind": "register_candidate", "after": "anything"},
        ComponentContext(f"{DRIFT}.actions[0]", Path("."), model_name="fraud"),
    )
    assert isinstance(action, RegisterCandidateAction)


# --- through the drift monitor, as the runtime builds it --------------------------------------


def _monitor(registry: Registry, actions: list[dict[str, Any]], order: str) -> DriftMonitor:
    return DriftMonitor.build(
        registry,
        {"action_order": order, "actions": actions},
        model="fraud",
        model_root=Path("."),
    )


def test_the_monitor_gives_each_action_its_siblings() -> None:
    pm, _ = make_plugin_manager()
    monitor = _monitor(Registry(pm), [{"kind": "log"}], "sequential")
    extra = monitor.actions[0][1].context.extra
    assert extra["drift_actions"] == ("log",)
    assert extra["drift_action_index"] == 0
    assert extra["drift_action_order"] == "sequential"


RETRAIN: list[dict[str, Any]] = [
    {"kind": "log"},
    {"kind": "command", "argv": ["retrain"]},
    {"kind": "register_candidate", "after": "command"},
]


def test_the_monitor_refuses_after_with_concurrent_order(registry: Registry) -> None:
    with pytest.raises(
        ConfigError,
        match=r"actions\[2\]\.after: 'command' needs models\.fraud"
        r"\.drift\.action_order: sequential",
    ):
        _monitor(registry, RETRAIN, "concurrent")


def test_the_monitor_refuses_after_naming_no_action_of_the_list(registry: Registry) -> None:
    actions: list[dict[str, Any]] = [
        {"kind": "log"},
        {"kind": "register_candidate", "after": "command"},
    ]
    with pytest.raises(
        ConfigError,
        match=r"actions\[1\]\.after: 'command' is not an action of "
        r"models\.fraud\.drift\.actions \(they are: log, register_candidate\)",
    ):
        _monitor(registry, actions, "sequential")


def test_the_monitor_builds_a_right_list(registry: Registry) -> None:
    monitor = _monitor(registry, RETRAIN, "sequential")
    assert [name for name, _ in monitor.actions] == ["log", "command", "register_candidate"]
    context = monitor.actions[2][1].context
    assert context.extra["drift_actions"] == ("log", "command", "register_candidate")
    assert context.extra["drift_action_index"] == 2
