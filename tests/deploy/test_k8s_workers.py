"""``server.workers`` in the rendered Kubernetes manifests: resources scale with the workers,
``auto`` follows a CPU limit the pod sets, the workers' metrics folder is a writable tmpfs in
every shape, and termination still covers the drain."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from infercore.cli import run
from infercore.config.compose import compose
from infercore.deploy import k8s
from infercore.errors import ConfigError
from infercore.server import workers

IRIS = ["+recipe=iris", "env=prod"]
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())


def _deployment(rendered: k8s.Rendered) -> dict[str, Any]:
    (doc,) = rendered.files["deployment.yaml"]
    return doc


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    return next(
        c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "infercore"
    )


def _runtime_container(rendered: k8s.Rendered) -> dict[str, Any]:
    (runtime,) = rendered.files["kserve/servingruntime.yaml"]
    (container,) = runtime["spec"]["containers"]
    return dict(container)


def _validate(doc: dict[str, Any]) -> None:
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize(
    ("workers_value", "requests", "limits"),
    [
        ("1", {"cpu": "1", "memory": "2Gi"}, {"memory": "2Gi"}),
        ("4", {"cpu": "4", "memory": "8Gi"}, {"memory": "8Gi"}),
    ],
)
def test_default_resources_scale_with_the_workers(
    workers_value: str, requests: dict[str, str], limits: dict[str, str]
) -> None:
    rendered = k8s.render([*IRIS, f"server.workers={workers_value}"], k8s.Options())
    deployment = _deployment(rendered)
    resources = _container(deployment)["resources"]
    assert resources == {"requests": requests, "limits": limits}
    # No CPU limit for a fixed count (throttling shows up as tail latency).
    assert "cpu" not in resources["limits"]
    assert _runtime_container(rendered)["resources"] == resources  # KServe too
    _validate(deployment)


def test_resources_given_explicitly_are_kept() -> None:
    opts = k8s.Options(cpu="3", memory="5Gi")
    resources = _container(_deployment(k8s.render([*IRIS, "server.workers=4"], opts)))["resources"]
    assert resources == {"requests": {"cpu": "3", "memory": "5Gi"}, "limits": {"memory": "5Gi"}}
    # Each on its own: an explicit CPU request leaves memory derived from the workers.
    opts = k8s.Options(cpu="2")
    resources = _container(_deployment(k8s.render([*IRIS, "server.workers=4"], opts)))["resources"]
    assert resources["requests"] == {"cpu": "2", "memory": "8Gi"}


@pytest.mark.parametrize(
    ("cpu", "expected_workers"), [(None, 1), ("2", 2), ("2500m", 3), ("1.5", 2), ("250m", 1)]
)
def test_workers_auto_follows_the_pods_cpu_limit(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cpu: str | None,
    expected_workers: int,
) -> None:
    rendered = k8s.render([*IRIS, "server.workers=auto"], k8s.Options(cpu=cpu))
    deployment = _deployment(rendered)
    resources = _container(deployment)["resources"]
    limit = resources["limits"]["cpu"]
    assert limit == resources["requests"]["cpu"] == (cpu or "1")
    assert resources["limits"]["memory"] == f"{2 * expected_workers}Gi"
    _validate(deployment)

    # What the container will see: the kubelet turns the CPU limit into a CFS quota over a
    # 100 ms period (cgroup v2 cpu.max); `auto` on a 64-CPU node must count the limit.
    quota = round(k8s.cpu_cores(limit) * 100_000)
    (tmp_path / "cgroup").mkdir()
    (tmp_path / "cgroup" / "cgroup.controllers").write_text("cpu\n")
    (tmp_path / "cgroup" / "cpu.max").write_text(f"{quota} 100000\n")
    (tmp_path / "self-cgroup").write_text("0::/\n")
    monkeypatch.setattr(workers, "CGROUP_ROOT", tmp_path / "cgroup")
    monkeypatch.setattr(workers, "PROC_SELF_CGROUP", tmp_path / "self-cgroup")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert workers.worker_count("auto") == expected_workers
    server = compose([*IRIS, "deploy=k8s", "server.workers=auto"]).config.server
    assert k8s.pod_workers(server, k8s.Options(cpu=cpu)) == expected_workers


@pytest.mark.parametrize("cpu", ["abc", "0", "-1", "m", "nan"])
def test_a_bad_cpu_quantity_is_a_config_error(cpu: str) -> None:
    with pytest.raises(ConfigError, match="--cpu"):
        k8s.render([*IRIS, "server.workers=auto"], k8s.Options(cpu=cpu))
    with pytest.raises(ConfigError, match="--cpu"):
        k8s.render(IRIS, k8s.Options(cpu=cpu))


def _metrics_mount(container: dict[str, Any], volumes: list[dict[str, Any]]) -> dict[str, Any]:
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env[workers.METRICS_PARENT_ENV] == k8s.METRICS_MOUNT
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == k8s.METRICS_MOUNT]
    assert not mount.get("readOnly")
    (volume,) = [v for v in volumes if v["name"] == mount["name"]]
    return dict(volume)


@pytest.mark.parametrize("workers_value", ["1", "3", "auto"])
def test_every_shape_mounts_a_memory_backed_metrics_folder(
    workers_value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert k8s.METRICS_PARENT_ENV == workers.METRICS_PARENT_ENV
    rendered = k8s.render([*IRIS, f"server.workers={workers_value}"], k8s.Options())
    pod = _deployment(rendered)["spec"]["template"]["spec"]
    (runtime,) = rendered.files["kserve/servingruntime.yaml"]
    monkeypatch.delenv("INFERCORE_UDS", raising=False)
    sidecar = k8s.render(
        [*IRIS, "deploy=sidecar", f"server.workers={workers_value}"], k8s.Options()
    )
    (patch,) = sidecar.files["sidecar-patch.yaml"]
    (init,) = patch["spec"]["template"]["spec"]["initContainers"]
    for container, volumes in (
        (_container(_deployment(rendered)), pod["volumes"]),
        (runtime["spec"]["containers"][0], runtime["spec"]["volumes"]),
        (init, patch["spec"]["template"]["spec"]["volumes"]),
    ):
        volume = _metrics_mount(container, volumes)
        assert volume["emptyDir"]["medium"] == "Memory"
        assert volume["emptyDir"]["sizeLimit"] == k8s.METRICS_SIZE
        assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_termination_covers_the_drain_with_several_workers() -> None:
    overrides = [*IRIS, "server.workers=4", "server.graceful_timeout_s=40"]
    deployment = _deployment(k8s.render(overrides, k8s.Options()))
    server = compose([*overrides, "deploy=k8s"]).config.server
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # Every worker drains at once (the supervisor forwards SIGTERM): the bound is one worker's.
    assert grace >= math.ceil(server.drain_delay_s + server.graceful_timeout_s) + k8s.MARGIN_S
    assert k8s.check_timings(deployment, server) == []


def test_the_configmap_keeps_the_worker_count(tmp_path: Path) -> None:
    rendered = k8s.render([*IRIS, "server.workers=3"], k8s.Options())
    (cm,) = rendered.files["configmap.yaml"]
    (name, text), *_ = cm["data"].items()
    (tmp_path / name).write_text(text)
    config = compose([f"+recipe={Path(name).stem}"], recipes_dir=tmp_path).config
    assert config.server.workers == 3


def test_cli_renders_workers_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["deploy", "k8s", *IRIS, "server.workers=auto", "--cpu", "3"]) == 0
    captured = capsys.readouterr()
    docs = list(yaml.safe_load_all(captured.out))
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    resources = _container(deployment)["resources"]
    assert resources["limits"] == {"cpu": "3", "memory": "6Gi"}
    assert "server.workers=auto: 3 worker process(es) per pod" in captured.err
