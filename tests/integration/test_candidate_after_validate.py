"""``infercore config validate`` refuses a ``register_candidate`` whose ``after`` cannot work.

QA's case on the fraud recipe: ``after: command`` with ``action_order: concurrent``, or an
``after`` naming an action the list does not have, validated and served, and failed on the
first drift event, after the retraining had run. Now it is one config line and exit 2.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).parent / "infercore"
INFERCORE = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "infercore.cli"]
ACTIONS = (
    "models.fraud.drift.actions=[{kind:log},{kind:command,argv:[retrain]},"
    "{kind:register_candidate,after:%s}]"
)


def validate(*overrides: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERCORE_")}
    return subprocess.run(
        [*INFERCORE, "config", "validate", "+recipe=fraud", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _one_config_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("infercore: config error:"), result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            [ACTIONS % "command", "models.fraud.drift.action_order=concurrent"],
            [
                "models.fraud.drift.actions[2].after: 'command' needs "
                "models.fraud.drift.action_order: sequential, but it is 'concurrent'",
                "hint: set models.fraud.drift.action_order: sequential",
            ],
        ),
        (
            [ACTIONS % "retrain"],
            [
                "models.fraud.drift.actions[2].after: 'retrain' is not an action of "
                "models.fraud.drift.actions (they are: log, command, register_candidate)",
                "(here: log, command)",
            ],
        ),
    ],
    ids=["concurrent", "not-in-the-list"],
)
def test_config_validate_refuses_an_after_that_cannot_work(
    overrides: list[str], expected: list[str]
) -> None:
    line = _one_config_error(validate(*overrides))
    for text in expected:
        assert text in line, (text, line)


def test_config_validate_accepts_the_documented_list() -> None:
    result = validate(ACTIONS % "command")  # the recipe's action_order is sequential
    assert result.returncode == 0, result.stderr
