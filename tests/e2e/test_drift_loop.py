"""The fraud drift -> retrain -> approval loop script against real server processes.

Runs ``benchmarks/fraud_drift_loop.py`` in a reduced mode (drift-stats, 4 calm windows): two
server start-ups with Feast stores and one retraining make it take about a minute on two
busy cores, hence ``slow``. It works on a copy of the recipe; the committed artifacts must not
change.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "recipes" / "fraud" / "artifacts"

pytestmark = pytest.mark.slow


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


def test_the_loop_runs_every_step() -> None:
    before = _digest(ARTIFACTS)
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "fraud_drift_loop.py"),
            "--detector",
            "stats",
            "--windows",
            "4",
            "--step-timeout",
            "150",
        ],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=REPO,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    for step in ("(a) calm", "(b) drift", "(c) hook", "(d) retrain", "(e) register", "(f) approve"):
        assert step in out, out
    assert "INFERCORE_NEW_VERSION=3" in out
    assert "v3=shadow(ready)" in out  # registered in shadow by the action, no further
    assert "v3=canary 10%(ready)" in out  # only after the approval
    assert "0 pending" in out
    assert _digest(ARTIFACTS) == before
