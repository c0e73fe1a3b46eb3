"""A real ``infercore serve`` restarted with ``admin.state_file``: an approved promotion of a
version loaded at run time, and a pending approval, survive SIGTERM and a second start; the
audit endpoint shows the first run's records."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from infercore.artifacts import sha256_file

REPO = Path(__file__).resolve().parents[2]
IRIS_ONNX = REPO / "recipes" / "iris" / "artifacts" / "model.onnx"
SCRIPT = Path(sys.executable).parent / "infercore"
INFERCORE = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "infercore.cli"]
TOKEN = "restart-test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SETOSA = {
    "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]
}

pytestmark = pytest.mark.skipif(not IRIS_ONNX.is_file(), reason="iris model not built")

RECIPE = """\
# @package _global_
models:
  iris:
    primary: "1"
    versions:
      "1":
        loader: {kind: onnx, path: art/v1/model.onnx}
    routing: {kind: weighted}
    rollout: {approvals: [primary]}
    repository:
      folder: art
      version_folder: "v{version}"
      loader: {kind: onnx, path: model.onnx}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serving(tmp: Path, log: Path) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    """``infercore serve`` with the admin API, the audit log and the state file in ``tmp``;
    yields (admin, inference) clients once ready; SIGTERM after, which must exit 0."""
    port, admin_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERCORE_")}
    env.update(INFERCORE_RECIPES_DIR=str(tmp / "recipes"), INFERCORE_ADMIN_TOKEN=TOKEN)
    args = [
        "serve",
        "+recipe=restart",
        f"server.port={port}",
        "admin.enabled=true",
        f"admin.port={admin_port}",
        f"admin.audit_log={tmp / 'audit.jsonl'}",
        f"admin.state_file={tmp / 'state' / 'rollout.json'}",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*INFERCORE, *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        with (
            httpx.Client(base_url=f"http://127.0.0.1:{admin_port}", headers=AUTH, timeout=10) as a,
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as i,
        ):
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, log.read_text()
                try:
                    if i.get("/v2/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, f"not ready:\n{log.read_text()}"
                time.sleep(0.05)
            yield a, i
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def ok(r: httpx.Response, status: int = 200) -> Any:
    assert r.status_code == status, r.text
    return r.json()


def test_an_approved_promotion_survives_a_restart(tmp_path: Path) -> None:
    recipes = tmp_path / "recipes"
    art = recipes / "art"
    for v in ("1", "3"):
        (art / f"v{v}").mkdir(parents=True)
        shutil.copy(IRIS_ONNX, art / f"v{v}" / "model.onnx")
    (art / "SHA256SUMS").write_text(
        "".join(f"{sha256_file(art / f'v{v}' / 'model.onnx')}  v{v}/model.onnx\n" for v in "13")
    )
    (recipes / "restart.yaml").write_text(textwrap.dedent(RECIPE))

    with serving(tmp_path, tmp_path / "first.log") as (admin, infer):
        ok(admin.post("/v2/repository/models/iris/load", json={"parameters": {"version": "3"}}))
        asked = ok(
            admin.post(
                "/admin/models/iris/versions/3/promote", json={"to": "primary", "by": "ann"}
            ),
            202,
        )
        ok(admin.post(f"/admin/approvals/{asked['approval']['id']}/approve", json={"by": "bob"}))
        waiting = ok(
            admin.post(
                "/admin/models/iris/versions/1/promote", json={"to": "primary", "by": "ann"}
            ),
            202,
        )
        pending = waiting["approval"]["id"]
        assert ok(infer.post("/v2/models/iris/infer", json=SETOSA))["model_version"] == "3"

    with serving(tmp_path, tmp_path / "second.log") as (admin, infer):
        model = ok(admin.get("/admin/models/iris"))
        assert model["primary"] == "3", model
        versions = {v["version"]: (v["stage"], v["state"], v["origin"]) for v in model["versions"]}
        assert versions == {
            "1": ("retired", "ready", "recipe"),
            "3": ("primary", "ready", "repository"),
        }
        assert model["pending_approvals"] == [pending]
        assert ok(infer.post("/v2/models/iris/infer", json=SETOSA))["model_version"] == "3"
        audit = ok(admin.get("/admin/audit", params={"limit": 100}))
        events = [(r["event"], r.get("actor")) for r in audit]
        assert ("approved", "bob") in events and ("loaded", "repository-api") in events
        assert events[-1] == ("state_restored", "server")
        assert len({r["run"] for r in audit}) == 2  # the first run's records, then this one's
    second = (tmp_path / "second.log").read_text()
    assert "admin.state_file: restored the rollout saved at" in second
    assert "m: primary" not in second and "iris: primary 3 (the recipe's: 1)" in second
