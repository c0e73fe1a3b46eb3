"""Lifecycle rules: which moves need approval, the audit log, refusals that change nothing."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from infercore.config.rollout import GuardConfig
from infercore.errors import ConfigError, InvalidInput
from infercore.lifecycle import ALLOWED, AuditLog, Lifecycle
from infercore.lifecycle.manager import AuditUnavailable, check_actor
from infercore.runtime.errors import Conflict
from infercore.runtime.guard import Window, WindowStats, judge
from infercore.testing import runtime_from_dict


def runtime(approvals: list[str], audit: Path | None = None) -> Any:
    cfg: dict[str, Any] = {
        "batching": {"kind": "none"},
        "models": {
            "m": {
                "primary": "1",
                "versions": {
                    "1": {"loader": {"kind": "fake"}},
                    "2": {"loader": {"kind": "fake", "offset": 1}, "stage": "shadow"},
                },
                "routing": {"kind": "shadow", "inner": {"kind": "weighted"}},
                "rollout": {"approvals": approvals},
            }
        },
    }
    if audit is not None:
        cfg["admin"] = {"audit_log": str(audit)}
    return runtime_from_dict(cfg)


@pytest.mark.parametrize(
    ("approvals", "current", "target", "gates"),
    [
        ([], "candidate", "primary", []),
        (["canary"], "candidate", "shadow", []),
        (["canary"], "candidate", "canary", ["canary"]),
        (["canary"], "shadow", "primary", ["canary"]),  # passing a gated stage
        (["canary"], "canary", "primary", []),
        (["canary", "primary"], "canary", "primary", ["primary"]),
        (["shadow", "canary", "primary"], "retired", "primary", ["shadow", "canary", "primary"]),
        (["canary", "primary"], "canary", "shadow", []),  # moving back needs none
        (["canary", "primary"], "canary", "retired", []),
        (["canary", "primary"], "shadow", "candidate", []),
    ],
)
def test_which_moves_need_an_approval(
    approvals: list[str], current: str, target: str, gates: list[str]
) -> None:
    assert Lifecycle(runtime(approvals)).gates("m", current, target) == gates


def test_the_primary_moves_only_when_replaced() -> None:
    assert ALLOWED["primary"] == frozenset()
    assert all("primary" in moves for stage, moves in ALLOWED.items() if stage != "primary")


def test_actor_must_be_a_short_printable_name() -> None:
    assert check_actor(" ann ") == "ann"
    for bad in (None, "", "   ", "x" * 65, "ann\nbob", 7):
        with pytest.raises(InvalidInput):
            check_actor(bad)


def test_the_audit_log_only_appends(tmp_path: Path) -> None:
    path = tmp_path / "a" / "audit.jsonl"
    log = AuditLog(path, keep=2)
    path.write_text('{"event": "before"}\n')  # someone else's line stays
    for i in range(3):
        log.append({"event": "x", "i": i})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line.get("i") for line in lines] == [None, 0, 1, 2]
    assert all("ts" in line for line in lines[1:])
    assert [r["i"] for r in log.recent()] == [1, 2]  # memory keeps the latest
    assert oct(path.stat().st_mode & 0o777) in (oct(0o640), oct(0o644))
    memory = AuditLog(None)
    memory.append({"event": "y"})
    assert memory.recent()[0]["event"] == "y"


def test_a_decision_that_cannot_be_recorded_is_not_made(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    rt = runtime([], audit)

    async def scenario() -> None:
        await rt.start()
        try:
            audit.write_text("")
            os.chmod(audit, 0o400)
            if os.access(audit, os.W_OK):  # running as root: make the path a folder instead
                os.chmod(audit, 0o600)
                audit.unlink()
                audit.mkdir()
            with pytest.raises(AuditUnavailable):
                await rt.lifecycle.promote("m", "2", "canary", weight=10, by="ann")
            assert rt.models["m"].versions["2"].stage == "shadow"
        finally:
            await rt.stop()

    asyncio.run(scenario())


def snapshot(rt: Any) -> Any:
    served = rt.models["m"]
    return (
        served.primary,
        {v: (sv.stage, sv.weight, sv.state) for v, sv in served.versions.items()},
        {a.id: a.status for a in rt.lifecycle.approvals.values()},
        rt.lifecycle.audit.recent(),
    )


def test_loads_and_unloads_that_cannot_be_recorded_are_not_made(
    tmp_path: Path, make_unwritable: Callable[[Path], None]
) -> None:
    audit = tmp_path / "audit.jsonl"
    rt = runtime([], audit)

    async def scenario() -> None:
        await rt.start()
        try:
            lc = rt.lifecycle
            await lc.load("m", "2", by="ann")  # recorded: the file works
            await lc.promote("m", "2", "canary", weight=10, by="ann")  # something to roll back
            make_unwritable(audit)
            before = snapshot(rt)
            for call in (
                lambda: lc.load("m", "2", by="ann"),
                lambda: lc.unload("m", "2", by="ann"),
                lambda: lc.rollback("m", by="ann"),
            ):
                with pytest.raises(AuditUnavailable, match="nothing changed"):
                    await call()
                assert snapshot(rt) == before
            assert rt.models["m"].versions["2"].ready
        finally:
            await rt.stop()

    asyncio.run(scenario())


def test_a_record_of_a_decision_already_made_is_kept_when_the_file_fails(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, make_unwritable: Callable[[Path], None]
) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    make_unwritable(path)
    with pytest.raises(OSError):
        log.append({"event": "promoted"})
    assert log.recent() == []
    with caplog.at_level("INFO", logger="infercore.audit"):
        log.append({"event": "canary_dropped", "actor": "guard"}, strict=False)
    assert [r["event"] for r in log.recent()] == ["canary_dropped"]
    [record] = caplog.records
    assert record.levelname == "WARNING" and "not written to admin.audit_log" in record.message
    assert "canary_dropped" in record.message


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("file/audit.jsonl", "file' is not a folder"),
        ("missing/deeper/audit.jsonl", "do not exist (only the file's own folder is created)"),
        ("folder", "Is a directory"),
    ],
)
def test_an_audit_log_path_that_cannot_be_written_is_a_config_error(
    tmp_path: Path, where: str, message: str
) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(ConfigError) as info:
        AuditLog(tmp_path / where)
    text = str(info.value)
    assert text.startswith("admin.audit_log: cannot ")
    assert repr(str(tmp_path / where)) in text and message in text
    assert info.value.hint and "admin.audit_log" in info.value.hint
    assert sorted(tmp_path.rglob("*")) == before  # no folder created on the way


def test_the_audit_log_creates_its_own_folder_only(tmp_path: Path) -> None:
    AuditLog(tmp_path / "audit" / "decisions.jsonl")
    assert (tmp_path / "audit" / "decisions.jsonl").is_file()


def test_refusals_name_the_problem() -> None:
    rt = runtime(["canary"])

    async def scenario() -> None:
        await rt.start()
        try:
            lc = rt.lifecycle
            with pytest.raises(Conflict, match="already shadow"):
                await lc.promote("m", "2", "shadow", by="ann")
            with pytest.raises(Conflict, match="is the primary"):
                await lc.promote("m", "1", "retired", by="ann")
            with pytest.raises(InvalidInput, match="only a canary takes a weight"):
                await lc.promote("m", "2", "candidate", weight=5, by="ann")
            with pytest.raises(InvalidInput, match="between 0 and 100"):
                await lc.promote("m", "2", "canary", weight=101, by="ann")
            with pytest.raises(InvalidInput, match="between 0 and 100"):
                await lc.set_weights("m", {"1": float("nan")}, by="ann")
            with pytest.raises(Conflict, match="nothing to roll back"):
                await lc.rollback("m", by="ann")
            r = await lc.promote("m", "2", "canary", weight=40, by="ann")
            assert r["status"] == "pending"
            with pytest.raises(Conflict, match="already pending"):
                await lc.promote("m", "2", "canary", weight=40, by="ann")
            await lc.approve(r["approval"]["id"], by="bob")
            assert rt.models["m"].versions["2"].weight == 40
            # Rollback with no previous primary drops canary traffic.
            await lc.rollback("m", by="ann")
            assert rt.models["m"].versions["2"].weight == 0
            assert rt.models["m"].primary == "1"
        finally:
            await rt.stop()

    asyncio.run(scenario())


def test_the_guard_window_forgets_old_slots() -> None:
    w = Window(10.0)
    for i in range(50):
        w.record(100.0 + i * 0.01, 0.001, error=i % 2 == 0)
    stats = w.stats(100.5)
    assert (stats.requests, stats.errors) == (50, 25)
    assert stats.p99_s == pytest.approx(0.001, rel=0.16)
    assert w.stats(111.0).requests == 0  # the window moved past them
    w.record(200.0, 0.5, error=False)
    assert w.stats(200.0).requests == 1 and w.stats(200.0).p99_s >= 0.5
    w.reset()
    assert w.stats(200.0).requests == 0


def test_the_guard_judges_relative_to_the_primary() -> None:
    cfg = GuardConfig(min_requests=10, max_error_rate_delta=0.05, max_p99_ratio=2.0, p99_slack_ms=5)
    primary = WindowStats(requests=100, errors=10, p99_s=0.010)
    assert judge(cfg, WindowStats(5, 5, 1.0), primary) is None  # too few requests yet
    assert judge(cfg, WindowStats(20, 3, 0.010), primary) is None  # 15 % vs 10 %: within 5 pts
    verdict = judge(cfg, WindowStats(20, 4, 0.010), primary)
    assert verdict is not None and verdict.cause == "error_rate"
    assert judge(cfg, WindowStats(20, 0, 0.024), primary) is None  # under 2 * 10 + 5 ms
    verdict = judge(cfg, WindowStats(20, 0, 0.030), primary)
    assert verdict is not None and verdict.cause == "latency"
    # Latency is judged only once the primary has enough requests to compare with.
    assert judge(cfg, WindowStats(20, 0, 0.030), WindowStats(3, 0, 0.001)) is None
