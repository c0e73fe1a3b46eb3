"""``infercore deploy k8s``: every rendered manifest validates offline against the Kubernetes
schemas (``kubernetes-validate`` bundles them), CRDs keep their minimal structure, and the probe
and shutdown timings agree with the composed ``server`` config."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from infercore.cli import run
from infercore.config.compose import compose
from infercore.deploy import k8s
from infercore.errors import ConfigError

#: The oldest Kubernetes the manifests target (native sidecars: restartPolicy on init
#: containers) and the newest schema the package bundles.
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
CRDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("serving.kserve.io/v1alpha1", "ServingRuntime"),
    ("serving.kserve.io/v1beta1", "InferenceService"),
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
}
FRAUD_PROD = ["+recipe=fraud", "env=prod"]


def _validate(doc: dict[str, Any]) -> None:
    for version in K8S_VERSIONS:
        # strict: unknown fields are errors too (a typo would otherwise pass silently).
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.fixture(scope="module")
def fraud() -> k8s.Rendered:
    return k8s.render(FRAUD_PROD, k8s.Options(image="registry.example/infercore:1.2.3"))


@pytest.fixture(scope="module")
def server() -> Any:
    return compose([*FRAUD_PROD, "deploy=k8s"]).config.server


def _one(rendered: k8s.Rendered, kind: str, prefix: str = "") -> dict[str, Any]:
    docs = [d for d in rendered.documents(prefix) if d["kind"] == kind]
    if prefix == "":
        docs = [
            d
            for name, ds in rendered.files.items()
            if not name.startswith("kserve/")
            for d in ds
            if d["kind"] == kind
        ]
    assert len(docs) == 1, kind
    return docs[0]


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    return next(
        c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "infercore"
    )


def test_every_builtin_manifest_validates_against_the_kubernetes_schemas(
    fraud: k8s.Rendered,
) -> None:
    kinds = set()
    for doc in fraud.documents():
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            continue
        _validate(doc)
        kinds.add(doc["kind"])
    assert kinds == {
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    }


def test_the_validator_is_not_a_rubber_stamp(fraud: k8s.Rendered) -> None:
    bad = copy.deepcopy(_one(fraud, "Deployment"))
    _container(bad)["readinessProbe"]["httpGet"]["pathh"] = "/typo"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[0], strict=True)
    bad = copy.deepcopy(_one(fraud, "Deployment"))
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[0], strict=True)


def test_crds_have_their_minimal_structure(fraud: k8s.Rendered) -> None:
    monitor = _one(fraud, "ServiceMonitor")
    service = _one(fraud, "Service")
    assert monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"] == "http"
    assert endpoint["path"] == "/metrics"

    runtime = _one(fraud, "ServingRuntime", "kserve/")
    isvc = _one(fraud, "InferenceService", "kserve/")
    spec = runtime["spec"]
    assert spec["protocolVersions"] == ["v2"]
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"
    assert container["ports"][0]["containerPort"] == 8080
    fmt = spec["supportedModelFormats"][0]["name"]
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] == fmt
    assert model["protocolVersion"] == "v2"
    assert model["storageUri"].startswith("pvc://")
    assert isvc["metadata"]["name"] == "fraud"  # the V2 model name KServe routes by
    # The runtime's pod parts are Kubernetes core types: validate them as a pod.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "kserve-runtime-check"},
        "spec": {"containers": spec["containers"], "volumes": spec["volumes"]},
    }
    _validate(pod)
    mounts = {m["name"] for m in container["volumeMounts"]}
    assert mounts <= {v["name"] for v in spec["volumes"]}
    cm = _one(fraud, "ConfigMap", "kserve/")
    assert "model_root: /mnt/models" in next(iter(cm["data"].values()))


def test_probe_and_shutdown_timings_agree(fraud: k8s.Rendered, server: Any) -> None:
    deployment = _one(fraud, "Deployment")
    assert k8s.check_timings(deployment, server) == []
    spec = deployment["spec"]["template"]["spec"]
    c = _container(deployment)
    # The readiness probe sees the drain (503 at once) well inside the drain delay ...
    ready = c["readinessProbe"]
    assert ready["httpGet"]["path"] == "/v2/health/ready"
    assert ready["periodSeconds"] * ready["failureThreshold"] <= server.drain_delay_s
    # ... and the pod gets drain delay + graceful timeout + margin before SIGKILL.
    assert spec["terminationGracePeriodSeconds"] >= (
        server.drain_delay_s + server.graceful_timeout_s + k8s.MARGIN_S
    )
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert "lifecycle" not in c  # infercore drains itself: no preStop sleep by default
    isvc = _one(fraud, "InferenceService", "kserve/")
    assert (
        isvc["spec"]["predictor"]["terminationGracePeriodSeconds"]
        == spec["terminationGracePeriodSeconds"]
    )


def test_kserve_runtime_probes_readiness_and_liveness(fraud: k8s.Rendered, server: Any) -> None:
    """Without a readiness probe Knative probes the TCP port, which opens while the models still
    load: the runtime's container probes /v2/health/ready as the Deployment does."""
    (container,) = _one(fraud, "ServingRuntime", "kserve/")["spec"]["containers"]
    deployed = _container(_one(fraud, "Deployment"))
    port = container["ports"][0]["containerPort"]
    ready, live = container["readinessProbe"], container["livenessProbe"]
    assert ready["httpGet"] == {"path": "/v2/health/ready", "port": port}
    assert live["httpGet"] == {"path": "/v2/health/live", "port": port}
    # Knative refuses a probe port other than the container's, and a port name it does not
    # know (the container port has none): the port is the number.
    assert isinstance(ready["httpGet"]["port"], int)
    # The same readiness timings as the Deployment (it notices the drain in time) ...
    for key in ("periodSeconds", "failureThreshold", "timeoutSeconds"):
        assert ready[key] == deployed["readinessProbe"][key], key
    assert ready["periodSeconds"] * ready["failureThreshold"] <= server.drain_delay_s
    # ... and no startupProbe (Knative < 1.15 refuses one): liveness waits out the startup
    # budget the Deployment's startup probe gives.
    assert "startupProbe" not in container
    startup = deployed["startupProbe"]
    assert live["initialDelaySeconds"] >= startup["periodSeconds"] * startup["failureThreshold"]
    for probe in (ready, live):
        assert probe["timeoutSeconds"] <= probe["periodSeconds"]


def test_max_replicas_defaults_to_at_least_the_replicas_and_is_never_raised() -> None:
    def limits(opts: k8s.Options) -> tuple[int, int, int, int]:
        rendered = k8s.render(["+recipe=iris", "env=prod"], opts)
        hpa = _one(rendered, "HorizontalPodAutoscaler")["spec"]
        isvc = _one(rendered, "InferenceService", "kserve/")["spec"]["predictor"]
        return hpa["minReplicas"], hpa["maxReplicas"], isvc["minReplicas"], isvc["maxReplicas"]

    assert limits(k8s.Options()) == (2, k8s.DEFAULT_MAX_REPLICAS, 2, k8s.DEFAULT_MAX_REPLICAS)
    assert limits(k8s.Options(replicas=12)) == (12, 12, 12, 12)  # no maximum given
    assert limits(k8s.Options(replicas=3, max_replicas=3)) == (3, 3, 3, 3)
    assert limits(k8s.Options(replicas=3, max_replicas=4)) == (3, 4, 3, 4)


def test_cli_refuses_max_replicas_below_replicas(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "rendered"
    argv = ["deploy", "k8s", *FRAUD_PROD, "--image", "x", "--out", str(out)]
    assert run([*argv, "--replicas", "3", "--max-replicas", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("infercore: config error: --max-replicas: 1 is below --replicas 3")
    assert not out.exists()  # nothing rendered
    # --replicas alone raises the maximum with it (the default 10 is not a ceiling).
    assert run([*argv, "--replicas", "12"]) == 0
    assert "maxReplicas: 12" in (out / "hpa.yaml").read_text()


def test_check_timings_catches_disagreements(fraud: k8s.Rendered, server: Any) -> None:
    deployment = copy.deepcopy(_one(fraud, "Deployment"))
    spec = deployment["spec"]["template"]["spec"]
    spec["terminationGracePeriodSeconds"] = 30
    _container(deployment)["readinessProbe"]["periodSeconds"] = 10
    _container(deployment)["livenessProbe"]["httpGet"]["path"] = "/v2/health/ready"
    problems = " | ".join(k8s.check_timings(deployment, server))
    assert "terminationGracePeriodSeconds 30" in problems
    assert "readiness notices the drain after 20s" in problems
    assert "liveness probe path '/v2/health/ready'" in problems


def test_baked_models_need_no_model_volume() -> None:
    rendered = k8s.render(FRAUD_PROD, k8s.Options(baked_models=True))
    deployment = _one(rendered, "Deployment")
    volumes = {v["name"] for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes == {"recipe", "tmp", "metrics", "state"}
    for prefix in ("", "kserve/"):
        text = next(iter(_one(rendered, "ConfigMap", prefix)["data"].values()))
        assert "model_root: /app/recipes" in text  # the image's RECIPES=baked folder
    assert (
        "storageUri"
        not in _one(rendered, "InferenceService", "kserve/")["spec"]["predictor"]["model"]
    )
    _validate(deployment)


def test_prestop_sleep_and_custom_timings_are_reflected() -> None:
    overrides = [*FRAUD_PROD, "server.drain_delay_s=0", "server.graceful_timeout_s=12"]
    rendered = k8s.render(overrides, k8s.Options(prestop_sleep_s=3))
    deployment = _one(rendered, "Deployment")
    c = _container(deployment)
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "3"]
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 3 + 12 + 5
    server = compose([*overrides, "deploy=k8s"]).config.server
    assert k8s.check_timings(deployment, server) == []
    _validate(deployment)
    with pytest.raises(ConfigError, match="drain_delay_s"):
        k8s.render(overrides, k8s.Options())  # no drain delay and no preStop: no time to leave


def test_security_defaults(fraud: k8s.Rendered) -> None:
    deployment = _one(fraud, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    c = _container(deployment)
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts[k8s.MODELS_MOUNT]["readOnly"] is True
    assert volumes["models"]["persistentVolumeClaim"]["readOnly"] is True
    assert mounts[k8s.RECIPES_MOUNT]["readOnly"] is True
    # Writable places are emptyDirs only: /tmp, the workers' metrics and the Feast state.
    writable = {p for p, m in mounts.items() if not m.get("readOnly")}
    assert writable == {"/tmp", k8s.METRICS_MOUNT, k8s.STATE_MOUNT}
    assert all("emptyDir" in volumes[mounts[p]["name"]] for p in writable)
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]


def test_configmap_recipe_composes_back_to_the_same_config(
    fraud: k8s.Rendered, tmp_path: Path
) -> None:
    """The pod composes ``+recipe=fraud`` from the ConfigMap alone: same config, except where
    the rendering moved things (model volume, Feast state), and no secret or address written
    into it (``${oc.env:…}`` kept)."""
    cm = _one(fraud, "ConfigMap")
    ((key, text),) = cm["data"].items()
    assert key == "fraud.yaml"
    assert "${oc.env:INFERCORE_REDIS_URL" in text
    (tmp_path / key).write_text(text)
    original = compose([*FRAUD_PROD, "deploy=k8s"])
    again = compose(["+recipe=fraud"], recipes_dir=tmp_path)
    assert again.choices == original.choices
    a, b = dict(original.data), dict(again.data)
    assert b.pop("model_root") == k8s.MODELS_MOUNT
    a.pop("model_root")
    fa, fb = dict(a.pop("features")), dict(b.pop("features"))
    assert fb.pop("registry_path").startswith(k8s.STATE_MOUNT)
    assert fb.pop("sqlite_path").startswith(k8s.STATE_MOUNT)
    assert fa == fb
    assert a == b
    deployment = _one(fraud, "Deployment")
    env = {e["name"]: e.get("value") for e in _container(deployment)["env"]}
    assert env["INFERCORE_RECIPES_DIR"] == k8s.RECIPES_MOUNT
    assert _container(deployment)["args"] == ["serve", "+recipe=fraud"]
    assert _container(deployment)["envFrom"][0]["secretRef"]["name"] == "infercore-fraud-env"


def test_hpa_custom_metric_pdb_and_canary_track() -> None:
    rendered = k8s.render(
        ["+recipe=iris", "env=prod"], k8s.Options(inflight_target=8, replicas=3, max_replicas=6)
    )
    hpa = _one(rendered, "HorizontalPodAutoscaler")
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Resource", "Pods"]
    assert hpa["spec"]["metrics"][1]["pods"]["metric"]["name"] == "infercore_inflight_requests"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 6)
    pdb = _one(rendered, "PodDisruptionBudget")
    service = _one(rendered, "Service")
    assert pdb["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    for doc in rendered.documents():
        if (doc["apiVersion"], doc["kind"]) not in CRDS:
            _validate(doc)
    # No feast source in iris: no state volume.
    volumes = {
        v["name"] for v in _one(rendered, "Deployment")["spec"]["template"]["spec"]["volumes"]
    }
    assert volumes == {"recipe", "tmp", "metrics", "models"}

    canary = k8s.render(["+recipe=iris", "env=prod"], k8s.Options(track="canary", replicas=1))
    assert set(canary.files) == {"configmap.yaml", "deployment.yaml", "kustomization.yaml"}
    dep = _one(canary, "Deployment")
    stable = _one(rendered, "Deployment")
    _validate(dep)
    assert dep["metadata"]["name"] == "infercore-iris-canary"
    labels = dep["spec"]["template"]["metadata"]["labels"]
    # The stable Service selects canary pods; the two Deployments' selectors do not overlap.
    assert service["spec"]["selector"].items() <= labels.items()
    assert dep["spec"]["selector"] != stable["spec"]["selector"]
    assert not (
        stable["spec"]["selector"]["matchLabels"].items()
        <= dep["spec"]["template"]["metadata"]["labels"].items()
    )


#: The application a sidecar patch is applied to.
PAYMENTS_APP: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "payments"},
    "spec": {
        "selector": {"matchLabels": {"app": "payments"}},
        "template": {
            "metadata": {"labels": {"app": "payments"}},
            "spec": {"containers": [{"name": "api", "image": "payments:1"}]},
        },
    },
}


def _merge_sidecar(app: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """What ``kubectl patch --type strategic`` / kustomize does with the rendered patch."""
    out = copy.deepcopy(app)
    spec = out["spec"]["template"]["spec"]
    pspec = patch["spec"]["template"]["spec"]
    spec.setdefault("initContainers", []).extend(pspec["initContainers"])
    spec.setdefault("volumes", []).extend(pspec["volumes"])
    for pc in pspec["containers"]:
        target = next(c for c in spec["containers"] if c["name"] == pc["name"])
        target.setdefault("env", []).extend(pc["env"])
        target.setdefault("volumeMounts", []).extend(pc["volumeMounts"])
    meta = out["spec"]["template"].setdefault("metadata", {})
    meta.setdefault("annotations", {}).update(patch["spec"]["template"]["metadata"]["annotations"])
    return out


def test_sidecar_patch_merged_into_an_app_validates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INFERCORE_UDS", raising=False)
    rendered = k8s.render(
        ["+recipe=fraud", "env=prod", "deploy=sidecar"],
        k8s.Options(app="payments", app_container="api"),
    )
    assert set(rendered.files) == {"configmap.yaml", "sidecar-patch.yaml", "kustomization.yaml"}
    (patch,) = rendered.files["sidecar-patch.yaml"]
    assert patch["metadata"]["name"] == "payments"
    merged = _merge_sidecar(PAYMENTS_APP, patch)
    _validate(merged)
    _validate(rendered.files["configmap.yaml"][0])
    spec = merged["spec"]["template"]["spec"]
    (sidecar,) = spec["initContainers"]
    assert sidecar["restartPolicy"] == "Always"  # native sidecar: stops after the app
    assert "ports" not in sidecar  # nothing on the network
    env = {e["name"]: e["value"] for e in sidecar["env"]}
    assert env["INFERCORE_UDS"] == k8s.SOCKET_PATH
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        command = sidecar[probe]["exec"]["command"]
        assert command[:3] == ["python", "-m", "infercore.deploy.probe"]
        assert k8s.SOCKET_PATH in command
    assert sidecar["readinessProbe"]["exec"]["command"][-1] == "/v2/health/ready"
    api = spec["containers"][0]
    assert {"name": "infercore-socket", "mountPath": k8s.SOCKET_DIR} in api["volumeMounts"]
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    models = next(m for m in sidecar["volumeMounts"] if m["mountPath"] == k8s.MODELS_MOUNT)
    assert models["readOnly"] is True
    text = next(iter(rendered.files["configmap.yaml"][0]["data"].values()))
    recipes = tmp_recipes(text)
    sidecar_cfg = compose(["+recipe=fraud"], recipes_dir=recipes).config.server
    assert sidecar_cfg.uds == k8s.SOCKET_PATH
    assert sidecar_cfg.workers == 1


def test_sidecar_with_the_admin_api_gets_a_folder_for_its_socket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The admin listener binds in a folder that must exist in the pod (read-only root, /tmp an
    empty emptyDir): every socket the rendered config listens on lies in a mounted folder."""
    monkeypatch.delenv("INFERCORE_UDS", raising=False)
    monkeypatch.delenv("INFERCORE_ADMIN_UDS", raising=False)
    rendered = k8s.render(
        ["+recipe=iris", "deploy=sidecar", "admin.enabled=true"],
        k8s.Options(app="payments", app_container="api"),
    )
    (patch,) = rendered.files["sidecar-patch.yaml"]
    spec = patch["spec"]["template"]["spec"]
    (sidecar,) = spec["initContainers"]
    mounted = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    env = {e["name"]: e["value"] for e in sidecar["env"]}

    # The pod's config: the ConfigMap's recipe, with the pod's environment.
    text = next(iter(rendered.files["configmap.yaml"][0]["data"].values()))
    folder = Path(tmp_recipes(text, "iris"))
    for name in ("INFERCORE_UDS", "INFERCORE_ADMIN_UDS"):
        if name in env:
            monkeypatch.setenv(name, env[name])
    cfg = compose(["+recipe=iris"], recipes_dir=folder).config
    assert cfg.admin.enabled
    for what, path in (("server.uds", cfg.server.uds), ("admin.uds", cfg.admin.uds)):
        assert path is not None
        parent = str(Path(path).parent)
        assert parent in mounted, f"{what}: {path}, whose folder nothing creates in the pod"
        assert "emptyDir" in volumes[mounted[parent]]
    assert cfg.admin.uds == k8s.ADMIN_SOCKET_PATH
    # The admin socket is the infercore container's alone: the application mounts only the
    # inference socket's folder.
    (app,) = spec["containers"]
    assert [m["mountPath"] for m in app["volumeMounts"]] == [k8s.SOCKET_DIR]
    assert k8s.ADMIN_SOCKET_DIR != k8s.SOCKET_DIR
    assert env["INFERCORE_ADMIN_URL"] == f"unix:{k8s.ADMIN_SOCKET_PATH}"
    assert any(k8s.ADMIN_SOCKET_PATH in note for note in rendered.notes)
    assert not any("INFERCORE_ADMIN_UDS" in note for note in rendered.notes)  # not a secret
    merged = _merge_sidecar(PAYMENTS_APP, patch)
    _validate(merged)

    # Without the admin API nothing changes: no admin volume, no admin variables.
    plain = k8s.render(["+recipe=iris", "deploy=sidecar"], k8s.Options())
    (plain_patch,) = plain.files["sidecar-patch.yaml"]
    plain_spec = plain_patch["spec"]["template"]["spec"]
    assert k8s.ADMIN_SOCKET_DIR not in {
        m["mountPath"] for m in plain_spec["initContainers"][0]["volumeMounts"]
    }
    assert not any(
        e["name"].startswith("INFERCORE_ADMIN") for e in plain_spec["initContainers"][0]["env"]
    )


def tmp_recipes(text: str, recipe: str = "fraud") -> Path:
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="infercore-recipes-"))
    (folder / f"{recipe}.yaml").write_text(text)
    return folder


@pytest.mark.parametrize(
    ("overrides", "opts", "message"),
    [
        (["+recipe=iris", "deploy=standalone"], {}, "deploy=k8s or deploy=sidecar"),
        (["env=prod"], {}, "no recipe given"),
        (["+recipe=iris", "server.host=127.0.0.1"], {}, "not reachable from outside the pod"),
        (
            ["+recipe=fraud", "feature_store.redis_url=redis://:hunter2@redis:6379/0"],
            {},
            "feature_store.redis_url: a secret written literally",
        ),
        (
            [
                "+recipe=fraud",
                "models.fraud.drift.actions=[{kind: webhook, url: 'http://hooks:9000/drift', "
                "allow_hosts: [hooks], headers: {Authorization: 'Bearer t0k'}}]",
            ],
            {},
            r"actions\[0\]\.headers\.Authorization: a secret written literally",
        ),
        (["+recipe=iris"], {"track": "blue"}, "--track"),
        (["+recipe=iris", "deploy=sidecar", "server.uds=null"], {}, "Unix socket"),
    ],
)
def test_render_refuses_what_cannot_work(
    overrides: list[str], opts: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        k8s.render(overrides, k8s.Options(**opts))


def test_cli_writes_files_options_before_or_after_overrides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "rendered"
    code = run(
        ["deploy", "k8s", "+recipe=fraud", "--image", "img:9", "env=prod", "--out", str(out)]
    )
    assert code == 0
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.yaml"))
    assert files == [
        "configmap.yaml",
        "deployment.yaml",
        "hpa.yaml",
        "kserve/configmap.yaml",
        "kserve/inferenceservice.yaml",
        "kserve/servingruntime.yaml",
        "kustomization.yaml",
        "pdb.yaml",
        "service.yaml",
        "servicemonitor.yaml",
    ]
    kustomization = yaml.safe_load((out / "kustomization.yaml").read_text())
    for name in kustomization["resources"]:
        assert (out / name).is_file()
    deployment = yaml.safe_load((out / "deployment.yaml").read_text())
    assert _container(deployment)["image"] == "img:9"
    _validate(deployment)
    err = capsys.readouterr().err
    assert "INFERCORE_REDIS_URL" in err  # the note says which variables the Secret needs

    # stdout: one multi-document stream, every document parseable.
    assert run(["deploy", "k8s", "--name", "scoring", "+recipe=iris", "env=prod"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"} == {"scoring"}
    assert "&id" not in yaml.safe_dump(docs)  # no YAML anchors


def test_cli_config_error_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["deploy", "k8s", "+recipe=iris", "deploy=standalone"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("infercore: config error: deploy:")


@pytest.mark.parametrize(
    ("overrides", "opts", "message"),
    [
        # What `serve` refuses before it listens, refused before a pod crash-loops on it.
        (["+recipe=iris", "server.workers=2", "admin.enabled=true"], {}, "^server.workers: 2"),
        (
            ["+recipe=iris", "admin.enabled=true", "admin.host=0.0.0.0", "admin.port=8080"],
            {},
            "^admin.port: 8080 is server.port too",
        ),
        # A recipe name is the ConfigMap key NAME.yaml and the pod's +recipe=NAME.
        (["+recipe=iris.yaml"], {}, "^recipe: 'iris.yaml' is a file name"),
        (["+recipe=fraud/../iris"], {}, "^recipe: 'fraud/../iris' is not a recipe name"),
        # Option values Kubernetes would reject, or that make no working pod.
        (["+recipe=iris"], {"replicas": 0}, "^--replicas: 0; must be >= 1"),
        (["+recipe=iris"], {"replicas": -1}, "^--replicas: -1"),
        (["+recipe=iris"], {"max_replicas": 0}, "^--max-replicas: 0"),
        (
            ["+recipe=iris"],
            {"replicas": 3, "max_replicas": 1},
            "^--max-replicas: 1 is below --replicas 3",
        ),
        (["+recipe=iris"], {"memory": "lots"}, "^--memory: 'lots' is not a memory quantity"),
        (["+recipe=iris"], {"memory": "0Gi"}, "^--memory: '0Gi'"),
        (["+recipe=iris"], {"cpu_target_percent": 0}, r"^--cpu-target: 0; must be 1\.\.100"),
        (["+recipe=iris"], {"cpu_target_percent": 101}, "^--cpu-target: 101"),
        (["+recipe=iris"], {"inflight_target": -3}, "^--inflight-target: -3; must be >= 1"),
        (["+recipe=iris"], {"inflight_target": 0}, "^--inflight-target: 0"),
        (["+recipe=iris"], {"image": ""}, "^--image: empty"),
        (["+recipe=iris"], {"image": "  "}, "^--image: empty"),
        (["+recipe=iris"], {"prestop_sleep_s": -5}, "^--prestop-sleep: -5; must be >= 0"),
    ],
)
def test_render_refuses_bad_options_and_what_serve_would_refuse(
    overrides: list[str], opts: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        k8s.render(overrides, k8s.Options(**opts))


@pytest.mark.parametrize("memory", ["2Gi", "512Mi", "1.5G", "1e9", "128974848"])
def test_memory_quantities_kubernetes_takes_are_accepted(memory: str) -> None:
    rendered = k8s.render(["+recipe=iris"], k8s.Options(memory=memory))
    resources = _container(_one(rendered, "Deployment"))["resources"]
    assert resources["limits"]["memory"] == memory
    _validate(_one(rendered, "Deployment"))


def test_write_to_a_file_or_an_unwritable_folder_is_a_config_error(tmp_path: Path) -> None:
    rendered = k8s.render(["+recipe=iris"], k8s.Options())
    a_file = tmp_path / "t.sh"
    a_file.write_text("")
    with pytest.raises(ConfigError, match=r"^--out: .*t\.sh' is a file, not a folder"):
        k8s.write(rendered, a_file)
    with pytest.raises(ConfigError, match=r"^--out: .*cannot write"):
        k8s.write(rendered, a_file / "below")
    assert a_file.read_text() == ""
