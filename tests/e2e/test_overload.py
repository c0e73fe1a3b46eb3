"""Overload over loopback: a real server driven open loop far past its capacity (P1, P2).

The model is ``benchmarks/overload.py``'s MLP (tens of milliseconds per batch), behind a queue
of 16, so that a few thousand requests a second overload it on any machine. What is checked
is behaviour, not speed (the speed targets are the benchmark's): every request is answered, a
200 or a 503 ``queue_full`` with ``Retry-After``; the model ran exactly the requests that got
a 200; the server is ready and correct afterwards.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from infercore.testing import metric_value

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import openloop  # noqa: E402
import overload  # noqa: E402

RATE = 2500.0  # requests per second, offered whatever the server does
SECONDS = 1.5


def test_overload_is_only_200_or_503_queue_full_and_rejected_requests_never_run(
    launcher: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipes = tmp_path / "recipes"
    overload.write_recipe(recipes)
    monkeypatch.setenv("INFERCORE_RECIPES_DIR", str(recipes))
    server = launcher.start(  # type: ignore[attr-defined]
        ["+recipe=overload", "batching.max_queue_size=16", "batching.max_batch_size=4"]
    )
    path = f"/v2/models/{overload.MODEL}/infer"
    bodies = overload.bodies(200)
    reqs = [
        openloop.encode_post("127.0.0.1", server.port, path, b, "application/json") for b in bodies
    ]
    r = asyncio.run(
        openloop.run("127.0.0.1", server.port, reqs, RATE, SECONDS, connections=128, timeout=20.0)
    )
    ok, rejected = r.status.get("200", 0), r.status.get("503", 0)
    assert r.completed == r.scheduled, r.summary()  # every request answered, none timed out
    assert set(r.status) == {"200", "503"}, r.status  # nothing else: no 500, no reset
    assert ok > 0 and rejected > 0, r.status  # served, and overloaded
    assert r.reasons == {"queue_full": rejected}, r.reasons
    assert r.retry_after_missing == 0

    with httpx.Client(base_url=server.url, timeout=10.0) as client:
        assert client.get("/v2/health/ready").status_code == 200
        answer = client.post(path, content=bodies[0], headers={"content-type": "application/json"})
        assert answer.status_code == 200, answer.text
        probabilities = np.array(answer.json()["outputs"][0]["data"])
        assert probabilities.shape == (2,) and abs(probabilities.sum() - 1) < 1e-5
        metrics = client.get("/metrics").text
    labels = {"model": overload.MODEL}
    assert metric_value(metrics, "infercore_requests_total", code="200", **labels) == ok + 1
    assert (
        metric_value(metrics, "infercore_request_failures_total", reason="queue_full", **labels)
        == rejected
    )
    # Rows the model ran: the 200s and the one request after, never a rejected request.
    assert metric_value(metrics, "infercore_batch_size_sum", **labels) == ok + 1
