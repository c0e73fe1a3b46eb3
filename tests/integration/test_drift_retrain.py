"""The action chain command -> register_candidate on a real runtime with a real ONNX model.

A drift event runs a "retraining" command that writes the next version folder into the
model's repository folder (pinned, or not), then ``register_candidate`` loads it through the
lifecycle: candidate -> shadow, audited as ``drift:<detector>``, never further; a refused load
leaves the model serving as before.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from infercore.artifacts import sha256_file
from infercore.components import DriftDetector, DriftResult, Tensors
from infercore.errors import ConfigError
from infercore.hookspecs import hookimpl
from infercore.server.admin import create_admin_app
from infercore.testing import runtime_from_dict

REPO = Path(__file__).resolve().parents[2]
IRIS_ONNX = REPO / "recipes" / "iris" / "artifacts" / "model.onnx"
TOKEN = "drift-retrain-test-token-0123456789"

pytestmark = pytest.mark.skipif(not IRIS_ONNX.is_file(), reason="iris model not built")

RETRAIN = """
import hashlib, shutil, sys
from pathlib import Path
pin = sys.argv[1] == "pin"
repo = Path("iris")
version = max(int(p.name[1:]) for p in repo.glob("v*")) + 1
(repo / f"v{version}").mkdir()
shutil.copy(repo / "v1" / "model.onnx", repo / f"v{version}" / "model.onnx")
if pin:
    digest = hashlib.sha256((repo / f"v{version}" / "model.onnx").read_bytes()).hexdigest()
    with open(repo / "SHA256SUMS", "a") as fh:
        fh.write(f"{digest}  v{version}/model.onnx\\n")
print("trained")
print(f"INFERCORE_NEW_VERSION={version}")
"""


class Shifted(DriftDetector):
    """Drift when the window's mean first feature is above 5 (a real, if crude, test)."""

    kind = "mean-above"

    def detect(self, window: Tensors) -> DriftResult:
        name, column = sorted(window.items())[0]
        x = np.asarray(column, dtype=np.float64)
        return DriftResult("shifted", bool(x.mean() > 5), feature_drift={name: bool(x.mean() > 5)})


class _Plugin:
    @hookimpl
    def register_drift_detectors(self) -> list[type[DriftDetector]]:
        return [Shifted]


def config(tmp: Path, *, pin: bool = True, repository: bool = True, **cand: Any) -> dict[str, Any]:
    repo = tmp / "iris" / "v1"
    repo.mkdir(parents=True)
    shutil.copy(IRIS_ONNX, repo / "model.onnx")
    (tmp / "iris" / "SHA256SUMS").write_text(f"{sha256_file(repo / 'model.onnx')}  v1/model.onnx\n")
    (tmp / "retrain.py").write_text(RETRAIN)
    model: dict[str, Any] = {
        "primary": "1",
        "versions": {
            "1": {
                "loader": {
                    "kind": "onnx",
                    "path": "iris/v1/model.onnx",
                    "sha256": sha256_file(repo / "model.onnx"),
                }
            }
        },
        "routing": {"kind": "shadow", "inner": {"kind": "weighted"}},
        "rollout": {"approvals": ["canary", "primary"]},
        "drift": {
            "window_size": 20,
            "cooldown_s": 0,
            "action_order": "sequential",
            "detectors": {"shifted": {"kind": "mean-above"}},
            "actions": [
                {"kind": "command", "argv": ["{python}", "retrain.py", "pin" if pin else "no"]},
                {"kind": "register_candidate", "after": "command", "shadow": True, **cand},
            ],
        },
    }
    if repository:
        model["repository"] = {
            "folder": "iris",
            "version_folder": "v{version}",
            "loader": {"kind": "onnx", "path": "model.onnx"},
            "manifest": "SHA256SUMS",
        }
    return {
        "batching": {"kind": "none"},
        "admin": {"audit_log": str(tmp / "audit.jsonl")},
        "models": {"iris": model},
    }


def scenario(tmp: Path, cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], Any]:
    runtime = runtime_from_dict(cfg, recipes_dir=tmp, extra_plugins=[("shifted", _Plugin())])

    async def main() -> tuple[dict[str, Any], dict[str, Any], Any]:
        await runtime.start()
        try:
            served = runtime.models["iris"]
            loop = asyncio.get_running_loop()
            rows = np.full((20, 4), 7.0, dtype=np.float32)
            await runtime.infer(
                served,
                served.versions["1"],
                {"input": rows},
                declared=None,
                deadline=loop.time() + 5,
            )
            await served.drift.flush()
            await served.drift.wait_actions(60)
            # the primary still answers, whatever the actions did
            out = await runtime.infer(
                served,
                served.versions[served.primary],
                {"input": rows[:2]},
                declared=None,
                deadline=loop.time() + 5,
            )
            transport = httpx.ASGITransport(app=create_admin_app(runtime, TOKEN))
            auth = {"Authorization": f"Bearer {TOKEN}"}
            async with httpx.AsyncClient(
                transport=transport, base_url="http://admin", headers=auth
            ) as c:
                model = (await c.get("/admin/models/iris")).json()
                drift = (await c.get("/admin/models/iris/drift")).json()
                approvals = (await c.get("/admin/approvals")).json()
            return model, {**drift, "approvals": approvals}, out
        finally:
            await runtime.stop()

    return asyncio.run(main())


def test_retrained_version_is_registered_in_shadow_and_audited(tmp_path: Path) -> None:
    model, drift, out = scenario(tmp_path, config(tmp_path))
    actions = drift["events"][0]["actions"]
    assert actions["command"]["status"] == "ok"
    assert actions["command"]["details"]["exit_code"] == 0
    assert actions["register_candidate"] == {
        **actions["register_candidate"],
        "status": "ok",
        "details": {"version": "2", "stage": "shadow", "shadow": "applied"},
    }
    stages = {v["version"]: (v["stage"], v["state"]) for v in model["versions"]}
    assert stages == {"1": ("primary", "ready"), "2": ("shadow", "ready")}
    assert model["primary"] == "1" and drift["approvals"] == []
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    mine = [(r["event"], r["version"], r["actor"]) for r in audit if r.get("version") == "2"]
    assert mine == [
        ("load_requested", "2", "drift:shifted"),
        ("loaded", "2", "drift:shifted"),
        ("promoted", "2", "drift:shifted"),
    ]
    assert "label" in out


def test_an_unpinned_retrained_version_is_refused_and_v1_keeps_serving(tmp_path: Path) -> None:
    model, drift, out = scenario(tmp_path, config(tmp_path, pin=False))
    reg = drift["events"][0]["actions"]["register_candidate"]
    assert reg["status"] == "error"
    assert "no digest pinned" in reg["error"] and reg["details"]["version"] == "2"
    assert [v["version"] for v in model["versions"]] == ["1"]
    assert model["primary"] == "1" and model["ready"] is True
    assert "label" in out and (tmp_path / "iris" / "v2" / "model.onnx").is_file()


def test_register_candidate_without_a_repository_fails_at_start_up(tmp_path: Path) -> None:
    runtime = runtime_from_dict(
        config(tmp_path, repository=False),
        recipes_dir=tmp_path,
        extra_plugins=[("shifted", _Plugin())],
    )
    with pytest.raises(ConfigError, match=r"models\.iris\.repository is not set") as info:
        asyncio.run(runtime.start())
    assert "models.iris.drift.actions[1]" in str(info.value)
