"""The drift monitor wired into a model: recipe config, request path, admin route."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest

from infercore.errors import ConfigError
from infercore.server.admin import create_admin_app
from infercore.testing import fake_model_config, runtime_from_dict

TOKEN = "drift-wiring-test-token-0123456789"


def _config(tmp_path: Path, **drift: object) -> dict[str, object]:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "reference.npz", x=rng.normal(size=(2000, 2)).astype(np.float32))
    cfg = fake_model_config(features=2)
    cfg["models"]["m"]["drift"] = {  # type: ignore[index]
        "window_size": 200,
        "cooldown_s": 0,
        "detectors": {"ks": {"kind": "ks", "reference": "reference.npz", "p_val": 0.01}},
        "actions": [{"kind": "log"}],
        **drift,
    }
    return cfg


async def _serve_rows(runtime: object, rows: np.ndarray) -> None:
    served = runtime.models["m"]  # type: ignore[attr-defined]
    sv = served.versions["1"]
    loop = asyncio.get_running_loop()
    for chunk in np.array_split(rows, 10):
        await runtime.infer(  # type: ignore[attr-defined]
            served, sv, {"x": chunk}, declared=None, deadline=loop.time() + 5
        )
    await served.drift.flush()


def test_requests_feed_the_monitor_and_a_shift_is_reported(tmp_path: Path) -> None:
    runtime = runtime_from_dict(_config(tmp_path), recipes_dir=tmp_path)
    rng = np.random.default_rng(1)

    async def scenario() -> tuple[dict[str, object], dict[str, object]]:
        await runtime.start()
        try:
            await _serve_rows(runtime, rng.normal(size=(200, 2)).astype(np.float32))
            calm = dict(runtime.models["m"].drift.latest_results())
            await _serve_rows(runtime, (rng.normal(size=(200, 2)) + 3).astype(np.float32))
            shifted = dict(runtime.models["m"].drift.latest_results())
            return calm, shifted
        finally:
            await runtime.stop()

    calm, shifted = asyncio.run(scenario())
    assert calm["ks"]["drift"] is False, calm
    assert shifted["ks"]["drift"] is True, shifted
    drifted = {f for f, flag in shifted["ks"]["feature_drift"].items() if flag}
    assert drifted == {"x[0]", "x[1]"}, shifted


def test_the_admin_api_shows_the_latest_results(tmp_path: Path) -> None:
    runtime = runtime_from_dict(_config(tmp_path), recipes_dir=tmp_path)
    rng = np.random.default_rng(2)

    async def scenario() -> tuple[int, dict[str, object]]:
        await runtime.start()
        try:
            await _serve_rows(runtime, (rng.normal(size=(200, 2)) + 3).astype(np.float32))
            app = create_admin_app(runtime, TOKEN)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://admin") as c:
                denied = await c.get("/admin/models/m/drift")
                doc = (
                    await c.get(
                        "/admin/models/m/drift", headers={"Authorization": f"Bearer {TOKEN}"}
                    )
                ).json()
            return denied.status_code, doc
        finally:
            await runtime.stop()

    status, doc = asyncio.run(scenario())
    assert status == 401
    assert doc["monitored"] is True
    assert doc["latest"]["ks"]["drift"] is True
    assert doc["events"] and doc["events"][-1]["detector"] == "ks"


def test_a_bad_drift_node_fails_when_the_runtime_is_built(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    cfg["models"]["m"]["drift"]["detectors"]["ks"]["kind"] = "kss"  # type: ignore[index]
    with pytest.raises(ConfigError, match=r"models\.m\.drift\.detectors\.ks"):
        runtime_from_dict(cfg, recipes_dir=tmp_path)


def test_infercore_events_lists_drift_events_through_the_admin_api(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import threading

    from infercore.cli import run as cli
    from infercore.server.admin import AdminListener

    sock = tmp_path / "admin.sock"
    cfg = _config(tmp_path)
    cfg["admin"] = {"enabled": True, "uds": str(sock)}
    runtime = runtime_from_dict(cfg, recipes_dir=tmp_path)
    ready, fed, done = threading.Event(), threading.Event(), threading.Event()
    loop = asyncio.new_event_loop()
    rng = np.random.default_rng(3)

    async def serve() -> None:
        listener = AdminListener.from_runtime(runtime, {"INFERCORE_ADMIN_TOKEN": TOKEN})
        assert listener is not None
        await runtime.start()
        await listener.start()
        ready.set()
        await _serve_rows(runtime, (rng.normal(size=(200, 2)) + 3).astype(np.float32))
        fed.set()
        while not done.is_set():
            await asyncio.sleep(0.02)
        await listener.stop()
        await runtime.stop()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    base = ["events", "--url", f"unix:{sock}", "--token", TOKEN]
    try:
        assert ready.wait(30) and fed.wait(30)
        assert cli(base) == 0
        out = capsys.readouterr().out
        assert "  m  #1  ks  window 1  drift on: x[0], x[1]  actions: log=ok" in out, out
        assert cli([*base, "nope"]) == 1
        assert "model_not_found" in capsys.readouterr().err
        assert cli(["events", "--url", f"unix:{sock}", "--token", "wrong-token-0123456789"]) == 1
        assert "HTTP 403" in capsys.readouterr().err
    finally:
        done.set()
        thread.join(30)
