"""Overload over loopback: a real server driven open loop far past its capacity (P1, P2).

The model is ``benchmarks/overload.py``'s MLP (tens of milliseconds per batch), behind a queue
of 16, so that a few thousand requests a second overload it on any machine. What is checked
is behaviour, not speed (the speed targets are the benchmark's): every request is answered, a
200 or a 503 ``queue_full`` with ``Retry-After`` (a malformed one mixed in: a 400, or a 503
while the queue is full and ``server.reject_before_body`` skips its body); the model ran
exactly the requests that got a 200; the server is ready and correct afterwards.
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


#: Every tenth request is malformed (truncated JSON): a 400, or while the queue is full and
#: ``server.reject_before_body`` is on, a 503 ``queue_full`` (its body is not read then).
MALFORMED_EVERY = 10


@pytest.mark.parametrize("early", [True, False], ids=["reject_before_body", "decode_first"])
def test_overload_is_only_200_or_503_queue_full_and_rejected_requests_never_run(
    launcher: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, early: bool
) -> None:
    recipes = tmp_path / "recipes"
    overload.write_recipe(recipes)
    monkeypatch.setenv("INFERCORE_RECIPES_DIR", str(recipes))
    server = launcher.start(  # type: ignore[attr-defined]
        [
            "+recipe=overload",
            "batching.max_queue_size=16",
            "batching.max_batch_size=4",
            # The queue waits tens of ms here; a machine that stalls the server for a second
            # (CI beside other jobs) would turn some into 503 queue_timeout, which is P2 and
            # not what this test is about: give the wait room, inside the request timeout.
            "batching.queue_timeout_ms=8000",
            f"server.reject_before_body={str(early).lower()}",
        ]
    )
    path = f"/v2/models/{overload.MODEL}/infer"
    bodies = overload.bodies(200)
    sent = [b[:-7] if i % MALFORMED_EVERY == 0 else b for i, b in enumerate(bodies)]
    reqs = [
        openloop.encode_post("127.0.0.1", server.port, path, b, "application/json") for b in sent
    ]
    r = asyncio.run(
        openloop.run("127.0.0.1", server.port, reqs, RATE, SECONDS, connections=128, timeout=20.0)
    )
    ok, rejected = r.status.get("200", 0), r.status.get("503", 0)
    invalid = r.status.get("400", 0)
    malformed = sum(1 for i in range(r.scheduled) if i % len(reqs) % MALFORMED_EVERY == 0)
    assert r.completed == r.scheduled, r.summary()  # every request answered, none timed out
    assert set(r.status) == {"200", "400", "503"}, r.status  # nothing else: no 500, no reset
    assert ok > 0 and rejected > 0, r.status  # served, and overloaded
    assert r.reasons == {"queue_full": rejected, "invalid_input": invalid}, r.reasons
    assert r.retry_after_missing == 0
    # A malformed request is never run and never a 200; decoding first, it is always a 400.
    assert 0 < invalid <= malformed and ok <= r.scheduled - malformed
    if not early:
        assert invalid == malformed

    with httpx.Client(base_url=server.url, timeout=10.0) as client:
        assert client.get("/v2/health/ready").status_code == 200
        answer = client.post(path, content=bodies[0], headers={"content-type": "application/json"})
        assert answer.status_code == 200, answer.text
        probabilities = np.array(answer.json()["outputs"][0]["data"])
        assert probabilities.shape == (2,) and abs(probabilities.sum() - 1) < 1e-5
        metrics = client.get("/metrics").text
    labels = {"model": overload.MODEL}
    assert metric_value(metrics, "infercore_requests_total", code="200", **labels) == ok + 1
    # A 400 is counted before the request is routed: against the model, without a version.
    assert metric_value(metrics, "infercore_requests_total", code="400", **labels) == invalid
    assert (
        metric_value(metrics, "infercore_request_failures_total", reason="queue_full", **labels)
        == rejected
    )
    # Rows the model ran: the 200s and the one request after, never a rejected request.
    assert metric_value(metrics, "infercore_batch_size_sum", **labels) == ok + 1
