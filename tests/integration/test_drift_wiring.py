"""The drift monitor wired into a model: recipe config, request path, admin route."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from infercore import hookimpl
from infercore.components import FeatureSource, Tensors
from infercore.components.features import mark_degraded
from infercore.errors import ConfigError
from infercore.server.admin import create_admin_app
from infercore.testing import async_app_client, fake_model_config, runtime_from_dict

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


@contextlib.contextmanager
def _events_cli(
    tmp_path: Path, cfg: dict[str, object], rows: np.ndarray
) -> Iterator[Callable[..., int]]:
    """A runtime with its admin API on a Unix socket, in a thread, after serving ``rows``;
    yields ``cli(*args)``: ``infercore events [args]`` against it."""
    import threading

    from infercore.cli import run as cli
    from infercore.server.admin import AdminListener

    sock = tmp_path / "admin.sock"
    cfg["admin"] = {"enabled": True, "uds": str(sock)}
    runtime = runtime_from_dict(cfg, recipes_dir=tmp_path)
    ready, fed, done = threading.Event(), threading.Event(), threading.Event()
    loop = asyncio.new_event_loop()

    async def serve() -> None:
        listener = AdminListener.from_runtime(runtime, {"INFERCORE_ADMIN_TOKEN": TOKEN})
        assert listener is not None
        await runtime.start()
        await listener.start()
        ready.set()
        await _serve_rows(runtime, rows)
        fed.set()
        while not done.is_set():
            await asyncio.sleep(0.02)
        await listener.stop()
        await runtime.stop()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    try:
        assert ready.wait(30) and fed.wait(30)
        yield lambda *args, token=TOKEN: cli(
            ["events", "--url", f"unix:{sock}", "--token", token, *args]
        )
    finally:
        done.set()
        thread.join(30)


def test_infercore_events_lists_drift_events_through_the_admin_api(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(3)
    shifted = (rng.normal(size=(200, 2)) + 3).astype(np.float32)
    with _events_cli(tmp_path, _config(tmp_path), shifted) as events:
        assert events() == 0
        out = capsys.readouterr().out
        assert "  m  #1  ks  window 1  drift on: x[0], x[1]  actions: log=ok" in out, out
        assert events("nope") == 1
        assert "model_not_found" in capsys.readouterr().err
        assert events(token="wrong-token-0123456789") == 1
        assert "HTTP 403" in capsys.readouterr().err


def test_infercore_events_says_why_an_action_was_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The second drifted window falls in the first one's cooldown: its action is skipped,
    and the text output says so as ``--json`` does (``skipped`` alone cannot tell a cooldown,
    which ends by itself, from an action stuck on an earlier event)."""
    rng = np.random.default_rng(4)
    shifted = (rng.normal(size=(400, 2)) + 3).astype(np.float32)  # two windows of 200
    with _events_cli(tmp_path, _config(tmp_path, cooldown_s=600), shifted) as events:
        assert events("m") == 0
        lines = capsys.readouterr().out.splitlines()
        assert events("m", "--json") == 0
        doc = json.loads(capsys.readouterr().out)
    assert [e["actions"]["log"] for e in doc["m"]["events"]][1:] == [
        {"status": "skipped", "reason": "cooldown"}
    ]
    assert len(lines) == 2, lines
    assert lines[0].endswith("  actions: log=ok"), lines
    assert "  m  #2  ks  window 2  " in lines[1], lines
    assert lines[1].endswith("  actions: log=skipped (cooldown)"), lines


@pytest.mark.parametrize(
    ("option", "names", "message"),
    [
        (
            "features",
            ["x", "amont"],
            r"models\.m\.drift\.features: 'amont' is not an input of model m"
            r" \(hint: inputs of model m: x\)",
        ),
        (
            "outputs",
            ["y", "probability"],
            r"models\.m\.drift\.outputs: 'probability' is not an output of model m"
            r" \(hint: outputs of model m: echo, y \(the model's own names",
        ),
    ],
)
def test_drift_names_the_model_lacks_fail_start_up(
    tmp_path: Path, option: str, names: list[str], message: str
) -> None:
    """A typo in drift.features / drift.outputs would leave every sample out of every window:
    it is a config error once the model's tensor names are known, not silence."""
    runtime = runtime_from_dict(_config(tmp_path, **{option: names}), recipes_dir=tmp_path)

    async def scenario() -> None:
        try:
            await runtime.start()
        finally:
            await runtime.stop()

    with pytest.raises(ConfigError) as info:
        asyncio.run(scenario())
    assert re.search(message, str(info.value)), info.value


def test_drift_names_the_model_has_are_accepted(tmp_path: Path) -> None:
    cfg = _config(tmp_path, features=["x"], outputs=["y"])
    cfg["models"]["m"]["versions"]["2"] = {  # type: ignore[index]
        "loader": {"kind": "fake", "features": 2, "offset": 1.0},
        "stage": "candidate",
    }
    cfg["models"]["m"]["primary"] = "1"  # type: ignore[index]
    runtime = runtime_from_dict(cfg, recipes_dir=tmp_path)

    async def scenario() -> bool:
        await runtime.start()
        try:
            return bool(runtime.models["m"].drift.status()["running"])
        finally:
            await runtime.stop()

    assert asyncio.run(scenario())


class _HalfDegradedSource(FeatureSource):
    """Passes ``x`` through; a request whose first value is negative is served "with default
    features", as a feature store source under ``fail_open`` during an outage."""

    kind = "half_degraded"
    groupable = True

    async def fetch(
        self, fields: Mapping[str, np.ndarray[Any, Any]], *, deadline: float
    ) -> Tensors:
        if np.any(fields["x"][:, 0] < 0):
            mark_degraded("features")
        return {"x": fields["x"]}


class _HalfDegradedPlugin:
    @hookimpl
    def register_feature_sources(self) -> list[type[FeatureSource]]:
        return [_HalfDegradedSource]


def test_requests_served_with_default_features_do_not_feed_the_monitor(tmp_path: Path) -> None:
    """Under fail_open a store outage answers with defaults (X-Infercore-Degraded: features):
    those rows would look like drift and start a retraining; they are left out and counted."""
    cfg = _config(tmp_path)
    cfg["features"] = {"kind": "half_degraded"}
    runtime = runtime_from_dict(
        cfg, recipes_dir=tmp_path, extra_plugins=[("half", _HalfDegradedPlugin())]
    )
    values = [float(i + 1) if i % 3 else -float(i + 1) for i in range(30)]  # 10 degraded

    async def scenario() -> tuple[list[httpx.Response], dict[str, Any]]:
        async with async_app_client(runtime) as client:
            calls = [
                client.post(
                    "/v2/models/m/infer",
                    json={
                        "inputs": [
                            {
                                "name": "x",
                                "shape": [2, 2],
                                "datatype": "FP32",
                                "data": [v, 0.5, v, 0.25],
                            }
                        ]
                    },
                )
                for v in values
            ]
            responses = await asyncio.gather(*calls)
            return list(responses), runtime.models["m"].drift.status()

    responses, status = asyncio.run(scenario())
    for value, resp in zip(values, responses, strict=True):
        assert resp.status_code == 200, resp.text
        assert ("x-infercore-degraded" in resp.headers) is (value < 0)
    assert status["offered_rows"] == 60
    assert status["degraded_rows"] == 20
    assert status["sampled_rows"] == 40 and status["queue_rows"] == 40
