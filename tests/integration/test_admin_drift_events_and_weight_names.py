"""The admin API's drift events past the first 50, and version names in a weights body.

* ``GET /admin/models/{m}/drift`` returned at most 50 events whatever ``drift.history_size``
  kept: the older ones could not be seen. ``?limit=N`` (1 to ``history_size``, 50 by default,
  a 400 ``invalid_input`` otherwise) and ``infercore events --limit N`` /
  ``infercore models drift M --limit N`` show them.
* A weights body keyed by a version name with ``..`` or ``/`` is a malformed request (400
  ``invalid_input``), as the same name in a path is, not an unknown version (404).
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from admin_support import TOKEN, admin_and_inference

from infercore import cli
from infercore.server.admin import AdminListener
from infercore.testing import fake_model_config, runtime_from_dict

HISTORY = 80
WINDOW = 20
#: Drift events made: more than the 50 shown by default, fewer than the history keeps.
EVENTS = 64


def drift_config(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    """Model ``m`` monitored with a KS test on windows of :data:`WINDOW` rows (every window of
    shifted rows is an event), and model ``plain`` without a drift node."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "reference.npz", x=rng.normal(size=(2000, 2)).astype(np.float32))
    cfg = fake_model_config(features=2)
    cfg["models"]["m"]["drift"] = {
        "window_size": WINDOW,
        "cooldown_s": 0,
        "history_size": HISTORY,
        "detectors": {"ks": {"kind": "ks", "reference": "reference.npz", "p_val": 0.01}},
        "actions": [{"kind": "log"}],
    }
    cfg["models"]["plain"] = {"versions": {"1": {"loader": {"kind": "fake", "features": 2}}}}
    cfg.update(extra)
    return cfg


async def make_events(runtime: Any, n: int = EVENTS) -> None:
    served = runtime.models["m"]
    sv = served.versions["1"]
    loop = asyncio.get_running_loop()
    rows = (np.random.default_rng(1).normal(size=(n * WINDOW, 2)) + 4).astype(np.float32)
    for chunk in np.split(rows, n):
        await runtime.infer(served, sv, {"x": chunk}, declared=None, deadline=loop.time() + 5)
        await served.drift.flush()
    assert len(served.drift.events()) == n


def test_the_drift_route_shows_up_to_history_size_events_with_limit(tmp_path: Path) -> None:
    runtime = runtime_from_dict(drift_config(tmp_path), recipes_dir=tmp_path)

    async def scenario() -> dict[str, Any]:
        async with admin_and_inference(runtime) as (admin, _):
            await make_events(runtime)
            out: dict[str, Any] = {}
            for query in ("", "?limit=1", "?limit=64", f"?limit={HISTORY}", "?limit=%2070%20"):
                r = await admin.get(f"/admin/models/m/drift{query}")
                assert r.status_code == 200, r.text
                out[query] = [e["id"] for e in r.json()["events"]]
            for query in ("?limit=0", "?limit=-3", f"?limit={HISTORY + 1}", "?limit=abc"):
                r = await admin.get(f"/admin/models/m/drift{query}")
                out[query] = (r.status_code, r.json())
            r = await admin.get("/admin/models/plain/drift?limit=5")
            out["plain"] = (r.status_code, r.json())
            r = await admin.get("/admin/models/plain/drift?limit=x")
            out["plain bad"] = (r.status_code, r.json())
            return out

    out = asyncio.run(scenario())
    ids = list(range(1, EVENTS + 1))
    assert out[""] == ids[-50:]  # the default: the latest 50, oldest first
    assert out["?limit=1"] == ids[-1:]
    assert out["?limit=64"] == ids  # the 14 older ones, which 50 left out
    assert out[f"?limit={HISTORY}"] == ids  # all there are
    assert out["?limit=%2070%20"] == ids
    for query in ("?limit=0", "?limit=-3", f"?limit={HISTORY + 1}", "?limit=abc"):
        status, doc = out[query]
        assert status == 400 and doc["reason"] == "invalid_input", (query, doc)
        assert doc["error"].startswith(f"limit: expected an integer between 1 and {HISTORY}")
    assert out["plain"] == (200, {"model": "plain", "monitored": False})
    status, doc = out["plain bad"]
    assert status == 400 and doc["reason"] == "invalid_input" and "limit" in doc["error"]


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "1..2", "a" * 40])
def test_a_weights_body_with_a_malformed_version_name_is_400(name: str) -> None:
    cfg = fake_model_config(
        versions={
            "1": {"loader": {"kind": "fake"}},
            "2": {"loader": {"kind": "fake"}, "stage": "canary", "weight": 10},
        }
    )
    cfg["models"]["m"].update(primary="1", routing={"kind": "weighted"})
    runtime = runtime_from_dict(cfg)

    async def scenario() -> tuple[httpx.Response, httpx.Response, dict[str, Any]]:
        async with admin_and_inference(runtime) as (admin, _):
            body = {"weights": {"1": 80, name: 20}, "by": "ann"}
            bad = await admin.put("/admin/models/m/weights", json=body)
            # A well-formed name the model does not have is still a 404.
            body = {"weights": {"1": 80, "9": 20}, "by": "ann"}
            unknown = await admin.put("/admin/models/m/weights", json=body)
            return bad, unknown, (await admin.get("/admin/models/m")).json()

    bad, unknown, model = asyncio.run(scenario())
    assert bad.status_code == 400, bad.text
    assert bad.json()["reason"] == "invalid_input"
    assert bad.json()["error"].startswith("weights: invalid version ")
    assert unknown.status_code == 404 and unknown.json()["reason"] == "model_not_found"
    # Nothing changed.
    weights = {v["version"]: v.get("weight") for v in model["versions"]}
    assert weights["2"] == 10


# -- the command line, against the admin listener -------------------------------------------


def test_infercore_events_and_models_drift_take_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("INFERCORE_ADMIN_TOKEN", TOKEN)
    with socket.socket() as probe:  # a free port for the admin listener
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cfg = drift_config(tmp_path, admin={"enabled": True, "port": port})
    runtime = runtime_from_dict(cfg, recipes_dir=tmp_path)

    def cli_run(*argv: str) -> tuple[int, str, str]:
        try:
            code = cli.run(list(argv))
        except SystemExit as exc:  # argparse's usage error
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    async def scenario() -> dict[str, tuple[int, str, str]]:
        await runtime.start()
        listener = AdminListener.from_runtime(runtime)
        assert listener is not None
        await listener.start()
        try:
            await make_events(runtime)
            url = f"http://127.0.0.1:{port}"
            runs = {
                "events": ("events", "m", "--url", url),
                "events 60": ("events", "m", "--url", url, "--limit", "60"),
                "every model": ("events", "--url", url, "--limit", str(HISTORY)),
                "events too many": ("events", "m", "--url", url, "--limit", str(HISTORY + 1)),
                "events 0": ("events", "m", "--url", url, "--limit", "0"),
                "drift 3": ("models", "--url", url, "drift", "m", "--limit", "3"),
            }
            out = {}
            for key, argv in runs.items():
                out[key] = await asyncio.to_thread(cli_run, *argv)
            return out
        finally:
            await listener.stop()
            await runtime.stop()

    out = asyncio.run(scenario())
    code, printed, _ = out["events"]
    assert code == 0 and len(printed.splitlines()) == 50
    code, printed, _ = out["events 60"]
    lines = printed.splitlines()
    assert code == 0 and len(lines) == 60
    assert f"#{EVENTS - 59} " in lines[0] and f"#{EVENTS} " in lines[-1]
    code, printed, _ = out["every model"]
    assert code == 0
    assert len([line for line in printed.splitlines() if "  m  #" in line]) == EVENTS
    assert "plain: not monitored" in printed
    code, _, err = out["events too many"]
    assert code == 1 and "HTTP 400 invalid_input" in err and f"between 1 and {HISTORY}" in err
    code, _, err = out["events 0"]
    assert code == 2 and "--limit" in err
    code, printed, _ = out["drift 3"]
    assert code == 0
    assert [e["id"] for e in json.loads(printed)["events"]] == [EVENTS - 2, EVENTS - 1, EVENTS]
