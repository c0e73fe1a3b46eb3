"""``deploy k8s --startup-timeout``: the seconds a pod has to load its models before the kubelet
restarts it, in every shape that has a startup budget (Deployment, KServe runtime, sidecar)."""

from __future__ import annotations

from typing import Any

import pytest

from infercore.cli import run
from infercore.deploy import k8s

FRAUD_PROD = ["+recipe=fraud", "env=prod"]


def _budget(probe: dict[str, Any]) -> int:
    return int(probe["periodSeconds"] * probe["failureThreshold"])


@pytest.mark.parametrize("seconds", [2, 121, 600])
def test_the_deployment_and_the_sidecar_get_the_budget_asked_for(
    seconds: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("INFERCORE_UDS", raising=False)
    opts = k8s.Options(startup_timeout_s=seconds)
    # Rounded up to whole probe periods: never less than asked for, at most one period more.
    deployment = k8s.render(FRAUD_PROD, opts).files["deployment.yaml"][0]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert seconds <= _budget(container["startupProbe"]) < seconds + k8s.STARTUP_PERIOD_S
    patch = k8s.render([*FRAUD_PROD, "deploy=sidecar"], opts).files["sidecar-patch.yaml"][0]
    (sidecar,) = patch["spec"]["template"]["spec"]["initContainers"]
    assert seconds <= _budget(sidecar["startupProbe"]) < seconds + k8s.STARTUP_PERIOD_S


def test_the_kserve_runtime_delays_liveness_by_the_budget() -> None:
    rendered = k8s.render(FRAUD_PROD, k8s.Options(startup_timeout_s=300))
    (runtime,) = [d for d in rendered.documents("kserve/") if d["kind"] == "ServingRuntime"]
    (container,) = runtime["spec"]["containers"]
    assert container["livenessProbe"]["initialDelaySeconds"] == 300


def test_the_cli_passes_the_budget_through(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "rendered"
    argv = ["deploy", "k8s", "+recipe=iris", "--startup-timeout", "900", "--out", str(out)]
    assert run(argv) == 0
    text = (out / "deployment.yaml").read_text()
    assert "failureThreshold: 450" in text


@pytest.mark.parametrize("seconds", [0, 1, -5])
def test_a_budget_shorter_than_one_probe_period_is_refused_in_one_line(
    seconds: int, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "rendered"
    argv = ["deploy", "k8s", "+recipe=iris", "--startup-timeout", str(seconds), "--out", str(out)]
    assert run(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"infercore: config error: --startup-timeout: {seconds}; must be >= 2")
    assert not out.exists()
