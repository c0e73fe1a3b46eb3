"""The source's families under ``server.workers`` > 1 (Prometheus multiprocess files).

Each "worker" here is a short-lived process that writes its samples into the shared folder, as
a worker started by the supervisor does; the test process reads them back the way a worker
answers ``/metrics`` (:meth:`infercore.metrics.Metrics.exposition`), before and after the
supervisor forgets a dead worker (:func:`infercore.metrics.forget_process`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from infercore.metrics import Metrics, forget_process
from infercore_feast.metrics import feature_metrics

# A worker of the fraud recipe: the source's breaker gauge for one model, and Feast imported
# (its feature server module creates its own gauges on import, as in every worker).
WORKER = r"""
import os, sys
from prometheus_client import CollectorRegistry
from infercore_feast.metrics import feature_metrics
import feast.feature_server  # noqa: F401
feature_metrics(CollectorRegistry()).breaker_open.labels("fraud").set(float(sys.argv[1]))
print(os.getpid())
"""


def _worker(folder: Path, breaker: int) -> int:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    out = subprocess.run(
        [sys.executable, "-c", WORKER, str(breaker)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return int(out.stdout)


def _breaker_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("infercore_feature_breaker")]


def test_a_dead_workers_open_breaker_no_longer_shows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "metrics"
    folder.mkdir()
    dead = _worker(folder, 1)  # its breaker was open when it died
    _worker(folder, 0)  # the worker that still serves: its breaker is closed

    # This process is a worker answering /metrics; its app registry has the source's families.
    monkeypatch.setenv("INFERCORE_WORKER", "0:3:4:-1:1:0")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))
    metrics = Metrics()
    feature_metrics(metrics.registry)

    # One series per model, whatever the number of workers: 1 while any live breaker is open.
    assert _breaker_lines(metrics.exposition().decode()) == [
        'infercore_feature_breaker_open{model="fraud"} 1.0'
    ]

    forget_process(dead, str(folder))  # what the supervisor does when it reaps a worker
    text = metrics.exposition().decode()
    # The dead worker's 1 is gone: an alert on breaker_open == 1 stops firing.
    assert _breaker_lines(text) == ['infercore_feature_breaker_open{model="fraud"} 0.0']
    assert "pid=" not in text
    # Feast's feature-server gauges (a server infercore never starts) are not exposed, as
    # with one worker.
    assert "feast_feature_server" not in text
