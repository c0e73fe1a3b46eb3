"""Kubernetes manifests for a recipe: ``infercore deploy k8s +recipe=NAME [env=…] [options]``.

``deploy=k8s`` (the default here) renders a ConfigMap with the composed recipe, a Deployment, a
Service, a HorizontalPodAutoscaler, a PodDisruptionBudget and a Prometheus ServiceMonitor, and a
KServe ServingRuntime + InferenceService (with their own ConfigMap). ``deploy=sidecar`` renders
the ConfigMap and a strategic-merge patch that adds infercore to an application's Deployment as
a native sidecar serving on a Unix socket in a shared ``emptyDir``.

Every value that the shutdown sequence depends on is derived from the composed
``server`` config (:func:`timings`) and checked again on the rendered Deployment
(:func:`check_timings`): the readiness probe notices the drain within ``drain_delay_s``, and
``terminationGracePeriodSeconds`` covers preStop + drain delay + graceful timeout + a margin.

``server.workers`` shapes the container (:func:`resources`): each worker is a separate process
with its own copy of the models, so the default CPU request and memory scale with the number of
workers; ``auto`` gets a CPU limit, which is what ``auto`` follows inside the container
(:func:`infercore.server.workers.available_cpus`). Every pod mounts a memory-backed ``emptyDir``
for the workers' Prometheus multiprocess folder (the root filesystem is read-only).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infercore.config.compose import Composed
from infercore.config.schema import ServerConfig
from infercore.deploy.recipe import compose_for_deploy, env_needed, render_recipe, set_path
from infercore.errors import ConfigError

#: The image's non-root user (see the Dockerfile).
RUN_AS = 10001
RECIPES_MOUNT = "/etc/infercore/recipes"
MODELS_MOUNT = "/models"
KSERVE_MODELS = "/mnt/models"
STATE_MOUNT = "/var/lib/infercore"
SOCKET_DIR = "/var/run/infercore"
SOCKET_PATH = f"{SOCKET_DIR}/infercore.sock"
#: The sidecar's admin socket: a folder of its own, mounted in the infercore container only (the
#: application shares SOCKET_DIR, and has no business with the admin API: S1).
ADMIN_SOCKET_DIR = "/var/run/infercore-admin"
ADMIN_SOCKET_PATH = f"{ADMIN_SOCKET_DIR}/admin.sock"
#: Parent of the workers' private Prometheus multiprocess folder (``INFERCORE_METRICS_DIR``).
METRICS_MOUNT = "/var/run/infercore-metrics"
#: ``infercore.server.workers.METRICS_PARENT_ENV`` (not imported: it would load the server).
METRICS_PARENT_ENV = "INFERCORE_METRICS_DIR"
#: tmpfs pages count against the container's memory limit; prometheus_client keeps a few
#: files per worker process (restarts included), each 64 KiB at first, so this is ample.
METRICS_SIZE = "64Mi"
#: Per worker process, when ``--cpu`` / ``--memory`` are not given.
CPU_PER_WORKER = 1
MEMORY_PER_WORKER_GI = 2
LIVE, READY = "/v2/health/live", "/v2/health/ready"
#: Seconds beyond preStop + drain delay + graceful timeout: idle-connection linger, component
#: stop and process exit.
MARGIN_S = 5
#: Readiness failures in a row before a pod leaves rotation.
READINESS_FAILURES = 2
#: The startup probe's period; the budget (import, config, model load before liveness
#: applies; for the sidecar, the time its models have to become ready before the kubelet
#: restarts it, since its startup probe is on readiness) is ``--startup-timeout``, default
#: :data:`DEFAULT_STARTUP_TIMEOUT_S`, in failures of this period.
STARTUP_PERIOD_S = 2
DEFAULT_STARTUP_TIMEOUT_S = 120
LIVENESS_PERIOD_S, LIVENESS_FAILURES = 10, 3
PROBE_TIMEOUT_S = 2
SIDECAR_READINESS_PERIOD_S = 5
#: ``--max-replicas`` when not given: this, or ``--replicas`` when that is higher.
DEFAULT_MAX_REPLICAS = 10
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass
class Options:
    """What ``infercore deploy k8s`` takes besides the Hydra overrides."""

    image: str = "infercore:latest"
    name: str | None = None
    namespace: str | None = None
    replicas: int = 2
    #: HPA / InferenceService maximum; ``None``: :data:`DEFAULT_MAX_REPLICAS`, or ``replicas``
    #: when that is higher. Given, it must be at least ``replicas``.
    max_replicas: int | None = None
    #: CPU request (``auto``: request and limit); default 1 per worker.
    cpu: str | None = None
    #: Memory request and limit; default 2Gi per worker.
    memory: str | None = None
    cpu_target_percent: int = 70
    #: Also scale on ``infercore_inflight_requests`` per pod (needs a custom-metrics adapter).
    inflight_target: int | None = None
    #: PersistentVolumeClaim holding the recipe's assets (default ``<name>-models``).
    models_claim: str | None = None
    #: Models are in the image (``/app/recipes``): no model volume.
    baked_models: bool = False
    prestop_sleep_s: int = 0
    #: Seconds a pod has to start (models loaded; for the sidecar, ready) before the kubelet
    #: restarts it.
    startup_timeout_s: int = DEFAULT_STARTUP_TIMEOUT_S
    #: ``stable`` renders everything; ``canary`` only a ``NAME-canary`` Deployment (and its
    #: ConfigMap) whose pods the stable Service also selects: traffic splits by replica count.
    track: str = "stable"
    #: ``deploy=sidecar``: the application's Deployment and container to patch.
    app: str = "my-app"
    app_container: str = "app"


@dataclass(frozen=True)
class Timings:
    drain_delay_s: float
    graceful_timeout_s: float
    prestop_s: int
    readiness_period_s: int
    readiness_failures: int
    termination_grace_s: int


@dataclass
class Rendered:
    """Manifests by file name (relative to the output folder), each a list of documents."""

    files: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def documents(self, prefix: str = "") -> list[dict[str, Any]]:
        return [d for name, docs in self.files.items() if name.startswith(prefix) for d in docs]


def timings(server: ServerConfig, prestop_s: int = 0) -> Timings:
    """Probe and termination timings that agree with the server's shutdown settings."""
    window = prestop_s + server.drain_delay_s
    if window < 1:
        raise ConfigError(
            f"server.drain_delay_s: {server.drain_delay_s} leaves Kubernetes no time to take "
            "the pod out of rotation before it stops accepting",
            hint="use deploy=k8s (drain_delay_s: 5), set server.drain_delay_s>=1, or pass "
            "--prestop-sleep",
        )
    period = max(1, min(5, math.floor(window / READINESS_FAILURES)))
    grace = math.ceil(prestop_s + server.drain_delay_s + server.graceful_timeout_s + MARGIN_S)
    return Timings(
        drain_delay_s=server.drain_delay_s,
        graceful_timeout_s=server.graceful_timeout_s,
        prestop_s=prestop_s,
        readiness_period_s=period,
        readiness_failures=READINESS_FAILURES,
        termination_grace_s=grace,
    )


def check_timings(deployment: dict[str, Any], server: ServerConfig) -> list[str]:
    """What disagrees between a rendered Deployment and the server's shutdown settings."""
    problems: list[str] = []
    spec = deployment["spec"]["template"]["spec"]
    container = next(c for c in spec["containers"] if c["name"] == "infercore")
    prestop = 0
    hook = container.get("lifecycle", {}).get("preStop")
    if hook is not None:
        command = hook.get("exec", {}).get("command", [])
        if len(command) != 2 or command[0] != "sleep":
            problems.append(f"preStop is not `sleep N`: {hook}")
        else:
            prestop = int(command[1])
    grace = spec.get("terminationGracePeriodSeconds", 30)
    needed = prestop + server.drain_delay_s + server.graceful_timeout_s + MARGIN_S
    if grace < needed:
        problems.append(
            f"terminationGracePeriodSeconds {grace} < preStop {prestop} + drain_delay_s "
            f"{server.drain_delay_s} + graceful_timeout_s {server.graceful_timeout_s} + "
            f"{MARGIN_S}"
        )
    ready = container.get("readinessProbe", {})
    live = container.get("livenessProbe", {})
    startup = container.get("startupProbe", {})
    for probe, path, what in ((ready, READY, "readiness"), (live, LIVE, "liveness")):
        got = probe.get("httpGet", {}).get("path")
        if got != path:
            problems.append(f"{what} probe path {got!r} is not {path}")
    if startup.get("httpGet", {}).get("path") != LIVE:
        problems.append("startup probe does not use /v2/health/live")
    noticed = ready.get("periodSeconds", 10) * ready.get("failureThreshold", 3)
    if noticed > prestop + server.drain_delay_s:
        problems.append(
            f"readiness notices the drain after {noticed}s, later than preStop {prestop} + "
            f"drain_delay_s {server.drain_delay_s}"
        )
    for probe, what in ((ready, "readiness"), (live, "liveness"), (startup, "startup")):
        if probe.get("timeoutSeconds", 1) > probe.get("periodSeconds", 10):
            problems.append(f"{what} probe timeout is longer than its period")
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "http")
    if port != server.port:
        problems.append(f"containerPort {port} is not server.port {server.port}")
    return problems


# --- building blocks ---------------------------------------------------------------------


def _dns_name(text: str, what: str) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:63].strip("-")
    if not _LABEL.match(name):
        raise ConfigError(f"{what}: {text!r} does not make a Kubernetes name")
    return name


def _labels(name: str, component: str = "inference") -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "infercore",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "infercore-deploy",
    }


def _selector(name: str) -> dict[str, str]:
    """What the Service, PDB and ServiceMonitor select: stable and canary pods alike."""
    return {"app.kubernetes.io/name": "infercore", "app.kubernetes.io/instance": name}


TRACK_LABEL = "infercore.dev/track"


def _meta(name: str, namespace: str | None, labels: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": dict(labels)}
    if namespace:
        meta["namespace"] = namespace
    return meta


def _container_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _feast_nodes(composed: Composed) -> list[str]:
    """Config paths of the feature-source nodes of kind ``feast`` (their state needs a volume)."""
    cfg = composed.config
    paths: list[str] = []
    if cfg.features.get("kind") == "feast" and any(m.features is None for m in cfg.models.values()):
        paths.append("features")
    for name, model in cfg.models.items():
        if model.features is not None and model.features.get("kind") == "feast":
            paths.append(f"models.{name}.features")
    return paths


def _recipe_configmap(
    composed: Composed,
    data: dict[str, Any],
    *,
    name: str,
    namespace: str | None,
    labels: dict[str, str],
    model_root: str,
    source: list[str],
    extra: dict[str, Any],
) -> tuple[dict[str, Any], str, str]:
    """(ConfigMap, recipe name, sha256 of the recipe text)."""
    recipe = composed.choices.get("recipe")
    assert recipe, "render() refuses a config without a recipe"
    body = dict(data)
    body["model_root"] = model_root
    for key, value in extra.items():
        set_path(body, key, value)
    state = [k for k in extra if k.endswith("registry_path")]
    note = (
        f"model_root is the model volume ({model_root}); "
        + (f"Feast state ({', '.join(state)}) lives in {STATE_MOUNT}." if state else "")
    ).strip()
    text = render_recipe(composed, body, source=source, note=note)
    digest = hashlib.sha256(text.encode()).hexdigest()
    cm = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(name, namespace, labels),
        "data": {f"{recipe}.yaml": text},
    }
    return cm, recipe, digest


def _feast_state(composed: Composed) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    for i, path in enumerate(_feast_nodes(composed)):
        folder = f"{STATE_MOUNT}/feast/{i}"
        extra[f"{path}.registry_path"] = f"{folder}/registry.db"
        extra[f"{path}.sqlite_path"] = f"{folder}/online_store.db"
    return extra


def _env(
    port: int | None, secret: str, *, uds: bool = False, admin_uds: bool = False
) -> dict[str, Any]:
    env: list[dict[str, Any]] = [
        {"name": "INFERCORE_RECIPES_DIR", "value": RECIPES_MOUNT},
        {"name": "HOME", "value": "/tmp"},
        {"name": "FEAST_USAGE", "value": "False"},
        {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
        # server.workers > 1: the supervisor's private metrics folder goes in a writable tmpfs.
        {"name": METRICS_PARENT_ENV, "value": METRICS_MOUNT},
    ]
    if port is not None:
        env.append({"name": "INFERCORE_PORT", "value": str(port)})
    if uds:
        env.append({"name": "INFERCORE_UDS", "value": SOCKET_PATH})
    if admin_uds:
        env.append({"name": "INFERCORE_ADMIN_UDS", "value": ADMIN_SOCKET_PATH})
        # `kubectl exec … -c infercore -- infercore models …` reaches the admin API unaided.
        env.append({"name": "INFERCORE_ADMIN_URL", "value": f"unix:{ADMIN_SOCKET_PATH}"})
    return {
        "env": env,
        # Addresses and secrets the recipe reads with ${oc.env:VAR} (INFERCORE_REDIS_URL …).
        "envFrom": [{"secretRef": {"name": secret, "optional": True}}],
    }


def _volumes(
    recipe_cm: str,
    *,
    claim: str | None,
    feast: bool,
    prefix: str = "",
    socket: bool = False,
    admin_socket: bool = False,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts) for the infercore container."""
    volumes: list[dict[str, Any]] = [
        {"name": f"{prefix}recipe", "configMap": {"name": recipe_cm}},
        {"name": f"{prefix}tmp", "emptyDir": {"sizeLimit": "256Mi"}},
        # Mounted whatever server.workers says (harmless with one): a worker count changed in
        # the ConfigMap or the args later still finds it. Memory-backed, as Prometheus
        # suggests for multiprocess mode (samples are mmapped files written on every update).
        {"name": f"{prefix}metrics", "emptyDir": {"medium": "Memory", "sizeLimit": METRICS_SIZE}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": f"{prefix}recipe", "mountPath": RECIPES_MOUNT, "readOnly": True},
        {"name": f"{prefix}tmp", "mountPath": "/tmp"},
        {"name": f"{prefix}metrics", "mountPath": METRICS_MOUNT},
    ]
    if claim is not None:
        volumes.append(
            {
                "name": f"{prefix}models",
                "persistentVolumeClaim": {"claimName": claim, "readOnly": True},
            }
        )
        mounts.append({"name": f"{prefix}models", "mountPath": MODELS_MOUNT, "readOnly": True})
    if feast:
        volumes.append({"name": f"{prefix}state", "emptyDir": {"sizeLimit": "1Gi"}})
        mounts.append({"name": f"{prefix}state", "mountPath": STATE_MOUNT})
    if socket:
        volumes.append(
            {"name": f"{prefix}socket", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}
        )
        mounts.append({"name": f"{prefix}socket", "mountPath": SOCKET_DIR})
    if admin_socket:
        # The admin listener binds in a folder that must exist (the root filesystem is
        # read-only and /tmp an empty emptyDir): a folder of its own, not shared with the app.
        volumes.append(
            {"name": f"{prefix}admin-socket", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}
        )
        mounts.append({"name": f"{prefix}admin-socket", "mountPath": ADMIN_SOCKET_DIR})
    return volumes, mounts


#: A Kubernetes quantity (resource.Quantity): a decimal number, then a binary suffix (Ki … Ei),
#: a decimal one (m, k, M … E) or an exponent (e3).
_QUANTITY = re.compile(
    r"^(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E|[eE][-+]?[0-9]+)?$"
)


def check_options(opts: Options) -> None:
    """Refuse option values that would render manifests Kubernetes rejects or cannot run.

    Raises:
        ConfigError: One line naming the option (``--replicas: …``).
    """
    if not opts.image.strip():
        raise ConfigError("--image: empty", hint="name the container image, e.g. infercore:1.0")
    # Kubernetes refuses any other namespace (kubectl apply fails on every manifest).
    if opts.namespace is not None and not _LABEL.match(opts.namespace):
        raise ConfigError(
            f"--namespace: {opts.namespace!r} is not a Kubernetes namespace name",
            hint="use at most 63 lowercase letters, digits and '-', starting and ending with a "
            "letter or digit (an RFC 1123 label)",
        )
    if opts.replicas < 1:
        raise ConfigError(f"--replicas: {opts.replicas}; must be >= 1")
    if opts.max_replicas is not None:
        if opts.max_replicas < 1:
            raise ConfigError(f"--max-replicas: {opts.max_replicas}; must be >= 1")
        # Rendering max(both) would let the HPA scale beyond the maximum the user gave.
        if opts.max_replicas < opts.replicas:
            raise ConfigError(
                f"--max-replicas: {opts.max_replicas} is below --replicas {opts.replicas} (the "
                "autoscaler's minimum)",
                hint=f"pass --max-replicas {opts.replicas} or more, or fewer --replicas",
            )
    if not 1 <= opts.cpu_target_percent <= 100:
        raise ConfigError(f"--cpu-target: {opts.cpu_target_percent}; must be 1..100 (percent)")
    if opts.inflight_target is not None and opts.inflight_target < 1:
        raise ConfigError(f"--inflight-target: {opts.inflight_target}; must be >= 1")
    if opts.prestop_sleep_s < 0:
        raise ConfigError(f"--prestop-sleep: {opts.prestop_sleep_s}; must be >= 0 (seconds)")
    if opts.startup_timeout_s < STARTUP_PERIOD_S:
        raise ConfigError(
            f"--startup-timeout: {opts.startup_timeout_s}; must be >= {STARTUP_PERIOD_S} (seconds)",
            hint="the seconds the slowest model takes to load and warm, with room to spare",
        )
    if opts.cpu is not None:
        cpu_cores(opts.cpu)
    if opts.memory is not None:
        text = opts.memory.strip()
        if not _QUANTITY.match(text) or float(re.split(r"[A-Za-z]", text, maxsplit=1)[0]) <= 0:
            raise ConfigError(
                f"--memory: {opts.memory!r} is not a memory quantity",
                hint="use a Kubernetes quantity, e.g. 2Gi or 512Mi",
            )


def startup_failures(opts: Options) -> int:
    """The startup probe's ``failureThreshold``: ``--startup-timeout`` in probe periods."""
    return math.ceil(opts.startup_timeout_s / STARTUP_PERIOD_S)


def max_replicas(opts: Options) -> int:
    """The autoscaler's maximum: ``--max-replicas``, else the default or ``--replicas``."""
    if opts.max_replicas is not None:
        return opts.max_replicas
    return max(DEFAULT_MAX_REPLICAS, opts.replicas)


def cpu_cores(quantity: str) -> float:
    """A Kubernetes CPU quantity (``2``, ``1.5``, ``500m``) in cores."""
    text = quantity.strip()
    try:
        cores = float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        cores = -1.0
    if not math.isfinite(cores) or cores <= 0:
        raise ConfigError(
            f"--cpu: {quantity!r} is not a CPU quantity", hint="use cores (2, 1.5) or 500m"
        )
    return cores


def pod_workers(server: ServerConfig, opts: Options) -> int:
    """Worker processes in each pod: ``server.workers``, or for ``auto`` the CPU limit
    rounded up (what :func:`infercore.server.workers.available_cpus` will find)."""
    if server.workers == "auto":
        return max(1, math.ceil(cpu_cores(opts.cpu or str(CPU_PER_WORKER))))
    return server.workers


def resources(server: ServerConfig, opts: Options) -> dict[str, Any]:
    """Requests and limits of the infercore container.

    ``--cpu`` and ``--memory``, each when given, are taken as they are. Otherwise the CPU
    request is 1 per worker and memory (request = limit) 2Gi per worker: workers are spawned,
    not forked, so none shares its models or Python heap with another. No CPU limit
    (throttling shows up as tail latency), except with ``server.workers=auto``: there the
    limit (= the request) is what ``auto`` counts, so the pod decides the number of workers.
    """
    if opts.cpu is not None:
        cpu_cores(opts.cpu)  # a typo fails here, not at kubectl apply
    n = pod_workers(server, opts)
    cpu = opts.cpu or str(CPU_PER_WORKER * (1 if server.workers == "auto" else n))
    memory = opts.memory or f"{MEMORY_PER_WORKER_GI * n}Gi"
    limits = {"cpu": cpu, "memory": memory} if server.workers == "auto" else {"memory": memory}
    return {"requests": {"cpu": cpu, "memory": memory}, "limits": limits}


def _http_probe(path: str, period: int, failures: int, port: int | str = "http") -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period,
        "timeoutSeconds": min(PROBE_TIMEOUT_S, period),
        "failureThreshold": failures,
    }


def _exec_probe(path: str, period: int, failures: int) -> dict[str, Any]:
    timeout = min(PROBE_TIMEOUT_S, period)
    return {
        "exec": {
            "command": [
                "python",
                "-m",
                "infercore.deploy.probe",
                "--timeout",
                str(timeout),
                "--uds",
                SOCKET_PATH,
                path,
            ]
        },
        "periodSeconds": period,
        "timeoutSeconds": timeout + 1,
        "failureThreshold": failures,
    }


# --- the shapes --------------------------------------------------------------------------


def render(overrides: list[str], opts: Options) -> Rendered:
    """Compose the overrides (``deploy=k8s`` unless another shape is named) and render."""
    check_options(opts)
    overrides = list(overrides)
    if not any(o.lstrip("+~").startswith("deploy=") for o in overrides):
        overrides.append("deploy=k8s")
    composed, data = compose_for_deploy(overrides)
    if not composed.choices.get("recipe"):
        raise ConfigError("deploy: no recipe given", hint="add +recipe=NAME")
    from infercore.cli import check_before_listen

    # What `serve` would refuse in the pod (the token and files are the pod's own: not here).
    check_before_listen(composed, pod_workers(composed.config.server, opts), local=False)
    shape = composed.choices.get("deploy")
    if shape == "k8s":
        return _render_k8s(composed, data, overrides, opts)
    if shape == "sidecar":
        return _render_sidecar(composed, data, overrides, opts)
    raise ConfigError(
        f"deploy: infercore deploy k8s renders deploy=k8s or deploy=sidecar, not {shape!r}",
        hint="drop the deploy= override, or use deploy=sidecar",
    )


def _render_k8s(
    composed: Composed, data: dict[str, Any], overrides: list[str], opts: Options
) -> Rendered:
    server = composed.config.server
    if server.uds is not None:
        raise ConfigError("server.uds: a pod serves on TCP; set server.uds=null")
    if server.host not in ("0.0.0.0", "::"):
        raise ConfigError(
            f"server.host: {server.host!r} is not reachable from outside the pod",
            hint="keep deploy=k8s's 0.0.0.0",
        )
    recipe = composed.choices.get("recipe", "")
    name = _dns_name(opts.name or f"infercore-{recipe}", "--name")
    if opts.track not in ("stable", "canary"):
        raise ConfigError(f"--track: {opts.track!r}; use stable or canary")
    canary = opts.track == "canary"
    deploy_name = f"{name}-canary" if canary else name
    ns = opts.namespace
    labels = _labels(name)
    t = timings(server, opts.prestop_sleep_s)
    claim = None if opts.baked_models else (opts.models_claim or f"{name}-models")
    model_root = "/app/recipes" if opts.baked_models else MODELS_MOUNT
    feast = _feast_state(composed)
    cm, recipe, digest = _recipe_configmap(
        composed,
        data,
        name=f"{deploy_name}-recipe",
        namespace=ns,
        labels=labels,
        model_root=model_root,
        source=overrides,
        extra=feast,
    )
    secret = f"{name}-env"
    volumes, mounts = _volumes(f"{deploy_name}-recipe", claim=claim, feast=bool(feast))
    container: dict[str, Any] = {
        "name": "infercore",
        "image": opts.image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["serve", f"+recipe={recipe}"],
        **_env(server.port, secret),
        "ports": [{"name": "http", "containerPort": server.port, "protocol": "TCP"}],
        "startupProbe": _http_probe(LIVE, STARTUP_PERIOD_S, startup_failures(opts)),
        "livenessProbe": _http_probe(LIVE, LIVENESS_PERIOD_S, LIVENESS_FAILURES),
        "readinessProbe": _http_probe(READY, t.readiness_period_s, t.readiness_failures),
        "resources": resources(server, opts),
        "securityContext": _container_security(),
        "volumeMounts": mounts,
    }
    if t.prestop_s > 0:
        container["lifecycle"] = {"preStop": {"exec": {"command": ["sleep", str(t.prestop_s)]}}}
    selector = _selector(name)
    tracked = {**selector, TRACK_LABEL: opts.track}
    pod_labels = {**labels, TRACK_LABEL: opts.track}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(deploy_name, ns, pod_labels),
        "spec": {
            "replicas": opts.replicas,
            "revisionHistoryLimit": 5,
            "selector": {"matchLabels": tracked},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": {"infercore.dev/recipe-sha256": digest},
                },
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "terminationGracePeriodSeconds": t.termination_grace_s,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": RUN_AS,
                        "runAsGroup": RUN_AS,
                        "fsGroup": RUN_AS,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "topologySpreadConstraints": [
                        {
                            "maxSkew": 1,
                            "topologyKey": "kubernetes.io/hostname",
                            "whenUnsatisfiable": "ScheduleAnyway",
                            "labelSelector": {"matchLabels": selector},
                        }
                    ],
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }
    problems = check_timings(deployment, server)
    if problems:  # pragma: no cover - timings() derives them; this guards future edits
        raise ConfigError("deploy: inconsistent shutdown timings: " + "; ".join(problems))
    if canary:
        out = Rendered()
        out.files["configmap.yaml"] = [cm]
        out.files["deployment.yaml"] = [deployment]
        out.files["kustomization.yaml"] = [
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": ["configmap.yaml", "deployment.yaml"],
            }
        ]
        out.notes.append(
            f"the Service {name!r} of the stable track also selects these pods: the canary takes "
            f"about {opts.replicas}/(stable replicas + {opts.replicas}) of the traffic"
        )
        return out
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(name, ns, labels),
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [
                {"name": "http", "port": server.port, "targetPort": "http", "protocol": "TCP"}
            ],
        },
    }
    metrics: list[dict[str, Any]] = [
        {
            "type": "Resource",
            "resource": {
                "name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": opts.cpu_target_percent},
            },
        }
    ]
    if opts.inflight_target is not None:
        metrics.append(
            {
                "type": "Pods",
                "pods": {
                    "metric": {"name": "infercore_inflight_requests"},
                    "target": {"type": "AverageValue", "averageValue": str(opts.inflight_target)},
                },
            }
        )
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(name, ns, labels),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": opts.replicas,
            "maxReplicas": max_replicas(opts),
            "metrics": metrics,
            "behavior": {
                "scaleDown": {
                    "stabilizationWindowSeconds": 300,
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
                }
            },
        },
    }
    pdb = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(name, ns, labels),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector}},
    }
    monitor = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _meta(name, ns, labels),
        "spec": {
            "selector": {"matchLabels": selector},
            "endpoints": [
                {"port": "http", "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s"}
            ],
        },
    }
    out = Rendered()
    out.files["configmap.yaml"] = [cm]
    out.files["deployment.yaml"] = [deployment]
    out.files["service.yaml"] = [service]
    out.files["hpa.yaml"] = [hpa]
    out.files["pdb.yaml"] = [pdb]
    out.files["servicemonitor.yaml"] = [monitor]
    out.files["kustomization.yaml"] = [
        {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [
                "configmap.yaml",
                "deployment.yaml",
                "service.yaml",
                "hpa.yaml",
                "pdb.yaml",
                "servicemonitor.yaml",
            ],
        }
    ]
    _render_kserve(out, composed, data, overrides, opts, name=name, secret=secret, feast=feast)
    out.notes.extend(_workers_notes(server, opts))
    out.notes.extend(_notes(composed, data, claim, secret))
    return out


def _render_kserve(
    out: Rendered,
    composed: Composed,
    data: dict[str, Any],
    overrides: list[str],
    opts: Options,
    *,
    name: str,
    secret: str,
    feast: dict[str, Any],
) -> None:
    """A V2 custom runtime for teams on KServe; models come from ``storageUri`` at /mnt/models."""
    server = composed.config.server
    ns = opts.namespace
    labels = _labels(name, "kserve")
    cm, recipe, digest = _recipe_configmap(
        composed,
        data,
        name=f"{name}-kserve-recipe",
        namespace=ns,
        labels=labels,
        model_root="/app/recipes" if opts.baked_models else KSERVE_MODELS,
        source=overrides,
        extra=feast,
    )
    volumes, mounts = _volumes(f"{name}-kserve-recipe", claim=None, feast=bool(feast))
    port = 8080  # KServe routes to the runtime's 8080
    t = timings(server, opts.prestop_sleep_s)
    # Without a readiness probe Knative probes the TCP port, which infercore opens while its
    # models still load (liveness answers then, P4): pods would take traffic and answer 503.
    # Knative takes a probe port only if it is the container's port (by number here: Knative
    # allows no port name but http1/h2c). No startupProbe: Knative before 1.15 refuses one, and
    # it turns off Knative's fast readiness probing; liveness waits out the same startup budget
    # instead (it answers while models load, so only a start that hangs is restarted).
    readiness = _http_probe(READY, t.readiness_period_s, t.readiness_failures, port)
    liveness = _http_probe(LIVE, LIVENESS_PERIOD_S, LIVENESS_FAILURES, port)
    liveness["initialDelaySeconds"] = STARTUP_PERIOD_S * startup_failures(opts)
    runtime = {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "ServingRuntime",
        "metadata": _meta(name, ns, labels),
        "spec": {
            "annotations": {
                "prometheus.kserve.io/port": str(port),
                "prometheus.kserve.io/path": "/metrics",
                "infercore.dev/recipe-sha256": digest,
            },
            "supportedModelFormats": [{"name": name, "version": "1", "autoSelect": True}],
            "protocolVersions": ["v2"],
            "multiModel": False,
            "containers": [
                {
                    "name": "kserve-container",
                    "image": opts.image,
                    "args": ["serve", f"+recipe={recipe}", f"server.port={port}"],
                    **_env(port, secret),
                    "ports": [{"containerPort": port, "protocol": "TCP"}],
                    "readinessProbe": readiness,
                    "livenessProbe": liveness,
                    "resources": resources(server, opts),
                    "securityContext": _container_security(),
                    "volumeMounts": mounts,
                }
            ],
            "volumes": volumes,
        },
    }
    models = list(composed.config.models)
    isvc_name = _dns_name(models[0] if len(models) == 1 else name, "InferenceService name")
    claim = opts.models_claim or f"{name}-models"
    isvc = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": _meta(isvc_name, ns, labels),
        "spec": {
            "predictor": {
                "minReplicas": opts.replicas,
                "maxReplicas": max_replicas(opts),
                "terminationGracePeriodSeconds": t.termination_grace_s,
                "model": {
                    "modelFormat": {"name": name},
                    "runtime": name,
                    "protocolVersion": "v2",
                    # Baked models: nothing for KServe's storage initializer to fetch.
                    **({} if opts.baked_models else {"storageUri": f"pvc://{claim}"}),
                },
            }
        },
    }
    out.files["kserve/configmap.yaml"] = [cm]
    out.files["kserve/servingruntime.yaml"] = [runtime]
    out.files["kserve/inferenceservice.yaml"] = [isvc]


def _render_sidecar(
    composed: Composed, data: dict[str, Any], overrides: list[str], opts: Options
) -> Rendered:
    server = composed.config.server
    if server.uds is None:
        raise ConfigError(
            "server.uds: the rendered sidecar serves on a Unix socket in a shared emptyDir",
            hint="keep deploy=sidecar's server.uds",
        )
    recipe = composed.choices.get("recipe", "")
    name = _dns_name(opts.name or f"infercore-{recipe}", "--name")
    ns = opts.namespace
    labels = _labels(name, "sidecar")
    claim = None if opts.baked_models else (opts.models_claim or f"{name}-models")
    feast = _feast_state(composed)
    extra: dict[str, Any] = {
        **feast,
        "server.uds": "${oc.env:INFERCORE_UDS," + SOCKET_PATH + "}",
    }
    admin = composed.config.admin
    # Like server.uds, the pod's layout decides where the admin socket goes: deploy=sidecar's
    # default (/tmp/infercore/admin.sock) is in no folder the pod mounts for it, and the admin
    # socket gets a folder of its own, which the application does not mount.
    admin_socket = admin.enabled and admin.uds is not None
    if admin_socket:
        extra["admin.uds"] = "${oc.env:INFERCORE_ADMIN_UDS," + ADMIN_SOCKET_PATH + "}"
    cm, recipe, digest = _recipe_configmap(
        composed,
        data,
        name=f"{name}-recipe",
        namespace=ns,
        labels=labels,
        model_root="/app/recipes" if opts.baked_models else MODELS_MOUNT,
        source=overrides,
        extra=extra,
    )
    secret = f"{name}-env"
    volumes, mounts = _volumes(
        f"{name}-recipe",
        claim=claim,
        feast=bool(feast),
        prefix="infercore-",
        socket=True,
        admin_socket=admin_socket,
    )
    sidecar: dict[str, Any] = {
        "name": "infercore",
        "image": opts.image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["serve", f"+recipe={recipe}"],
        **_env(None, secret, uds=True, admin_uds=admin_socket),
        # A native sidecar (Kubernetes >= 1.29): started before the application's containers,
        # stopped after them, so the application can call it until it has drained.
        "restartPolicy": "Always",
        # A native sidecar's startup probe is what holds the application's containers back:
        # on readiness, they start once the models are loaded and warmed, not once the
        # process answers (they would get 503 model_not_ready). Liveness stays liveness.
        "startupProbe": _exec_probe(READY, STARTUP_PERIOD_S, startup_failures(opts)),
        "livenessProbe": _exec_probe(LIVE, LIVENESS_PERIOD_S, LIVENESS_FAILURES),
        "readinessProbe": _exec_probe(READY, SIDECAR_READINESS_PERIOD_S, READINESS_FAILURES),
        "resources": resources(server, opts),
        "securityContext": _container_security(),
        "volumeMounts": mounts,
    }
    patch = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": opts.app, **({"namespace": ns} if ns else {})},
        "spec": {
            "template": {
                "metadata": {"annotations": {"infercore.dev/recipe-sha256": digest}},
                "spec": {
                    "initContainers": [sidecar],
                    "containers": [
                        {
                            "name": opts.app_container,
                            "env": [{"name": "INFERCORE_SOCKET", "value": SOCKET_PATH}],
                            "volumeMounts": [{"name": "infercore-socket", "mountPath": SOCKET_DIR}],
                        }
                    ],
                    "volumes": volumes,
                },
            }
        },
    }
    out = Rendered()
    out.files["configmap.yaml"] = [cm]
    out.files["sidecar-patch.yaml"] = [patch]
    out.files["kustomization.yaml"] = [
        {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": ["configmap.yaml"],
            "patches": [{"path": "sidecar-patch.yaml"}],
        }
    ]
    grace = math.ceil(server.graceful_timeout_s + MARGIN_S)
    out.notes.append(
        f"add the application's own Deployment to kustomization.yaml's resources; the pod's "
        f"terminationGracePeriodSeconds must cover the application's drain plus {grace}s for "
        "infercore (it stops after the application's containers)"
    )
    out.notes.append(f"the application calls http://localhost/... over {SOCKET_PATH}")
    if admin_socket:
        command = "kubectl exec POD -c infercore -- infercore models list"
        if admin.tokens_file is not None:
            # Not on the exec's command line, nor in an environment set there: that command
            # is in the shell's history and the API server's audit log (the exec request's
            # URL). The person's own file instead, sent on stdin.
            command = (
                "kubectl exec -i POD -c infercore -- infercore models --token-file /dev/stdin "
                "list < ~/.infercore-admin-token"
            )
            token = (
                "your own from admin.tokens_file, kept in a file of yours (chmod 600) and sent "
                "on stdin, never on the exec's command line"
            )
        elif admin.auth_file is not None:
            token = "admin.auth_file"
        else:
            token = f"${admin.auth_env}, from the Secret {secret!r}"

        out.notes.append(
            f"the admin API listens on {ADMIN_SOCKET_PATH}, in the infercore container only: "
            f"{command} (its token: {token})"
        )
    out.notes.extend(_workers_notes(server, opts))
    out.notes.extend(_notes(composed, data, claim, secret))
    return out


def _workers_notes(server: ServerConfig, opts: Options) -> list[str]:
    if server.workers == 1:
        return []
    n = pod_workers(server, opts)
    res = resources(server, opts)["requests"]
    if server.workers == "auto":
        return [
            f"server.workers=auto: {n} worker process(es) per pod, following the CPU limit "
            f"{res['cpu']} (--cpu); memory {res['memory']}"
        ]
    return [f"server.workers={n}: requests cpu {res['cpu']}, memory {res['memory']} per pod"]


#: Listen addresses: the rendered pod sets or pins them, no Secret holds them.
_POD_ADDRESSES = ("INFERCORE_PORT", "INFERCORE_HOST", "INFERCORE_UDS", "INFERCORE_ADMIN_UDS")


def _notes(composed: Composed, data: dict[str, Any], claim: str | None, secret: str) -> list[str]:
    notes: list[str] = []
    if claim is not None:
        notes.append(
            f"models: a PersistentVolumeClaim {claim!r} holding the recipes folder's assets "
            f"(mounted read-only at {MODELS_MOUNT}); or --baked-models with an image built "
            "with RECIPES=baked"
        )
    wanted = {
        var: where
        for var, where in env_needed(data, composed.data).items()
        if var not in _POD_ADDRESSES
    }
    admin = composed.config.admin
    if admin.enabled:
        # Without its token the pod exits 2 at start: the Secret must hold it.
        if admin.tokens_file is not None:
            notes.append(
                f"admin.tokens_file: the admin API reads its named tokens from "
                f"{admin.tokens_file!r} in the pod; mount the file there from a Secret with "
                "defaultMode: 0400 (a file other users can read is refused; a pod's fsGroup, "
                "which the rendered Deployment sets, makes it 0440, readable by the pod's own "
                "group: accepted in a pod without a warning)"
            )
        elif admin.auth_file is None:
            wanted.setdefault(admin.auth_env, "admin.auth_env: the admin API's bearer token")
        else:
            notes.append(
                f"admin.auth_file: the admin API reads its token from {admin.auth_file!r} in "
                "the pod; mount the file there from a Secret"
            )
    if wanted:
        listed = ", ".join(f"{var} ({where})" for var, where in wanted.items())
        notes.append(
            f"environment: the pod reads {listed}; put {'it' if len(wanted) == 1 else 'them'} "
            f"in the Secret {secret!r} (kubectl create secret generic {secret} "
            "--from-literal=NAME=VALUE)"
        )
    return notes


# --- output ------------------------------------------------------------------------------


def to_yaml(docs: list[dict[str, Any]]) -> str:
    import yaml

    class _Dumper(yaml.SafeDumper):  # type: ignore[misc]
        def ignore_aliases(self, data: Any) -> bool:  # no &id001 anchors in manifests
            return True

    def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    _Dumper.add_representer(str, _str)
    return "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=100) for d in docs)


def write(rendered: Rendered, folder: Path) -> list[Path]:
    """One file per manifest under ``folder`` (made if missing).

    Raises:
        ConfigError: ``--out`` is a file, or a folder that cannot be made or written.
    """
    written: list[Path] = []
    for name, docs in rendered.files.items():
        path = folder / name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(to_yaml(docs))
        except OSError as exc:
            what = "is a file, not a folder" if folder.is_file() else f"cannot write {name}"
            raise ConfigError(
                f"--out: {str(folder)!r} {what} ({exc.strerror or type(exc).__name__})",
                hint="name a folder that you can write (it is made if missing)",
            ) from None
        written.append(path)
    return written
