"""``infercore deploy k8s``: secrets written literally are refused before anything is rendered
(and redacted by ``config show``), the notes name every variable the pod reads from its Secret
and only those, ``--namespace`` must be a name Kubernetes takes, and the sidecar's startup
probe holds the application back until the models are ready."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from infercore.cli import run
from infercore.deploy import k8s
from infercore.errors import ConfigError

FRAUD_PROD = ["+recipe=fraud", "env=prod"]
ACTIONS = "models.fraud.drift.actions"


def _actions(webhook: str = "", command: str = "") -> str:
    """A ``models.fraud.drift.actions=[…]`` override: a webhook and a command action."""
    return (
        f"{ACTIONS}=[{{kind: webhook, url: 'https://hooks.example.com/drift{webhook}', "
        "allow_hosts: [hooks.example.com]}, "
        f"{{kind: command, argv: ['/bin/true'{command}]}}]"
    )


@pytest.mark.parametrize(
    ("override", "path"),
    [
        (_actions(webhook="?access_token=S3cretQueryTok"), f"{ACTIONS}[0].url"),
        (_actions(webhook="?team=ml&sig=S3cretSig"), f"{ACTIONS}[0].url"),
        (_actions(command=", '--password=S3cretArgv'"), f"{ACTIONS}[1].argv[1]"),
        (_actions(command=", '--token', 'S3cretTok'"), f"{ACTIONS}[1].argv[2]"),
        (f"+{ACTIONS}.0.headers={{X-Signing-Key: S3cret}}", f"{ACTIONS}[0].headers.X-Signing-Key"),
        (f"+{ACTIONS}.0.headers={{Private-Key: S3cret}}", f"{ACTIONS}[0].headers.Private-Key"),
        (f"+{ACTIONS}.1.env={{DB_PASS: S3cret}}", f"{ACTIONS}[1].env.DB_PASS"),
    ],
)
def test_render_refuses_a_literal_secret(override: str, path: str) -> None:
    overrides = [*FRAUD_PROD, override]
    if override.startswith("+"):
        overrides.insert(2, _actions())
    with pytest.raises(ConfigError, match=re.escape(f"{path}: a secret written literally")) as err:
        k8s.render(overrides, k8s.Options())
    assert "S3cret" not in str(err.value)
    assert "${oc.env:VAR}" in (err.value.hint or "")


def test_secrets_read_from_the_environment_render_and_stay_references(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The render validates the config as `serve` would: the variables are set here too, and
    # their values are not written.
    for var in ("HOOK_TOKEN", "DB_PASS", "SIGNING_KEY"):
        monkeypatch.setenv(var, f"S3cret-{var}")
    overrides = [
        *FRAUD_PROD,
        _actions(
            webhook="?access_token=${oc.env:HOOK_TOKEN}",
            command=", '--password=${oc.env:DB_PASS}'",
        ),
        f"+{ACTIONS}.0.headers={{X-Signing-Key: '${{oc.env:SIGNING_KEY}}', "
        "Content-Type: application/json}",
    ]
    rendered = k8s.render(overrides, k8s.Options())
    text = next(iter(rendered.files["configmap.yaml"][0]["data"].values()))
    assert "access_token=${oc.env:HOOK_TOKEN}" in text
    assert "--password=${oc.env:DB_PASS}" in text
    assert "X-Signing-Key: ${oc.env:SIGNING_KEY}" in text
    assert "Content-Type: application/json" in text
    assert "S3cret" not in text
    # The notes say the Secret must hold them.
    (env_note,) = [n for n in rendered.notes if n.startswith("environment:")]
    for var in ("HOOK_TOKEN", "DB_PASS", "SIGNING_KEY", "INFERCORE_REDIS_URL"):
        assert var in env_note


@pytest.mark.parametrize("recipe", ["fraud", "iris"])
def test_the_shipped_recipes_still_render(
    recipe: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["deploy", "k8s", f"+recipe={recipe}", "env=prod", "--image", "x:1"]
    assert run([*argv, "--out", str(tmp_path)]) == 0, capsys.readouterr().err
    assert (tmp_path / "configmap.yaml").is_file()


def test_config_show_redacts_the_new_kinds_of_secret(capsys: pytest.CaptureFixture[str]) -> None:
    overrides = [
        *FRAUD_PROD,
        _actions(webhook="?access_token=S3cretQueryTok", command=", '--password=S3cretArgv'"),
        f"+{ACTIONS}.0.headers={{X-Signing-Key: S3cretSigningKey, Content-Type: text/plain}}",
        f"+{ACTIONS}.1.env={{DB_PASS: S3cretDbPass}}",
    ]
    assert run(["config", "show", *overrides]) == 0
    out = capsys.readouterr().out
    assert "S3cret" not in out
    assert "access_token=***" in out and "--password=***" in out
    assert "X-Signing-Key: '***'" in out and "DB_PASS: '***'" in out
    assert "Content-Type: text/plain" in out


# --- notes ---


def _env_notes(rendered: k8s.Rendered) -> list[str]:
    return [n for n in rendered.notes if n.startswith("environment:")]


def test_notes_name_redis_only_when_a_redis_online_store_is_used() -> None:
    (note,) = _env_notes(k8s.render(FRAUD_PROD, k8s.Options()))
    assert note.startswith(
        "environment: the pod reads INFERCORE_REDIS_URL (features.redis_url); put it in the "
        "Secret 'infercore-fraud-env'"
    )
    # fraud in dev keeps its SQLite store; iris has no feature store at all.
    assert _env_notes(k8s.render(["+recipe=fraud"], k8s.Options())) == []
    assert _env_notes(k8s.render(["+recipe=iris", "env=prod"], k8s.Options())) == []
    assert not any("REDIS" in n for n in k8s.render(["+recipe=iris"], k8s.Options()).notes)


@pytest.mark.parametrize("shape", ["deploy=k8s", "deploy=sidecar"])
def test_notes_name_the_admin_token_when_the_admin_api_is_on(
    shape: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("INFERCORE_UDS", raising=False)
    monkeypatch.delenv("INFERCORE_ADMIN_UDS", raising=False)
    rendered = k8s.render([*FRAUD_PROD, shape, "admin.enabled=true"], k8s.Options())
    (note,) = _env_notes(rendered)
    assert "INFERCORE_REDIS_URL (features.redis_url)" in note
    assert "INFERCORE_ADMIN_TOKEN (admin.auth_env" in note
    assert "; put them in the Secret 'infercore-fraud-env'" in note

    (note,) = _env_notes(
        k8s.render(
            ["+recipe=iris", shape, "admin.enabled=true", "admin.auth_env=SCORING_ADMIN_TOKEN"],
            k8s.Options(),
        )
    )
    assert note.startswith("environment: the pod reads SCORING_ADMIN_TOKEN (admin.auth_env")
    assert "; put it in the Secret 'infercore-iris-env'" in note


def test_notes_with_an_admin_token_file_ask_for_the_file_not_a_variable() -> None:
    rendered = k8s.render(
        ["+recipe=iris", "admin.enabled=true", "admin.auth_file=/var/run/admin/token"],
        k8s.Options(),
    )
    assert _env_notes(rendered) == []
    assert any(
        n.startswith("admin.auth_file:") and "'/var/run/admin/token'" in n for n in rendered.notes
    )


def test_notes_with_named_admin_tokens_ask_for_the_tokens_file_not_a_variable() -> None:
    rendered = k8s.render(
        ["+recipe=iris", "admin.enabled=true", "admin.tokens_file=/var/run/admin/tokens"],
        k8s.Options(),
    )
    assert _env_notes(rendered) == []
    (note,) = [n for n in rendered.notes if n.startswith("admin.tokens_file:")]
    assert "'/var/run/admin/tokens'" in note and "defaultMode: 0400" in note
    # The rendered pod's fsGroup makes the file group-readable: the note says it is fine.
    (deployment,) = rendered.files["deployment.yaml"]
    assert deployment["spec"]["template"]["spec"]["securityContext"]["fsGroup"]
    assert "fsGroup" in note and "0440" in note and "without a warning" in note


def test_the_sidecar_exec_note_sends_a_named_token_from_a_file_on_stdin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not in the exec's environment nor on its command line, which the shell's history and
    the API server's audit log keep: the CLI's --token-file, fed from the person's file."""
    monkeypatch.delenv("INFERCORE_UDS", raising=False)
    monkeypatch.delenv("INFERCORE_ADMIN_UDS", raising=False)
    rendered = k8s.render(
        [
            "+recipe=iris",
            "deploy=sidecar",
            "admin.enabled=true",
            "admin.tokens_file=/var/run/admin/tokens",
        ],
        k8s.Options(),
    )
    (note,) = [n for n in rendered.notes if n.startswith("the admin API listens on")]
    assert (
        "kubectl exec -i POD -c infercore -- infercore models --token-file /dev/stdin list "
        "< ~/.infercore-admin-token" in note
    )
    assert "INFERCORE_ADMIN_TOKEN" not in note
    assert "never on the exec's command line" in note
    # The CLI reads the file it is given: `--token-file /dev/stdin` is an option it has.
    from infercore.cli import _parser

    args = _parser().parse_args(["models", "--token-file", "/dev/stdin", "list"])
    assert args.token_file == "/dev/stdin"


# --- --namespace ---


@pytest.mark.parametrize(
    "namespace", ["Bad_NS", "Team", "team.a", "-team", "team-", "team a", "t" * 64, ""]
)
def test_a_namespace_kubernetes_refuses_is_refused(namespace: str) -> None:
    with pytest.raises(ConfigError, match=r"--namespace: .* is not a Kubernetes namespace name"):
        k8s.render(["+recipe=iris"], k8s.Options(namespace=namespace))


def test_cli_refuses_a_bad_namespace_in_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "rendered"
    argv = ["deploy", "k8s", "+recipe=iris", "--image", "x:1", "--namespace", "Bad_NS"]
    assert run([*argv, "--out", str(out)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("infercore: config error: --namespace: 'Bad_NS' is not a Kubernetes")
    assert not out.exists()


@pytest.mark.parametrize("namespace", ["team-a", "a", "0ml", "t" * 63])
def test_a_valid_namespace_is_on_every_namespaced_manifest(namespace: str) -> None:
    rendered = k8s.render(["+recipe=iris"], k8s.Options(namespace=namespace))
    docs = [d for d in rendered.documents() if d["kind"] != "Kustomization"]
    assert docs and all(d["metadata"]["namespace"] == namespace for d in docs)


# --- probes ---


def test_the_sidecar_startup_probe_waits_for_readiness(monkeypatch: pytest.MonkeyPatch) -> None:
    """A native sidecar's startup probe gates the application's containers: on readiness, so
    the application starts once the models are loaded, with the Deployment's startup budget."""
    monkeypatch.delenv("INFERCORE_UDS", raising=False)
    rendered = k8s.render([*FRAUD_PROD, "deploy=sidecar"], k8s.Options())
    (patch,) = rendered.files["sidecar-patch.yaml"]
    (sidecar,) = patch["spec"]["template"]["spec"]["initContainers"]
    startup, live, ready = (sidecar[p] for p in ("startupProbe", "livenessProbe", "readinessProbe"))
    assert startup["exec"]["command"][-1] == "/v2/health/ready"
    assert live["exec"]["command"][-1] == "/v2/health/live"
    assert ready["exec"]["command"][-1] == "/v2/health/ready"
    deployed = k8s.render(FRAUD_PROD, k8s.Options()).files["deployment.yaml"][0]
    (container,) = deployed["spec"]["template"]["spec"]["containers"]
    # The Deployment keeps startup and liveness on liveness (readiness gates its traffic).
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    budget = k8s.DEFAULT_STARTUP_TIMEOUT_S
    assert startup["periodSeconds"] * startup["failureThreshold"] == budget
    deployed_startup = container["startupProbe"]
    assert deployed_startup["periodSeconds"] * deployed_startup["failureThreshold"] == budget
