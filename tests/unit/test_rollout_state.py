"""The rollout state across restarts (``admin.state_file``), through the real runtime and
lifecycle: what is saved, what is restored, all or nothing, the lock, the atomic write; the
audit log read back at start-up; a canary guard trip superseding pending approvals."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from infercore.artifacts import read_verified, resolve_artifact, sha256_file
from infercore.components import DriftDetector, DriftResult, Tensors
from infercore.errors import ConfigError, ModelNotReady, NotFound
from infercore.hookspecs import hookimpl
from infercore.lifecycle import AuditLog
from infercore.lifecycle import state as rollout_state
from infercore.lifecycle.state import StateFile
from infercore.runtime.errors import Conflict, LoadFailed
from infercore.testing import (
    FakeModel,
    FakeModelConfig,
    async_app_client,
    metric_value,
    runtime_from_dict,
)


class PinnedFakeConfig(FakeModelConfig, frozen=True, kw_only=True):
    path: str
    sha256: str | None = None


class PinnedFake(FakeModel):
    """The fake model, read from a file whose digest is checked: a repository version."""

    kind = "pinned-fake"
    Config = PinnedFakeConfig  # type: ignore[assignment]

    async def start(self) -> None:
        cfg = self.config
        assert isinstance(cfg, PinnedFakeConfig)
        path = resolve_artifact(self.context.model_root, cfg.path, config_path=self.context.path)
        read_verified(path, cfg.sha256, config_path=self.context.path)
        await super().start()


class AlwaysDrift(DriftDetector):
    kind = "always-drift"

    def detect(self, window: Tensors) -> DriftResult:
        return DriftResult("always", True)


class _Plugin:
    @hookimpl
    def register_model_loaders(self) -> list[type[Any]]:
        return [PinnedFake]

    @hookimpl
    def register_drift_detectors(self) -> list[type[DriftDetector]]:
        return [AlwaysDrift]


def fake(offset: float = 0.0, **options: Any) -> dict[str, Any]:
    return {"kind": "fake", "offset": offset, **options}


def write_repo(root: Path, *versions: str) -> None:
    repo = root / "repo"
    lines = []
    for v in versions:
        folder = repo / f"v{v}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.bin").write_text(f"version {v}\n")
        lines.append(f"{sha256_file(folder / 'model.bin')}  v{v}/model.bin")
    (repo / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def config(
    root: Path,
    *,
    state: bool = True,
    approvals: tuple[str, ...] = ("canary", "primary"),
    versions: dict[str, Any] | None = None,
    routing: dict[str, Any] | None = None,
    **model: Any,
) -> dict[str, Any]:
    admin: dict[str, Any] = {"audit_log": str(root / "audit.jsonl")}
    if state:
        admin["state_file"] = str(root / "state" / "rollout.json")
    return {
        "model_root": str(root),
        "batching": {"kind": "none"},
        "admin": admin,
        "models": {
            "m": {
                "primary": "1",
                "versions": versions
                or {"1": {"loader": fake(0)}, "2": {"loader": fake(100), "stage": "shadow"}},
                "routing": routing
                or {"kind": "header", "inner": {"kind": "shadow", "inner": {"kind": "weighted"}}},
                "rollout": {"approvals": list(approvals)},
                "repository": {
                    "folder": "repo",
                    "version_folder": "v{version}",
                    "loader": {"kind": "pinned-fake", "path": "model.bin"},
                },
                **model,
            }
        },
    }


def runtime(cfg: dict[str, Any]) -> Any:
    return runtime_from_dict(cfg, extra_plugins=[("pinned", _Plugin())])


@asynccontextmanager
async def started(cfg: dict[str, Any]) -> AsyncIterator[Any]:
    rt = runtime(cfg)
    await rt.start()
    try:
        yield rt
    finally:
        await rt.stop()


def stages(rt: Any) -> dict[str, tuple[str, float, str]]:
    return {v: (sv.stage, sv.weight, sv.state) for v, sv in rt.models["m"].versions.items()}


def errors(caplog: pytest.LogCaptureFixture, logger: str = "infercore") -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith(logger)
    ]


# --- the file: atomic writes and the lock ---------------------------------------------------


def test_a_crash_between_writing_and_renaming_leaves_the_old_state_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state" / "rollout.json"
    store = StateFile(path)
    store.write(b'{"one": 1}\n')
    assert path.read_bytes() == b'{"one": 1}\n'
    assert stat.S_IMODE(path.stat().st_mode) == 0o640

    def crash(src: Path, dst: Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(rollout_state, "_replace", crash)
    with pytest.raises(OSError):
        store.write(b'{"two": 2}\n')
    assert path.read_bytes() == b'{"one": 1}\n'  # the old state, whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["rollout.json", "rollout.json.lock"]
    store.close()
    # A server killed after writing the temporary file and before renaming it: the next one
    # reads the old state and removes the leftover.
    (path.parent / f".rollout.json.{os.getpid() + 1}.tmp").write_bytes(b'{"half": ')
    store = StateFile(path)
    assert store.read() == b'{"one": 1}\n'
    assert sorted(p.name for p in path.parent.iterdir()) == ["rollout.json", "rollout.json.lock"]
    store.close()


def test_two_servers_cannot_share_a_state_file(tmp_path: Path) -> None:
    path = tmp_path / "rollout.json"
    first = StateFile(path)
    with pytest.raises(ConfigError) as refused:
        StateFile(path)
    message = str(refused.value)
    assert message.startswith("admin.state_file: ") and "in use by another server" in message
    assert f"pid {os.getpid()}" in message
    first.close()
    StateFile(path).close()  # free again once the first one stopped


def test_a_symlink_to_the_state_file_is_that_file(tmp_path: Path) -> None:
    """A link (onto a mounted volume, say) shares the file's lock, and a save writes the file
    it points at rather than replacing the link."""
    path = tmp_path / "volume" / "rollout.json"
    path.parent.mkdir()
    link = tmp_path / "alias.json"
    link.symlink_to(path)
    first = StateFile(path)
    with pytest.raises(ConfigError, match="in use by another server"):
        StateFile(link)
    first.close()
    store = StateFile(link)
    store.write(b'{"one": 1}\n')
    assert link.is_symlink() and path.read_bytes() == b'{"one": 1}\n'
    store.close()


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("missing/deeper/rollout.json", "do not exist (only the file's own folder is created)"),
        ("file/rollout.json", "is not a folder"),
        ("audit.jsonl", "it is admin.audit_log too"),
    ],
)
def test_a_state_file_that_cannot_be_used_is_a_config_error(
    tmp_path: Path, where: str, expected: str
) -> None:
    (tmp_path / "file").write_text("")
    cfg = config(tmp_path)
    cfg["admin"]["state_file"] = str(tmp_path / where)
    before = sorted(tmp_path.rglob("*"))
    # What `infercore config validate` checks (creating nothing), then what serve refuses.
    with pytest.raises(ConfigError, match=r"admin\.state_file") as checked:
        rollout_state.check_path(tmp_path / where, audit_log=str(tmp_path / "audit.jsonl"))
    assert sorted(tmp_path.rglob("*")) == before
    with pytest.raises(ConfigError, match=r"admin\.state_file") as refused:
        runtime(cfg).lifecycle  # noqa: B018
    assert expected in str(refused.value) and str(checked.value) == str(refused.value)
    rollout_state.check_path(tmp_path / "new" / "rollout.json")  # a folder it may create
    assert not (tmp_path / "new").exists()


def test_the_state_file_needs_one_worker(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    cfg["server"] = {"workers": 2}
    with pytest.raises(ConfigError, match=r"admin\.state_file: server\.workers is 2"):
        runtime(cfg).lifecycle  # noqa: B018


# --- restoring through the real lifecycle ---------------------------------------------------


def test_promotions_weights_approvals_and_run_time_loads_survive_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_repo(tmp_path, "3")
    cfg = config(tmp_path)

    async def first_run() -> str:
        async with started(cfg) as rt:
            lc = rt.lifecycle
            await lc.load("m", "3", by="ann")
            ask = await lc.promote("m", "3", "canary", weight=10, by="ann")
            await lc.approve(ask["approval"]["id"], by="bob")
            ask = await lc.promote("m", "3", "primary", by="ann")
            await lc.approve(ask["approval"]["id"], by="bob")
            ask = await lc.promote("m", "1", "canary", weight=5, by="ann")
            await lc.approve(ask["approval"]["id"], by="bob")
            pending = await lc.promote("m", "2", "canary", weight=10, by="ann", reason="ok")
            assert stages(rt) == {
                "1": ("canary", 5.0, "ready"),
                "2": ("shadow", 0.0, "ready"),
                "3": ("primary", 0.0, "ready"),
            }
            return str(pending["approval"]["id"])

    async def second_run(pending: str) -> None:
        async with started(cfg) as rt:
            served, lc = rt.models["m"], rt.lifecycle
            assert served.primary == "3" and served.previous == ["1"]
            assert stages(rt) == {
                "1": ("canary", 5.0, "ready"),
                "2": ("shadow", 0.0, "ready"),
                "3": ("primary", 0.0, "ready"),
            }
            assert served.versions["3"].origin == "repository"
            assert served.routed_shares() == {"3": 95.0, "1": 5.0}
            [approval] = lc.list_approvals("pending")
            assert approval["id"] == pending and approval["requested_by"] == "ann"
            assert (approval["to"], approval["weight"], approval["reason"]) == ("canary", 10, "ok")
            # The restored approval is a real one: approving it carries the step out.
            await lc.approve(pending, by="bob")
            assert stages(rt)["2"] == ("canary", 10.0, "ready")
            # And the rollback history came along.
            await lc.rollback("m", by="ann")
            assert served.primary == "1"
            # The audit shows the previous run's records, then the restore.
            events = [r["event"] for r in lc.audit.recent(1000)]
            assert events.count("approved") == 4 and "state_restored" in events

    pending = asyncio.run(first_run())
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="infercore"):
        asyncio.run(second_run(pending))
    restored = [r.getMessage() for r in caplog.records if "restored the rollout" in r.getMessage()]
    assert len(restored) == 1, restored
    assert "m: primary 3 (the recipe's: 1), canary 1 at 5 %, shadow 2" in restored[0]
    assert "loaded from the repository: 3" in restored[0] and pending in restored[0]
    assert str(tmp_path) not in restored[0]  # INFO lines carry no paths
    assert errors(caplog) == []


def test_the_saved_state_is_plain_json_with_what_a_load_needs(tmp_path: Path) -> None:
    write_repo(tmp_path, "3")
    cfg = config(tmp_path, approvals=())

    async def scenario() -> None:
        async with started(cfg) as rt:
            await rt.lifecycle.load("m", "3", by="ann")
            await rt.lifecycle.promote("m", "3", "primary", by="ann")
            await rt.lifecycle.unload("m", "2", by="ann")

    asyncio.run(scenario())
    doc = json.loads((tmp_path / "state" / "rollout.json").read_text())
    assert doc["format"] == 1
    m = doc["models"]["m"]
    assert m["primary"] == "3" and m["previous"] == ["1"]
    assert m["versions"]["3"] == {
        "stage": "primary",
        "weight": 0.0,
        "origin": "repository",
        "pin": {"path": "repo/v3/model.bin", "sha256": sha256_file(tmp_path / "repo/v3/model.bin")},
    }
    assert m["versions"]["1"] == {"stage": "retired", "weight": 0.0}
    assert m["versions"]["2"] == {"stage": "candidate", "weight": 0.0, "loaded": False}
    assert m["recipe"]["primary"] == "1"

    async def again() -> None:
        async with started(cfg) as rt:
            assert stages(rt) == {
                "1": ("retired", 0.0, "ready"),
                "2": ("candidate", 0.0, "unloaded"),
                "3": ("primary", 0.0, "ready"),
            }

    asyncio.run(again())


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        ("folder_gone", "version '4' was loaded from the repository at run time, and now"),
        ("repinned", "the repository manifest now pins"),
        ("file_changed", "did not load again"),
    ],
)
def test_a_state_that_cannot_be_applied_in_full_is_not_applied_at_all(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str, said: str
) -> None:
    write_repo(tmp_path, "3", "4")
    cfg = config(tmp_path, approvals=())
    state = tmp_path / "state" / "rollout.json"

    async def first_run() -> None:
        async with started(cfg) as rt:
            for v in ("3", "4"):
                await rt.lifecycle.load("m", v, by="ann")
            await rt.lifecycle.promote("m", "3", "primary", by="ann")
            await rt.lifecycle.promote("m", "4", "shadow", by="ann")

    asyncio.run(first_run())
    saved = state.read_bytes()
    artifact = tmp_path / "repo" / "v4" / "model.bin"
    if damage == "folder_gone":
        shutil.rmtree(artifact.parent)
    elif damage == "repinned":
        write_repo(tmp_path, "3")  # v4 unpinned...
        artifact.write_text("retrained\n")  # ...and pinned again with another digest
        with (tmp_path / "repo" / "SHA256SUMS").open("a") as fh:
            fh.write(f"{sha256_file(artifact)}  v4/model.bin\n")
    else:
        artifact.write_text("swapped\n")  # the manifest still pins the old bytes

    async def second_run() -> None:
        async with started(cfg) as rt:
            served = rt.models["m"]
            # The recipe's rollout, all of it: 3 (which could load) is not kept either.
            assert served.primary == "1" and served.ready
            assert stages(rt) == {"1": ("primary", 0.0, "ready"), "2": ("shadow", 0.0, "ready")}
            text = rt.metrics.exposition().decode()
            assert metric_value(text, "infercore_model_ready", version="3") == 0
            assert metric_value(text, "infercore_model_stage", version="3") == 0
            assert state.read_bytes() == saved  # kept for the operator to repair
            await rt.lifecycle.promote("m", "2", "canary", by="ann")  # the first change saved
            assert await rt.lifecycle.flush()
            assert json.loads(state.read_bytes())["models"]["m"]["primary"] == "1"
            assert (state.parent / "rollout.json.unapplied").read_bytes() == saved

    with caplog.at_level(logging.INFO, logger="infercore"):
        asyncio.run(second_run())
    # One ERROR says why nothing was restored (a failed load also logs its own, as any does).
    [error] = errors(caplog, "infercore.lifecycle")
    assert error.startswith(f"admin.state_file {str(state)!r}: the rollout state (saved at ")
    assert said in error, error
    assert "the recipe's rollout serves" in error
    assert "delete the state file to start from the recipe's rollout" in error
    if damage != "file_changed":
        assert "restore the folder of version '4' and its pin in the manifest" in error
    assert not [r for r in caplog.records if "restored the rollout" in r.getMessage()]


@pytest.mark.parametrize(
    "content",
    [b'{"format": 1, "models": {"m": {', b"\x00\x01garbage", b'{"format": 7}', b"[]"],
)
def test_a_corrupt_state_file_serves_the_recipe_with_one_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    state = tmp_path / "state" / "rollout.json"
    state.parent.mkdir()
    state.write_bytes(content)

    async def scenario() -> None:
        async with started(config(tmp_path)) as rt:
            assert rt.ready
            assert stages(rt) == {"1": ("primary", 0.0, "ready"), "2": ("shadow", 0.0, "ready")}
            audit = [r["event"] for r in rt.lifecycle.audit.recent()]
            assert audit == ["state_not_restored"]

    with caplog.at_level(logging.INFO, logger="infercore"):
        asyncio.run(scenario())
    [error] = errors(caplog)
    assert str(state) in error and "cannot be applied in full" in error
    assert "delete the state file" in error
    assert state.read_bytes() == content


def test_a_changed_recipe_wins_over_the_saved_state(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config(tmp_path, approvals=())

    async def first_run() -> None:
        async with started(cfg) as rt:
            await rt.lifecycle.promote("m", "2", "primary", by="ann")

    asyncio.run(first_run())
    edited = config(tmp_path, approvals=())
    edited["models"]["m"]["versions"]["2"]["stage"] = "candidate"

    async def second_run() -> None:
        async with started(edited) as rt:
            assert rt.models["m"].primary == "1"
            assert stages(rt)["2"] == ("candidate", 0.0, "ready")

    with caplog.at_level(logging.INFO, logger="infercore"):
        asyncio.run(second_run())
    [error] = errors(caplog)
    assert "model 'm': the recipe's rollout changed since the state was saved" in error
    assert "version '2'" in error and "put the recipe back" in error


def test_a_model_no_longer_in_the_recipe_serves_the_recipe(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config(tmp_path, approvals=())

    async def first_run() -> None:
        async with started(cfg) as rt:
            await rt.lifecycle.promote("m", "2", "primary", by="ann")

    asyncio.run(first_run())
    renamed = config(tmp_path, approvals=())
    renamed["models"]["n"] = renamed["models"].pop("m")

    async def second_run() -> None:
        async with started(renamed) as rt:
            assert rt.models["n"].primary == "1"

    with caplog.at_level(logging.INFO, logger="infercore"):
        asyncio.run(second_run())
    [error] = errors(caplog)
    assert "model 'm' is not in the recipe any more" in error


def test_changes_wait_for_the_restore(tmp_path: Path) -> None:
    rt = runtime(config(tmp_path))

    async def scenario() -> None:
        with pytest.raises(ModelNotReady, match="not restored yet"):
            await rt.lifecycle.promote("m", "2", "candidate", by="ann")
        await rt.start()
        try:
            await rt.lifecycle.promote("m", "2", "candidate", by="ann")
        finally:
            await rt.stop()

    asyncio.run(scenario())


def test_the_drift_cooldown_survives_a_restart(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        drift={
            "window_size": 2,
            "cooldown_s": 3600,
            "detectors": {"always": {"kind": "always-drift"}},
            "actions": [{"kind": "log"}],
        },
    )

    async def first_run() -> None:
        async with started(cfg) as rt:
            drift = rt.models["m"].drift
            drift.offer({"x": np.ones((2, 4), np.float32)})
            await drift.flush()
            await drift.wait_actions(5)
            assert drift.events()[0]["actions"]["log"]["status"] == "ok"

    asyncio.run(first_run())
    saved = json.loads((tmp_path / "state" / "rollout.json").read_text())
    assert time.time() - saved["models"]["m"]["drift_last_action_at"] < 60

    async def second_run() -> None:
        async with started(cfg) as rt:
            drift = rt.models["m"].drift
            assert drift.status()["cooldown_remaining_s"] > 3000
            drift.offer({"x": np.ones((2, 4), np.float32)})
            await drift.flush()
            assert drift.events()[0]["actions"]["log"] == {
                "status": "skipped",
                "reason": "cooldown",
            }

    asyncio.run(second_run())


def test_a_load_with_pins_loads_only_what_the_manifest_still_pins(tmp_path: Path) -> None:
    write_repo(tmp_path, "3")

    async def scenario() -> None:
        async with started(config(tmp_path, state=False)) as rt:
            node = rt.models["m"].repository.loader_node("3")
            with pytest.raises(LoadFailed, match="not the one it was loaded with before"):
                await rt.load("m", "3", pin={**node, "sha256": "0" * 64})
            assert "3" not in rt.models["m"].versions
            assert (await rt.load("m", "3", pin=node)).ready

    asyncio.run(scenario())


# --- without a state file -------------------------------------------------------------------


def test_without_a_state_file_a_restart_warns_once_that_changes_are_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config(tmp_path, state=False, approvals=())

    async def first_run() -> str:
        async with started(cfg) as rt:
            await rt.lifecycle.promote("m", "2", "primary", by="ann")
            asked = await rt.lifecycle.promote("m", "1", "canary", weight=0, by="ann")
            return str(asked["status"])

    asyncio.run(first_run())

    async def restart() -> None:
        async with started(cfg) as rt:
            assert rt.models["m"].primary == "1"
            with pytest.raises(NotFound) as missing:
                await rt.lifecycle.approve("6fd29467", by="bob")
            assert "do not survive a restart unless admin.state_file is set" in str(missing.value)

    with caplog.at_level(logging.WARNING, logger="infercore"):
        asyncio.run(restart())
    warnings = [r.getMessage() for r in caplog.records if "previous run" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "promoted m 2" in warnings[0] and "admin.state_file is not set" in warnings[0]
    assert "set admin.state_file, or write them into the recipe" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="infercore"):
        asyncio.run(restart())  # said once: this restart changed nothing
    assert not [r for r in caplog.records if "previous run" in r.getMessage()]


# --- the audit log, read back ---------------------------------------------------------------


def test_the_audit_log_reads_back_its_tail_and_skips_a_torn_last_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "audit.jsonl"
    first = AuditLog(path)
    for i in range(5):
        first.append({"event": "promoted", "i": i})
    with path.open("ab") as fh:
        fh.write(b'{"ts": "2024-01-01T00:00:00.000Z", "event": "prom')  # killed mid-write
    with caplog.at_level(logging.WARNING, logger="infercore.audit"):
        log = AuditLog(path, keep=3)
    assert [r["i"] for r in log.recent()] == [2, 3, 4]
    assert [r["run"] for r in log.recent()] == [first.run] * 3
    assert [r["i"] for r in log.previous_run()] == [2, 3, 4]
    assert any("1 line(s)" in r.getMessage() for r in caplog.records)
    log.append({"event": "approved"})
    lines = path.read_text().splitlines()
    assert lines[-2].endswith('"event": "prom')  # the torn line stays as it was...
    assert json.loads(lines[-1])["event"] == "approved"  # ...and the next record is whole
    assert [r.get("i", "new") for r in AuditLog(path, keep=3).recent()] == [3, 4, "new"]


def test_the_audit_log_reads_only_its_tail(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "audit.jsonl"
    line = msgspec.json.encode({"event": "loaded", "reason": "x" * 200}) + b"\n"
    # An unreadable line at the start of a long file: read, it would be reported.
    path.write_bytes(b"not json\n" + line * 20_000)
    with caplog.at_level(logging.WARNING, logger="infercore.audit"):
        log = AuditLog(path, keep=10)
    assert len(log.recent(100)) == 10
    assert caplog.records == []


def test_after_a_restart_the_audit_endpoint_shows_the_previous_runs_records(
    tmp_path: Path,
) -> None:
    cfg = config(tmp_path, state=False, approvals=())

    async def first_run() -> None:
        async with started(cfg) as rt:
            await rt.lifecycle.promote("m", "2", "candidate", by="ann", reason="done with it")

    asyncio.run(first_run())

    async def second_run() -> list[dict[str, Any]]:
        async with started(cfg) as rt:
            return list(rt.lifecycle.audit.recent())

    records = asyncio.run(second_run())
    assert [(r["event"], r.get("actor")) for r in records] == [
        ("promoted", "ann"),
        ("rollout_not_restored", "server"),
    ]


# --- the canary guard supersedes pending approvals ------------------------------------------


def test_a_guard_trip_supersedes_the_versions_pending_approvals(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        approvals=("primary",),
        versions={
            "1": {"loader": fake(0)},
            "2": {"loader": fake(100, fail_on_value=1.0), "stage": "canary", "weight": 50},
        },
        routing={"kind": "weighted"},
    )
    cfg["models"]["m"]["rollout"]["guard"] = {"min_requests": 20, "check_interval_s": 0}
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    rt = runtime(cfg)

    async def scenario() -> str:
        async with async_app_client(rt) as c:
            lc = rt.lifecycle
            asked = await lc.promote("m", "2", "primary", by="ann")
            approval = asked["approval"]["id"]
            for _ in range(200):
                await c.post("/v2/models/m/infer", json=body)
                if rt.models["m"].versions["2"].weight == 0:
                    break
            assert rt.models["m"].versions["2"].weight == 0, "the guard never tripped"
            with pytest.raises(Conflict) as refused:
                await lc.approve(approval, by="bob")
            assert "superseded by guard" in str(refused.value)
            assert "canary guard dropped version '2' to weight 0" in str(refused.value)
            assert rt.models["m"].primary == "1"
            [a] = lc.list_approvals()
            assert (a["status"], a["decided_by"]) == ("superseded", "guard")
            [trip] = [r for r in lc.audit.recent() if r["event"] == "guard_tripped"]
            assert trip["superseded"] == [approval]
            [v2] = [v for v in lc.describe("m")[0]["versions"] if v["version"] == "2"]
            assert v2["note"].startswith(f"canary guard dropped it to weight 0 at {trip['ts']}")
            assert v2["guard_tripped"]["cause"] == "error_rate"
            assert lc.describe("m")[0]["pending_approvals"] == []
            return str(trip["ts"])

    at = asyncio.run(scenario())

    async def restarted() -> None:
        async with started(cfg) as again:
            assert again.lifecycle.list_approvals() == []
            [v2] = [v for v in again.lifecycle.describe("m")[0]["versions"] if v["version"] == "2"]
            assert (v2["weight"], v2["guard_tripped"]["at"]) == (0, at)

    asyncio.run(restarted())


# --- a version loaded at run time, then unloaded --------------------------------------------


def test_an_unloaded_run_time_version_is_remembered_across_a_restart(tmp_path: Path) -> None:
    """Unloaded, not forgotten: listed as before the restart, in the rollback history, and
    loaded again by name (the manifest pins it, as for any load)."""
    write_repo(tmp_path, "3")
    cfg = config(tmp_path, approvals=())

    async def first_run() -> dict[str, Any]:
        async with started(cfg) as rt:
            lc = rt.lifecycle
            await lc.load("m", "3", by="ann")
            await lc.promote("m", "3", "primary", by="ann")
            await lc.promote("m", "1", "primary", by="ann")  # 3 retired, next to roll back to
            await lc.unload("m", "3", by="ann")
            return dict(lc.describe("m")[0])

    before = asyncio.run(first_run())
    saved = json.loads((tmp_path / "state" / "rollout.json").read_text())["models"]["m"]
    assert saved["versions"]["3"]["loaded"] is False
    assert saved["versions"]["3"]["origin"] == "repository"

    async def second_run() -> None:
        async with started(cfg) as rt:
            served, lc = rt.models["m"], rt.lifecycle
            after = lc.describe("m")[0]
            assert after["versions"] == before["versions"]
            assert after["previous_primaries"] == before["previous_primaries"] == ["1", "3"]
            assert stages(rt)["3"] == ("retired", 0.0, "unloaded")
            assert served.versions["3"].origin == "repository"
            text = rt.metrics.exposition().decode()
            assert metric_value(text, "infercore_model_ready", version="3") == 0
            # The rollback goes where it went before the restart: back to 3, loaded again.
            await lc.rollback("m", by="ann")
            assert served.primary == "3" and stages(rt)["3"] == ("primary", 0.0, "ready")

    asyncio.run(second_run())


# --- an approval's context in the saved state -----------------------------------------------


def test_a_saved_approval_keeps_its_primary_and_an_old_file_without_it_restores(
    tmp_path: Path,
) -> None:
    cfg = config(tmp_path)
    state = tmp_path / "state" / "rollout.json"

    async def first_run() -> str:
        async with started(cfg) as rt:
            asked = await rt.lifecycle.promote("m", "2", "canary", weight=10, by="ann")
            return str(asked["approval"]["id"])

    pending = asyncio.run(first_run())
    [saved] = json.loads(state.read_text())["approvals"]
    assert (saved["id"], saved["primary"], saved["from_stage"]) == (pending, "1", "shadow")

    # A file saved before the context was recorded: restored from the state it holds.
    doc = json.loads(state.read_text())
    for approval in doc["approvals"]:
        del approval["primary"], approval["from_stage"]
    state.write_text(json.dumps(doc))

    async def second_run() -> None:
        async with started(cfg) as rt:
            [approval] = rt.lifecycle.list_approvals("pending")
            assert (approval["id"], approval["primary"], approval["from_stage"]) == (
                pending,
                "1",
                "shadow",
            )
            await rt.lifecycle.approve(pending, by="bob")
            assert stages(rt)["2"] == ("canary", 10.0, "ready")

    asyncio.run(second_run())


def test_a_restored_approval_asked_under_another_primary_is_refused_and_dropped(
    tmp_path: Path,
) -> None:
    cfg = config(tmp_path)
    state = tmp_path / "state" / "rollout.json"

    async def first_run() -> str:
        async with started(cfg) as rt:
            asked = await rt.lifecycle.promote("m", "2", "canary", weight=10, by="ann")
            return str(asked["approval"]["id"])

    pending = asyncio.run(first_run())
    doc = json.loads(state.read_text())
    doc["approvals"][0]["primary"] = "0"  # asked under a primary that is not the one now
    state.write_text(json.dumps(doc))

    async def second_run() -> None:
        async with started(cfg) as rt:
            with pytest.raises(Conflict, match="the primary of model 'm' is '1' now; it was '0'"):
                await rt.lifecycle.approve(pending, by="bob")
            assert stages(rt)["2"] == ("shadow", 0.0, "ready")
            assert await rt.lifecycle.flush()
            assert json.loads(state.read_text())["approvals"] == []

    asyncio.run(second_run())


# --- a file of the wrong shape --------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (b"[]", "it holds an array"),
        (b"42", "it holds a number"),
        (b'"rollout"', "it holds a string"),
        (b"null", "it holds null"),
        (b"{}", "it holds an empty object"),
        (b'{"models": {}}', 'it holds an object without "format"'),
    ],
)
def test_json_that_is_not_a_state_file_says_so(content: bytes, said: str) -> None:
    with pytest.raises(rollout_state.Unrestorable) as refused:
        rollout_state.decode(content)
    what = refused.value.what
    assert what.startswith("the file is JSON but not an infercore rollout state (expected an ")
    assert 'object with "format": 1, "saved_at", "models" and "approvals"' in what
    assert said in what and "not valid JSON" not in what
    assert "delete the state file" in refused.value.fix


@pytest.mark.parametrize(
    ("models", "said"),
    [
        ({"m": {"recipe": {}, "primary": 3, "versions": {}}}, '- at `$.models["m"].primary`'),
        (
            {"m": {"recipe": {}, "primary": "1", "versions": {"3": {"stage": "live"}}}},
            '- at `$.models["m"].versions["3"].stage`',
        ),
        (
            {"m": {"recipe": {}, "versions": {}}},
            'missing required field `primary` - at `$.models["m"]`',
        ),
        ({"m": 7}, 'Expected `object`, got `int` - at `$.models["m"]`'),
        ([], "Expected `object`, got `array` - at `$.models`"),
    ],
)
def test_a_state_of_the_wrong_shape_names_the_field(models: Any, said: str) -> None:
    raw = json.dumps({"format": 1, "saved_at": "t", "models": models}).encode()
    with pytest.raises(rollout_state.Unrestorable) as refused:
        rollout_state.decode(raw)
    assert refused.value.what.startswith("the file is not a valid rollout state (")
    assert said in refused.value.what, refused.value.what


def test_every_field_of_a_state_is_named_when_wrong() -> None:
    def what(doc: dict[str, Any]) -> str:
        with pytest.raises(rollout_state.Unrestorable) as refused:
            rollout_state.decode(json.dumps(doc).encode())
        return refused.value.what

    assert "missing required field `saved_at`" in what({"format": 1})
    assert "the file holds rollout state format '1'" in what({"format": "1"})
    assert "the file holds rollout state format True" in what({"format": True})
    approval = {"format": 1, "saved_at": "t", "models": {}, "approvals": [{"id": 1}]}
    assert "- at `$.approvals[0].id`" in what(approval)


# --- an empty path is unset -----------------------------------------------------------------


def test_an_empty_state_file_or_audit_log_is_unset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`admin.state_file=` / `admin.audit_log=` on the command line give '': no file, as
    unset (they would otherwise name the working folder)."""
    monkeypatch.chdir(tmp_path)
    rollout_state.check_path("", audit_log="")
    rollout_state.check_path("", create=True)
    cfg = config(tmp_path, approvals=())
    cfg["admin"] = {"state_file": "", "audit_log": ""}
    cfg["server"] = {"workers": 1}
    rt = runtime(cfg)
    lc = rt.lifecycle
    assert lc.state is None and lc.writer is None and lc.audit.path is None
    assert AuditLog("").path is None

    async def scenario() -> None:
        await rt.start()
        try:
            await lc.promote("m", "2", "candidate", by="ann")
        finally:
            await rt.stop()

    asyncio.run(scenario())
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --- the writer: off the event loop, in order, coalesced, flushed on stop -------------------


class _HeldWrites:
    """Makes the state file's rename wait until released: a write in progress, held."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.renamed: list[bytes] = []

        def held(src: Path, dst: Path) -> None:
            self.entered.set()
            assert self.release.wait(30), "the test never released the write"
            self.renamed.append(src.read_bytes())
            os.replace(src, dst)

        monkeypatch.setattr(rollout_state, "_replace", held)


def saved_primary_and_canaries(state: Path) -> tuple[str, dict[str, float]]:
    m = json.loads(state.read_text())["models"]["m"]
    canaries = {v: d["weight"] for v, d in m["versions"].items() if d["stage"] == "canary"}
    return m["primary"], canaries


def test_changes_while_a_write_runs_are_written_once_more_with_the_newest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(tmp_path, approvals=(), routing={"kind": "shadow", "inner": {"kind": "weighted"}})
    state = tmp_path / "state" / "rollout.json"
    held = _HeldWrites(monkeypatch)

    async def scenario() -> None:
        async with started(cfg) as rt:
            lc = rt.lifecycle
            # Each call answers once its change is on disk: they wait, as tasks.
            first = asyncio.create_task(lc.promote("m", "2", "canary", weight=10, by="ann"))
            # The write is held on the writer's thread; the event loop goes on.
            assert await asyncio.to_thread(held.entered.wait, 30)
            later = [
                asyncio.create_task(lc.set_weights("m", {"1": 100 - w, "2": w}, by="ann"))
                for w in (20, 30, 40)
            ]
            await asyncio.sleep(0)  # the tasks run up to their wait for the write
            assert rt.models["m"].versions["2"].weight == 40  # made, not yet saved
            assert not first.done() and not any(t.done() for t in later)
            held.release.set()
            await asyncio.gather(first, *later)
            assert lc.writer is not None and lc.writer.writes == 2  # held one, then the newest
            assert saved_primary_and_canaries(state) == ("1", {"2": 40.0})

    asyncio.run(scenario())
    assert [json.loads(raw)["models"]["m"]["versions"]["2"]["weight"] for raw in held.renamed] == [
        10.0,
        40.0,
    ]


def test_stopping_waits_for_the_last_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(tmp_path, approvals=())
    state = tmp_path / "state" / "rollout.json"
    held = _HeldWrites(monkeypatch)
    rt = runtime(cfg)

    async def scenario() -> None:
        await rt.start()
        call = asyncio.create_task(rt.lifecycle.promote("m", "2", "canary", weight=10, by="ann"))
        assert await asyncio.to_thread(held.entered.wait, 30)
        closer = threading.Thread(target=rt.lifecycle.close, kwargs={"timeout": 30})
        closer.start()
        await asyncio.to_thread(closer.join, 0.2)
        assert closer.is_alive(), "close() returned while the last write was still held"
        held.release.set()
        await asyncio.to_thread(closer.join, 30)
        assert not closer.is_alive()
        await call
        assert saved_primary_and_canaries(state) == ("1", {"2": 10.0})
        StateFile(state).close()  # the lock is free: released after the write
        await rt.stop()

    asyncio.run(scenario())


def test_a_last_write_past_the_timeout_is_logged_and_keeps_the_lock_until_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config(tmp_path, approvals=())
    state = tmp_path / "state" / "rollout.json"
    held = _HeldWrites(monkeypatch)
    rt = runtime(cfg)

    async def scenario() -> None:
        await rt.start()
        lc = rt.lifecycle
        call = asyncio.create_task(lc.promote("m", "2", "canary", weight=10, by="ann"))
        assert await asyncio.to_thread(held.entered.wait, 30)
        lc.close(timeout=0.01)
        with pytest.raises(ConfigError, match="in use by another server"):
            StateFile(state)  # not released under the write
        held.release.set()
        assert lc.writer is not None and lc.writer._thread is not None
        await asyncio.to_thread(lc.writer._thread.join, 30)
        await call
        assert saved_primary_and_canaries(state) == ("1", {"2": 10.0})
        StateFile(state).close()  # released by the writer once done
        await rt.stop()

    with caplog.at_level(logging.ERROR, logger="infercore.lifecycle"):
        asyncio.run(scenario())
    [error] = errors(caplog)
    assert "the last rollout change was still being written after 0.01s at shutdown" in error


def test_failed_saves_are_counted_and_logged_once_until_one_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config(tmp_path, approvals=())
    state = tmp_path / "state" / "rollout.json"

    def full(src: Path, dst: Path) -> None:
        raise OSError(28, "No space left on device")

    async def scenario() -> None:
        async with started(cfg) as rt:
            lc = rt.lifecycle
            monkeypatch.setattr(rollout_state, "_replace", full)
            for weight in (10, 20, 30):
                await lc.promote("m", "2", "canary", weight=weight, by="ann")
                assert await lc.flush(30)
                await lc.promote("m", "2", "shadow", by="ann")
                assert await lc.flush(30)
            text = rt.metrics.exposition().decode()
            assert metric_value(text, "infercore_rollout_state_save_failures_total") == 6
            assert not state.exists()
            assert sorted(p.name for p in state.parent.iterdir()) == ["rollout.json.lock"]
            monkeypatch.setattr(rollout_state, "_replace", os.replace)
            await lc.promote("m", "2", "canary", weight=5, by="ann")
            assert await lc.flush(30)
            assert saved_primary_and_canaries(state) == ("1", {"2": 5.0})

    with caplog.at_level(logging.INFO, logger="infercore.lifecycle"):
        asyncio.run(scenario())
    [error] = errors(caplog)
    assert error.startswith("admin.state_file: the rollout could not be saved (No space left")
    assert "a restart now would not restore it" in error
    assert any(
        "the rollout is saved again, after 6 failed write(s)" in r.getMessage()
        for r in caplog.records
    )


def test_an_unloaded_run_time_version_whose_folder_is_gone_is_forgotten_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Unloaded, it needs nothing from its folder to be restored, and the rest of the state
    does not depend on it: what cannot be known again is forgotten, with a WARNING, as it was
    before unloaded versions were saved."""
    write_repo(tmp_path, "3", "4")
    cfg = config(tmp_path, approvals=())

    async def first_run() -> None:
        async with started(cfg) as rt:
            lc = rt.lifecycle
            for v in ("3", "4"):
                await lc.load("m", v, by="ann")
            await lc.promote("m", "3", "primary", by="ann")
            await lc.promote("m", "4", "primary", by="ann")
            await lc.unload("m", "3", by="ann")

    asyncio.run(first_run())
    shutil.rmtree(tmp_path / "repo" / "v3")

    async def second_run() -> None:
        async with started(cfg) as rt:
            served = rt.models["m"]
            assert served.primary == "4" and "3" not in served.versions
            assert served.previous == ["1"]
            assert stages(rt)["1"] == ("retired", 0.0, "ready")

    with caplog.at_level(logging.WARNING, logger="infercore.lifecycle"):
        asyncio.run(second_run())
    assert errors(caplog) == []
    [warning] = [r.getMessage() for r in caplog.records if "is forgotten" in r.getMessage()]
    assert warning.startswith("admin.state_file: model m version 3 was loaded from the repository")
    assert "has no version '3'" in warning and str(tmp_path) not in warning
