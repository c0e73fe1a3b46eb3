"""Dockerfile, .dockerignore and compose.yaml, checked without a Docker engine: the files parse,
reference files that exist, the final image stage is lean and non-root with a health check, and
the compose stack's pieces point at each other (ports, paths, the scrape target)."""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from infercore.config.compose import compose
from infercore.deploy import k8s
from infercore.registry import Registry
from infercore.runtime import Runtime

REPO = Path(__file__).resolve().parents[2]
COMPILERS = ("gcc", "g++", "clang", "build-essential", "make", "cmake", "rustc", "cargo")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [args for o, args in self.instructions if o == op]


def _instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, args = line.partition(" ")
        out.append((op.upper(), " ".join(args.split())))
    return out


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages)."""
    return _parse_dockerfile()


def _parse_dockerfile() -> tuple[dict[str, str], list[Stage]]:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for op, rest in _instructions((REPO / "Dockerfile").read_text()):
        if op == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        elif not stages:
            if op == "ARG":
                key, _, value = rest.partition("=")
                args[key] = value.strip('"')
        else:
            stages[-1].instructions.append((op, rest))
    return args, stages


def _expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), text)


def _ignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").removeprefix("**/")
        hit = (
            fnmatch.fnmatch(path, pat)
            or any(fnmatch.fnmatch(part, pat) for part in Path(path).parts)
            or path.startswith(pat.rstrip("/") + "/")
        )
        if hit:
            ignored = not negate
    return ignored


def _dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def test_final_stage_is_slim_non_root_with_a_health_check(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    args, stages = dockerfile
    final = stages[-1]
    assert final.name == "runtime"
    assert _expand(final.base, args) == "python:3.11-slim"
    (user,) = final.all("USER")
    assert user.split(":")[0] not in ("root", "0")
    uid = next(a for a in final.all("ARG") if a.startswith("UID="))
    assert int(uid.split("=")[1]) == k8s.RUN_AS  # the manifests' runAsUser
    (health,) = final.all("HEALTHCHECK")
    assert "/v2/health/live" in health and "infercore.deploy.probe" in health
    assert json.loads(final.all("ENTRYPOINT")[0]) == ["infercore"]
    cmd = json.loads(final.all("CMD")[0])
    assert cmd[0] == "serve" and "server.host=0.0.0.0" in cmd
    env = " ".join(final.all("ENV"))
    assert "INFERCORE_HOST=0.0.0.0" in env  # set explicitly, not left to a default
    # No compilers, no package manager installs, no uv in what ships.
    for run_args in final.all("RUN"):
        assert "apt-get install" not in run_args and "pip install" not in run_args
        assert not any(re.search(rf"\b{re.escape(c)}\b", run_args) for c in COMPILERS)
    for copy in final.all("COPY"):
        assert "uv" not in copy.split() and "/uv" not in copy
        if copy.startswith("--from=build"):
            assert copy.split()[1:] == ["/opt/venv", "/opt/venv"]


def test_build_stage_installs_exactly_the_lock(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    args, stages = dockerfile
    build = next(s for s in stages if s.name == "build")
    syncs = [r for r in build.all("RUN") if "uv sync" in r]
    assert syncs and all("--locked" in r and "--no-dev" in r for r in syncs)
    extras_arg = next(a for a in build.all("ARG") if a.startswith("EXTRAS="))
    extras = extras_arg.split("=", 1)[1].strip('"').split()
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert set(extras) <= set(declared)
    # RECIPES=baked|mounted selects a stage that exists.
    names = {s.name for s in stages}
    assert {"recipes-baked", "recipes-mounted"} <= names
    assert args["RECIPES"] in ("baked", "mounted")


def test_every_copied_path_exists_and_is_in_the_build_context(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    _, stages = dockerfile
    patterns = _dockerignore()
    for stage in stages:
        for copy in stage.all("COPY"):
            parts = [p for p in copy.split() if not p.startswith("--")]
            if copy.startswith("--from"):
                continue
            for src in parts[:-1]:
                path = REPO / src
                assert path.exists(), f"COPY {src}: missing"
                assert not _ignored(src.rstrip("/"), patterns), f"COPY {src}: in .dockerignore"
    # What the image needs is not ignored; what it must not carry is.
    for needed in (
        "uv.lock",
        "pyproject.toml",
        "infercore/cli.py",
        "conf/config.yaml",
        "recipes/fraud/artifacts/v1/model.onnx",
        "plugins/onnx/pyproject.toml",
    ):
        assert not _ignored(needed, patterns), needed
    for excluded in (
        ".venv",
        ".git",
        "tests/e2e/test_shutdown.py",
        "recipes/fraud/feature_repo/data/registry.db",
    ):
        assert _ignored(excluded, patterns), excluded


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    return yaml.safe_load((REPO / "compose.yaml").read_text())


def test_compose_file_validates_against_the_compose_spec(stack: dict[str, Any]) -> None:
    schema = json.loads(
        (
            resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
        ).read_text()
    )
    jsonschema.validators.validator_for(schema)(schema).validate(stack)
    assert set(stack["services"]) == {"infercore", "redis", "prometheus", "grafana"}


def test_compose_references_files_that_exist(stack: dict[str, Any]) -> None:
    for name, service in stack["services"].items():
        build = service.get("build")
        if build:
            assert (REPO / build["context"] / build.get("dockerfile", "Dockerfile")).is_file()
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name}: {source}"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_compose_infercore_command_composes_with_redis_and_drains_in_time(
    stack: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = stack["services"]["infercore"]
    for key, value in svc["environment"].items():
        monkeypatch.setenv(key, value)
    command = svc["command"]
    assert command[0] == "serve"
    composed = compose(command[1:])
    cfg = composed.config
    assert composed.choices["recipe"] == "fraud" and composed.choices["env"] == "prod"
    assert cfg.server.host == "0.0.0.0"
    assert cfg.feature_store.online_store == "redis"
    assert cfg.feature_store.redis_url == "redis://redis:6379/0"
    assert cfg.features["registry_path"].startswith("/var/lib/infercore/")
    assert any(v.endswith(":/var/lib/infercore") for v in svc["volumes"])
    assert svc["read_only"] is True
    grace = int(svc["stop_grace_period"].rstrip("s"))
    assert grace >= cfg.server.drain_delay_s + cfg.server.graceful_timeout_s
    assert svc["depends_on"]["redis"]["condition"] == "service_healthy"


def test_prometheus_and_grafana_point_at_each_other(stack: dict[str, Any]) -> None:
    prom = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    (job,) = prom["scrape_configs"]
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in stack["services"]
    assert int(port) == 8080 and job["metrics_path"] == "/metrics"
    mounts = dict(v.split(":")[:2] for v in stack["services"]["prometheus"]["volumes"])
    assert mounts["./deploy/prometheus/rules"] == "/etc/prometheus/rules"
    assert prom["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    assert list((REPO / "deploy/prometheus/rules").glob("*.yml"))

    gmounts = dict(v.split(":")[:2] for v in stack["services"]["grafana"]["volumes"])
    dash_cfg = yaml.safe_load(
        (REPO / "deploy/grafana/provisioning/dashboards/infercore.yml").read_text()
    )
    path = dash_cfg["providers"][0]["options"]["path"]
    host_dir = next(h for h, c in gmounts.items() if c == path)
    assert (REPO / host_dir / "infercore.json").is_file()
    ds = yaml.safe_load(
        (REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    (source,) = ds["datasources"]
    assert source["url"] == "http://prometheus:9090"
    dashboard = json.loads((REPO / host_dir / "infercore.json").read_text())
    var = next(v for v in dashboard["templating"]["list"] if v["type"] == "datasource")
    assert var["current"]["value"] == source["uid"]


# --- the image installs what the recipes it runs need ------------------------------------

#: The core's own distribution: its built-in plugins are always installed.
CORE_DISTRIBUTION = "infercore"
WORKFLOW = REPO / "deploy/github-actions/infercore.yml"


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _extra_of_distribution() -> dict[str, str]:
    """Distribution -> the optional-dependencies extra of pyproject.toml that installs it."""
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    out: dict[str, str] = {}
    for extra, requirements in declared.items():
        for requirement in requirements:
            match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
            assert match, requirement
            out[_normalize(match.group(0))] = extra
    return out


def _distributions_used(overrides: list[str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Distribution -> a component (``role kind at path``) of the composed config it provides.

    The Runtime resolves every component node of the config (models, repository loaders,
    features, batching, routing, drift detectors, actions) through the registry; recording each
    resolution names the plugin of every kind used, whichever config key it sits under, and the
    plugin manager names the plugin's distribution.
    """
    used: list[tuple[str, str, str, str]] = []
    original = Registry.resolve

    def recording(
        self: Registry, role: str, node: Any, *, path: str, context: str = ""
    ) -> tuple[Any, Any]:
        cls, cfg = original(self, role, node, path=path, context=context)
        used.append((role, cls.kind, path, self.kinds(role)[cls.kind].plugin))
        return cls, cfg

    with monkeypatch.context() as m:
        m.setattr(Registry, "resolve", recording)
        runtime = Runtime(compose(overrides))
    assert used, "the recording saw no component: it would pass whatever the extras"
    return {
        _normalize(runtime.plugins[plugin].distribution): f"{role} {kind!r} at {path}"
        for role, kind, path, plugin in used
    }


def _image_builds() -> list[tuple[str, list[str], list[list[str]], dict[str, str]]]:
    """(where, EXTRAS, the overrides each image is run with, environment) for every image the
    project builds: the Dockerfile's default, compose.yaml's and the CI workflow's."""
    builds: list[tuple[str, list[str], list[list[str]], dict[str, str]]] = []
    _, stages = _parse_dockerfile()
    build = next(s for s in stages if s.name == "build")
    extras = next(a for a in build.all("ARG") if a.startswith("EXTRAS=")).split("=", 1)[1]
    cmd = json.loads(stages[-1].all("CMD")[0])
    # The default image bakes every recipe and runs its CMD's (iris); its extras are meant for
    # the fraud recipe too (feast is there for nothing else), in every environment.
    runs = [cmd[1:], ["+recipe=fraud"], ["+recipe=fraud", "env=prod"]]
    builds.append(("Dockerfile EXTRAS default", extras.strip('"').split(), runs, {}))

    service = yaml.safe_load((REPO / "compose.yaml").read_text())["services"]["infercore"]
    command = service["command"]
    assert command[0] == "serve"
    builds.append(
        (
            "compose.yaml build.args.EXTRAS",
            service["build"]["args"]["EXTRAS"].split(),
            [command[1:]],
            dict(service["environment"]),
        )
    )

    workflow = yaml.safe_load(WORKFLOW.read_text())
    (step,) = [
        s
        for s in workflow["jobs"]["image"]["steps"]
        if str(s.get("uses", "")).startswith("docker/build-push-action")
    ]
    build_args = dict(
        line.split("=", 1) for line in step["with"]["build-args"].splitlines() if line.strip()
    )
    recipe = workflow["env"]["RECIPE"]
    builds.append(
        (
            "deploy/github-actions/infercore.yml build-args EXTRAS",
            build_args["EXTRAS"].split(),
            # The environments its pods run in (the manifests job renders staging and prod).
            [[f"+recipe={recipe}", f"env={env}"] for env in ("staging", "prod")],
            {},
        )
    )
    return builds


@pytest.mark.parametrize("build", _image_builds(), ids=lambda b: b[0])
def test_every_image_installs_the_plugins_of_the_recipes_it_runs(
    build: tuple[str, list[str], list[list[str]], dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A kind whose plugin the image lacks fails the container at start (exit 2, restarted for
    ever by compose): every component kind the composed config uses must come from the core or
    from a distribution that one of the image's extras installs."""
    where, extras, runs, environment = build
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    extra_of = _extra_of_distribution()
    declared = set(extra_of.values())
    assert set(extras) <= declared, f"{where}: unknown extras {sorted(set(extras) - declared)}"
    for overrides in runs:
        for distribution, component in _distributions_used(overrides, monkeypatch).items():
            if distribution == CORE_DISTRIBUTION:
                continue
            extra = extra_of.get(distribution)
            assert extra is not None, (
                f"{' '.join(overrides)}: {component} comes from {distribution}, which no extra "
                "of pyproject.toml installs"
            )
            assert extra in extras, (
                f"{where} = {' '.join(extras)!r} lacks {extra!r}: {' '.join(overrides)} uses "
                f"{component}, from {distribution}"
            )
