"""The ``infercore`` command, run as a user runs it: a subprocess, exit codes, stdout and stderr."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
IRIS_ONNX = REPO / "recipes" / "iris" / "artifacts" / "model.onnx"
SCRIPT = Path(sys.executable).parent / "infercore"
INFERCORE = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "infercore.cli"]
ERROR_PREFIX = "infercore: config error:"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERCORE_")}
    env.update(extra)
    return env


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*INFERCORE, *args],
        cwd=REPO,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _write_recipe(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text("# @package _global_\n" + textwrap.dedent(body))
    return folder


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="session")
def iris_artifact() -> Path:
    """The iris ONNX model, which another job builds; wait for it rather than build it here."""
    deadline = time.monotonic() + 600
    while not IRIS_ONNX.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"{IRIS_ONNX} did not appear (build it: recipes/iris/train.py)")
        time.sleep(5)
    return IRIS_ONNX


@pytest.fixture
def missing_model_recipes(tmp_path: Path) -> Path:
    """A recipes folder whose recipe ``missing`` points at an ONNX file that does not exist."""
    return _write_recipe(
        tmp_path / "recipes",
        "missing",
        """\
        models:
          m:
            versions:
              "1":
                loader: {kind: onnx, path: nowhere/model.onnx}
        """,
    )


def _assert_one_config_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(ERROR_PREFIX), lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    return lines[0]


# --- config show ---


@pytest.mark.timeout(660)
def test_config_show_prints_the_composed_config_with_defaults(iris_artifact: Path) -> None:
    result = run("config", "show", "+recipe=iris")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# composed: ")
    assert "recipe=iris" in result.stdout.splitlines()[0]
    assert "kind: adaptive" in result.stdout
    data = yaml.safe_load(result.stdout)
    assert data["batching"]["kind"] == "adaptive"
    assert data["batching"]["max_concurrent_batches"] == 1  # a default the YAML does not set
    assert data["batching"]["max_batch_size"] == 32
    loader = data["models"]["iris"]["versions"]["1"]["loader"]
    assert loader["kind"] == "onnx"
    assert loader["path"] == "iris/artifacts/model.onnx"
    assert len(loader) > 2, "the loader's defaults are filled in"
    assert data["server"]["port"] == 8080
    assert "***" not in result.stdout  # nothing secret in iris


def test_config_show_applies_overrides_and_env() -> None:
    result = run(
        "config",
        "show",
        "+recipe=iris",
        "env=prod",
        "deploy=k8s",
        "batching.max_batch_size=64",
        env=_env(INFERCORE_PORT="9321"),
    )
    assert result.returncode == 0, result.stderr
    data = yaml.safe_load(result.stdout)
    assert data["server"]["port"] == 9321
    assert data["server"]["host"] == "0.0.0.0"
    assert data["server"]["log_format"] == "json"
    assert data["batching"]["max_batch_size"] == 64
    assert "env=prod" in result.stdout.splitlines()[0]


def test_config_show_redacts_credentials(tmp_path: Path) -> None:
    recipes = _write_recipe(
        tmp_path / "recipes",
        "secretive",
        """\
        description: "features cached in redis://:hunter2@cache:6379/0"
        models:
          m:
            versions:
              "1":
                loader: {kind: onnx, path: m.onnx}
        """,
    )
    result = run(
        "config", "show", "+recipe=secretive", env=_env(INFERCORE_RECIPES_DIR=str(recipes))
    )
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout
    assert "redis://***@cache:6379/0" in result.stdout


# --- config validate ---


@pytest.mark.timeout(660)
def test_config_validate_iris(iris_artifact: Path) -> None:
    result = run("config", "validate", "+recipe=iris")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok:")
    assert "recipe=iris" in result.stdout
    assert result.stderr == ""


@pytest.mark.timeout(660)
def test_module_entry_point_runs_the_cli(iris_artifact: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "infercore.cli", "config", "validate", "+recipe=iris"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok:")


def test_config_validate_missing_artifact(missing_model_recipes: Path) -> None:
    result = run(
        "config",
        "validate",
        "+recipe=missing",
        env=_env(INFERCORE_RECIPES_DIR=str(missing_model_recipes)),
    )
    line = _assert_one_config_error(result)
    assert "models.m.versions.1.loader.path" in line
    assert "'nowhere/model.onnx'" in line
    assert "not found" in line


@pytest.fixture
def two_version_recipes(tmp_path: Path, iris_artifact: Path) -> Path:
    """Recipe ``two``: iris as version 1 (primary) and a candidate version 2 whose file
    ``m/v2.onnx`` the test writes; drift monitoring with a reference of the model's columns."""
    import numpy as np

    recipes = _write_recipe(
        tmp_path / "recipes",
        "two",
        """\
        models:
          m:
            primary: "1"
            versions:
              "1":
                loader: {kind: onnx, path: m/v1.onnx}
              "2":
                loader: {kind: onnx, path: m/v2.onnx}
                stage: candidate
            drift:
              detectors:
                shift:
                  kind: ks
                  reference: m/reference.npz
        """,
    )
    (recipes / "m").mkdir()
    shutil.copy(iris_artifact, recipes / "m" / "v1.onnx")
    shutil.copy(iris_artifact, recipes / "m" / "v2.onnx")
    rows = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    np.savez(recipes / "m" / "reference.npz", input=rows)
    return recipes


def _validate(recipes: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run("config", "validate", *args, env=_env(INFERCORE_RECIPES_DIR=str(recipes)))


def test_config_validate_load_loads_and_warms_every_version(
    two_version_recipes: Path, tmp_path: Path
) -> None:
    admin = tmp_path / "admin"
    admin.mkdir()
    result = _validate(
        two_version_recipes,
        "--load",
        "+recipe=two",
        f"admin.state_file={admin / 'rollout.json'}",
        f"admin.audit_log={admin / 'audit.jsonl'}",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: recipe=two, 1 model(s), 2 version(s) loaded and warmed")
    assert "Traceback" not in result.stderr
    # A server running from the same recipe holds the state file's lock and appends to the
    # audit log: the check opens neither.
    assert sorted(p.name for p in admin.iterdir()) == []


def test_config_validate_load_fails_on_a_version_that_does_not_load(
    two_version_recipes: Path,
) -> None:
    (two_version_recipes / "m" / "v2.onnx").write_text("not an ONNX model\n")
    # Without --load the file is only found; version 2 is optional, so serve would start.
    assert _validate(two_version_recipes, "+recipe=two").returncode == 0
    result = _validate(two_version_recipes, "--load", "+recipe=two")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last == ("infercore: error: 1 version(s) failed to load: m@2 (see the errors above)"), (
        result.stderr
    )
    assert "m/v2.onnx" not in last
    assert "models.m.versions.2.loader.path" in result.stderr  # the ERROR line says why


def test_config_validate_load_checks_drift_against_the_reference(
    two_version_recipes: Path,
) -> None:
    override = "+models.m.drift.detectors.shift.features=['input[0]','input[9]']"
    assert _validate(two_version_recipes, "+recipe=two", override).returncode == 0
    line = _assert_one_config_error(
        _validate(two_version_recipes, "--load", "+recipe=two", override)
    )
    assert "models.m.drift.detectors.shift.features" in line and "'input[9]'" in line


def test_config_validate_load_checks_drift_features_against_the_model(
    two_version_recipes: Path,
) -> None:
    import numpy as np

    # The reference has a column the model does not: every window would fail on it.
    reference = two_version_recipes / "m" / "reference.npz"
    rows = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    np.savez(reference, input=rows, amount=rows[:, 0])
    assert _validate(two_version_recipes, "+recipe=two").returncode == 0
    line = _assert_one_config_error(_validate(two_version_recipes, "--load", "+recipe=two"))
    assert line.startswith(
        f"{ERROR_PREFIX} models.m.drift.detectors.shift.features: 'amount' is not a column of "
        "model m's monitored tensors (hint: columns: input[0], input[1], input[2], input[3];"
    ), line


# --- config errors: one line, exit 2 ---

CONFIG_ERRORS = {
    "wrong-type": (["batching.max_batch_size=abc"], ["batching.max_batch_size", "'abc'", "int"]),
    "typo-without-plus": (
        ["batching.max_bach_size=3"],
        ["batching.max_bach_size", "'3'", "max_batch_size", "+batching.max_bach_size=3"],
    ),
    "typo-with-plus": (
        ["+batching.max_bach_size=3"],
        ["batching.max_bach_size", "unknown key", "max_batch_size, max_queue_delay_ms"],
    ),
    "unknown-kind": (
        ["models.iris.versions.1.loader.kind=onx"],
        ["models.iris.versions.1.loader.kind", "'onx'", "available:", "onnx", "sklearn"],
    ),
    "unknown-group-option": (["batching=dynamc"], ["batching", "'dynamc'", "dynamic, none"]),
    "primary-not-a-version": (
        ["+models.iris.primary=2"],
        ["models.iris.primary", "'2'", "not one of the versions"],
    ),
}


@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
@pytest.mark.parametrize("command", [["config", "show"], ["config", "validate"], ["serve"]])
def test_config_error_is_one_line_and_exit_2(case: str, command: list[str]) -> None:
    overrides, expected = CONFIG_ERRORS[case]
    result = run(*command, "+recipe=iris", *overrides)
    line = _assert_one_config_error(result)
    for text in expected:
        assert text in line, (text, line)


def test_unknown_recipe_lists_recipes() -> None:
    line = _assert_one_config_error(run("config", "show", "+recipe=nope"))
    assert "'nope'" in line
    assert "iris" in line.split("available:")[1]


def test_recipes_dir_from_the_environment(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    line = _assert_one_config_error(
        run("config", "show", "+recipe=iris", env=_env(INFERCORE_RECIPES_DIR=str(missing)))
    )
    assert str(missing) in line


def test_invalid_model_name_in_a_recipe(tmp_path: Path) -> None:
    recipes = _write_recipe(
        tmp_path / "recipes",
        "dotdot",
        """\
        models:
          "../x":
            versions:
              "1":
                loader: {kind: onnx, path: m.onnx}
        """,
    )
    line = _assert_one_config_error(
        run("config", "validate", "+recipe=dotdot", env=_env(INFERCORE_RECIPES_DIR=str(recipes)))
    )
    assert "invalid model name '../x'" in line


def test_debug_shows_the_traceback() -> None:
    result = run("--debug", "config", "show", "+recipe=iris", "batching=dynamc")
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert "ConfigError" in result.stderr
    assert "'dynamc'" in result.stderr


def test_unknown_subcommand_is_a_usage_error() -> None:
    result = run("srve")
    assert result.returncode == 2
    assert "usage: infercore" in result.stderr
    assert "Traceback" not in result.stderr


# --- plugins ---


def test_plugins_lists_builtins_and_first_party_plugins() -> None:
    result = run("plugins")
    assert result.returncode == 0, result.stderr
    table, _, notes = result.stdout.partition("\n\n")
    lines = table.splitlines()
    assert lines[0].split() == ["PLUGIN", "DISTRIBUTION", "VERSION", "LICENCE", "KINDS"]
    rows = {line.split()[0]: line for line in lines[1:]}
    # A plugin wrapping a differently licensed library says so under the table.
    assert "note: alibi-detect:" in notes and "Business Source License" in notes
    expected_kinds = {
        "builtins.features": "feature_source: request",
        "builtins.batchers": "batcher: adaptive, dynamic, none",
        "onnx": "model_loader: onnx",
        "sklearn": "model_loader: sklearn",
    }
    for name, kinds in expected_kinds.items():
        assert name in rows, result.stdout
        cols = rows[name].split()
        assert cols[3] == "Apache-2.0", rows[name]
        assert cols[2][0].isdigit(), rows[name]  # a version
        assert rows[name].rstrip().endswith(kinds), rows[name]
    assert rows["onnx"].split()[1] == "infercore-onnx"


def test_plugins_respects_the_deny_list() -> None:
    result = run("plugins", env=_env(INFERCORE_DISABLE_PLUGINS="sklearn"))
    assert result.returncode == 0, result.stderr
    table = result.stdout.partition("\n\n")[0]
    names = [line.split()[0] for line in table.splitlines()[1:]]
    assert "sklearn" not in names
    assert "onnx" in names


def test_a_misspelled_load_list_is_named_and_the_unknown_kind_says_why() -> None:
    env = _env(INFERCORE_LOAD_PLUGINS="onxx")
    listed = run("plugins", env=env)
    assert listed.returncode == 0, listed.stderr
    assert (
        "INFERCORE_LOAD_PLUGINS names 'onxx', which is no installed plugin; did you mean 'onnx'?"
        in (listed.stderr)
    )
    left_out = [line for line in listed.stderr.splitlines() if "left out by" in line]
    assert len(left_out) == 1 and "onnx" in left_out[0].rsplit(": ", 1)[1].split(", ")
    validated = run("config", "validate", "+recipe=iris", env=env)
    assert validated.returncode == 2
    assert validated.stderr.splitlines()[-1].endswith(
        "(hint: the plugin 'onnx' is installed but INFERCORE_LOAD_PLUGINS leaves it out; add it "
        "there)"
    )


# --- serve ---


def test_serve_with_a_missing_model_exits_with_one_clear_line(missing_model_recipes: Path) -> None:
    result = run(
        "serve",
        "+recipe=missing",
        f"server.port={_free_port()}",
        env=_env(INFERCORE_RECIPES_DIR=str(missing_model_recipes)),
        timeout=60,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("infercore: ")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("infercore: error:")
    assert "models.m.versions.1.loader" in errors[0]
    assert "not found" in errors[0]


def test_a_config_error_found_while_loading_exits_2(tmp_path: Path) -> None:
    # Found by the loader, not by composing: still a config error (exit 2), as the plugin
    # READMEs list it, not "infercore: error:" with exit 1.
    (tmp_path / "outside.onnx").write_bytes(b"not a model")
    recipes = _write_recipe(
        tmp_path / "recipes",
        "escape",
        """\
        models:
          m:
            versions:
              "1":
                loader: {kind: onnx, path: ../outside.onnx}
        """,
    )
    env = _env(INFERCORE_RECIPES_DIR=str(recipes))
    result = run("serve", "+recipe=escape", "server.port=0", env=env, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("infercore: ")]
    assert line.startswith(f"{ERROR_PREFIX} models.m.versions.1.loader"), line
    assert "outside the model root" in line, line


def test_serve_with_no_model_is_a_config_error() -> None:
    # It started, reported ready and answered 404 to everything.
    for command in (["serve", "server.port=0"], ["config", "validate"]):
        line = _assert_one_config_error(run(*command))
        assert line.startswith(f"{ERROR_PREFIX} models: no model is configured"), line
        assert "+recipe=NAME" in line


def test_the_ready_line_names_only_the_versions_that_serve(
    iris_artifact: Path, tmp_path: Path, log_files: tuple[Path, Path]
) -> None:
    recipes = tmp_path / "recipes"
    (recipes / "iris").mkdir(parents=True)
    shutil.copy(iris_artifact, recipes / "iris" / "model.onnx")
    _write_recipe(
        recipes,
        "two",
        """\
        models:
          iris:
            versions:
              "1":
                loader: {kind: onnx, path: iris/model.onnx}
          broken:
            required: false
            versions:
              "1":
                loader: {kind: onnx, path: nowhere/model.onnx}
        """,
    )
    port = _free_port()
    out_path, err_path = log_files
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen(
            [*INFERCORE, "serve", "+recipe=two", f"server.port={port}"],
            cwd=REPO,
            env=_env(INFERCORE_RECIPES_DIR=str(recipes)),
            stdout=out,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 60
        while "ready:" not in err_path.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, err_path.read_text()
            time.sleep(0.2)
        (line,) = [x for x in err_path.read_text().splitlines() if "ready:" in x]
        assert line.endswith("ready: iris@1; not ready: broken@1 (see the errors above)"), line
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.fixture
def log_files(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    yield tmp_path / "stdout.log", tmp_path / "stderr.log"


@pytest.mark.timeout(720)
def test_serve_iris_becomes_ready_and_stops_on_sigterm(
    iris_artifact: Path, log_files: tuple[Path, Path]
) -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    out_path, err_path = log_files
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen(
            [*INFERCORE, "serve", "+recipe=iris", f"server.port={port}"],
            cwd=REPO,
            env=_env(),
            stdout=out,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 30
        status = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"server exited early:\n{err_path.read_text()}"
            try:
                status, _ = _get(f"{base}/v2/health/ready")
            except OSError:
                status = None
            if status == 200:
                break
            time.sleep(0.2)
        assert status == 200, f"not ready within 30 s:\n{err_path.read_text()}"

        body = json.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "shape": [1, 4],
                        "datatype": "FP32",
                        "data": [5.1, 3.5, 1.4, 0.2],
                    }
                ]
            }
        ).encode()
        request = urllib.request.Request(
            f"{base}/v2/models/iris/infer",
            data=body,
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            doc = json.loads(response.read())
        outputs = {o["name"]: o for o in doc["outputs"]}
        assert outputs["label"]["data"] == [0]  # setosa

        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        assert code == 0, err_path.read_text()
        assert "Traceback" not in err_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_serve_refuses_an_invalid_worker_count() -> None:
    line = _assert_one_config_error(run("serve", "+recipe=iris", "server.workers=0"))
    assert "server.workers" in line


def test_serve_refuses_the_admin_api_with_several_workers() -> None:
    # Each worker would keep its own versions and stages: an admin call would change one.
    line = _assert_one_config_error(
        run("serve", "+recipe=iris", "server.workers=2", "admin.enabled=true")
    )
    assert "server.workers" in line and "admin.enabled" in line


@pytest.mark.parametrize("admin", ["admin.enabled=true", "admin.enabled=false"])
def test_serve_refuses_an_audit_log_it_cannot_create(tmp_path: Path, admin: str) -> None:
    env = _env(INFERCORE_ADMIN_TOKEN="t0ken-for-tests-0123456789")

    def serve(audit: Path) -> str:
        # Port 0: a server that started by mistake would take no port another test needs.
        ports = ["server.port=0", "admin.port=0"]
        return _assert_one_config_error(
            run("serve", "+recipe=iris", *ports, admin, f"admin.audit_log={audit}", env=env)
        )

    (tmp_path / "token").write_text("not a folder")
    line = serve(tmp_path / "token" / "audit.jsonl")
    assert f"admin.audit_log: cannot create '{tmp_path / 'token' / 'audit.jsonl'}'" in line
    assert "is not a folder" in line and "hint:" in line
    # Nor are folders created for a path whose folders do not exist.
    line = serve(tmp_path / "missing" / "dir" / "audit.jsonl")
    assert "admin.audit_log" in line and "do not exist" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token"]


def test_models_weights_refuses_a_percent_that_is_not_finite() -> None:
    # Refused before any request: nothing listens on the discard port.
    base = ["models", "--url", "http://127.0.0.1:9", "--token", "t0ken-for-tests-0123456789"]
    for args, named in (
        (["weights", "m", "1=nan", "2=inf"], "'1=nan'"),
        (["weights", "m", "1=100", "2=-Infinity"], "'2=-Infinity'"),
        (["promote", "m", "2", "--to", "canary", "--weight", "nan", "--by", "ann"], "--weight"),
    ):
        result = run(*base, *args)
        assert result.returncode == 2, (result.returncode, result.stderr)
        assert result.stderr.splitlines() == [
            f"infercore: error: {named}: the percent must be a finite number"
        ]


def test_models_weights_refuses_a_version_given_twice() -> None:
    # Before: `2=50 2=0` applied 2=0 without a word. Refused before any request.
    base = ["models", "--url", "http://127.0.0.1:9", "--token", "t0ken-for-tests-0123456789"]
    result = run(*base, "weights", "m", "1=90", "2=50", "2=10")
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stderr.splitlines() == ["infercore: error: version '2' is given twice"]


def test_serve_on_a_port_in_use_exits_with_one_clear_line() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("serve", "+recipe=iris", f"server.port={port}")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("infercore: ")]
    # The cause in the final line, as with several workers; bound before any model loads.
    assert errors == [
        f"infercore: error: could not listen on http://127.0.0.1:{port}: Address already in use"
    ]
    assert "ready:" not in result.stderr, result.stderr  # no "ready: iris@1" log line


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_on_all_interfaces_warns_whatever_the_worker_count(host: str, workers: str) -> None:
    if host == "::" and not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    family = socket.AF_INET6 if host == "::" else socket.AF_INET
    try:
        taken = socket.socket(family, socket.SOCK_STREAM)
        taken.bind((host, 0))
    except OSError:
        pytest.skip(f"cannot bind {host} here")
    # The port is taken, so the server stops right after its start-up checks and warning.
    with taken:
        taken.listen()
        port = taken.getsockname()[1]
        result = run(
            "serve",
            "+recipe=iris",
            f"server.host={host}",
            f"server.port={port}",
            f"server.workers={workers}",
        )
    assert result.returncode == 1, result.stderr
    assert f"listening on all interfaces ({host}); is that intended?" in result.stderr, (
        result.stderr
    )


# --- what serve refuses, config validate and deploy k8s refuse too ---

TOKEN = "t" * 32


@pytest.mark.parametrize(
    ("case", "overrides", "env", "expected"),
    [
        ("no admin token", ["admin.enabled=true"], {}, "admin.enabled"),
        (
            "admin with workers",
            ["admin.enabled=true", "server.workers=2"],
            {"INFERCORE_ADMIN_TOKEN": TOKEN},
            "server.workers",
        ),
        (
            "unreadable auth file",
            ["admin.enabled=true", "admin.auth_file=/nonexistent/token"],
            {},
            "admin.auth_file",
        ),
        (
            "socket path too long",
            ["deploy=sidecar", "server.uds=/tmp/" + "s" * 120 + ".sock"],
            {},
            "server.uds",
        ),
        (
            "empty socket path",
            ["deploy=sidecar", "server.uds="],
            {},
            "server.uds: the socket path is empty",
        ),
        (
            "state file with workers",
            ["admin.state_file=/tmp/infercore-test-state.json", "server.workers=2"],
            {},
            "server.workers",
        ),
        (
            "state file in a missing tree",
            ["admin.state_file=/nonexistent/a/rollout.json"],
            {},
            "admin.state_file",
        ),
        (
            "admin port is the server port",
            ["admin.enabled=true", "admin.port=27246", "server.port=27246"],
            {"INFERCORE_ADMIN_TOKEN": TOKEN},
            "admin.port",
        ),
    ],
)
def test_config_validate_refuses_what_serve_refuses(
    case: str, overrides: list[str], env: dict[str, str], expected: str
) -> None:
    for command in (["config", "validate"], ["serve"]):
        line = _assert_one_config_error(run(*command, "+recipe=iris", *overrides, env=_env(**env)))
        assert line.startswith(f"{ERROR_PREFIX} {expected}"), (case, command, line)


def test_a_config_error_quoting_an_override_masks_its_password() -> None:
    # Hydra quotes an override it cannot parse, whole: a URL's password included.
    override = "feature_store.redis_url=redis://:s3cretpw@cache:6379/0{"
    line = _assert_one_config_error(run("config", "validate", "+recipe=fraud", override))
    assert "redis://***@cache:6379/0{" in line
    assert "s3cretpw" not in line


def test_config_validate_refuses_a_folder_as_the_artifact(tmp_path: Path) -> None:
    recipes = _write_recipe(
        tmp_path / "recipes",
        "dir",
        """        models:
          m:
            versions:
              "1":
                loader: {kind: onnx, path: folder}
        """,
    )
    (recipes / "folder").mkdir()
    line = _assert_one_config_error(
        run("config", "validate", "+recipe=dir", env=_env(INFERCORE_RECIPES_DIR=str(recipes)))
    )
    assert "models.m.versions.1.loader.path" in line and "not a file" in line


def test_deploy_k8s_refuses_pods_that_would_not_start() -> None:
    line = _assert_one_config_error(
        run("deploy", "k8s", "+recipe=iris", "server.workers=2", "admin.enabled=true")
    )
    assert "server.workers" in line and "admin.enabled" in line


# --- outside input: one line, exit 2, no traceback (no --debug) ---


@pytest.mark.parametrize(
    ("case", "args", "env", "expected"),
    [
        (
            "out is not writable",
            ["deploy", "k8s", "+recipe=iris", "--out", "/proc/nope"],
            {},
            "--out",
        ),
        ("out is a file", ["deploy", "k8s", "+recipe=iris", "--out", "{file}"], {}, "--out"),
        (
            "plugin dir not writable",
            ["new-plugin", "my-router", "--kind", "router", "--dir", "/proc/nope"],
            {},
            "--dir",
        ),
        (
            "port out of range",
            ["models", "list"],
            {"INFERCORE_ADMIN_URL": "http://127.0.0.1:99999"},
            "INFERCORE_ADMIN_URL",
        ),
        ("port not a number", ["models", "--url", "http://127.0.0.1:abc", "list"], {}, "--url"),
        (
            "bad IPv6 address",
            ["events"],
            {"INFERCORE_ADMIN_URL": "http://[::1"},
            "INFERCORE_ADMIN_URL",
        ),
        (
            "token with a line break",
            ["models", "--url", "http://127.0.0.1:9", "list"],
            {"INFERCORE_ADMIN_TOKEN": "abc\nSECRETPART"},
            "INFERCORE_ADMIN_TOKEN",
        ),
        (
            "token file with a line break inside",
            ["models", "--url", "http://127.0.0.1:9", "--token-file", "{token_file}", "list"],
            {},
            "--token-file",
        ),
    ],
)
def test_bad_paths_urls_and_tokens_are_one_line_and_exit_2(
    tmp_path: Path, case: str, args: list[str], env: dict[str, str], expected: str
) -> None:
    a_file = tmp_path / "t.sh"
    a_file.write_text("")
    token_file = tmp_path / "token"
    token_file.write_text("abc\nSECRETPART\n")
    env = {"INFERCORE_ADMIN_TOKEN": TOKEN, **env}
    result = run(*[a.format(file=a_file, token_file=token_file) for a in args], env=_env(**env))
    assert result.returncode == 2, (case, result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if not line.startswith("note:")]
    assert len(lines) == 1, (case, result.stderr)
    assert lines[0].startswith("infercore: ") and expected in lines[0], (case, lines[0])
    assert "Traceback" not in result.stderr
    assert "SECRETPART" not in result.stderr + result.stdout  # a token is never echoed


def test_config_show_into_a_closed_pipe_exits_quietly() -> None:
    # As `infercore config show | head -1` once head has gone: every write finds no reader.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [*INFERCORE, "config", "show", "+recipe=iris"],
            cwd=REPO,
            env=_env(),
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == 141  # 128 + SIGPIPE, what a shell reports for a Unix tool


def test_freeze_heap_moves_live_objects_out_of_the_collectors_generations() -> None:
    import gc

    from infercore.cli import freeze_heap

    before = gc.get_freeze_count()
    survivors = [[i] for i in range(1000)]  # tracked containers alive at "start-up"
    try:
        frozen = freeze_heap()
        assert frozen == gc.get_freeze_count()
        assert frozen >= before + len(survivors)
    finally:
        gc.unfreeze()
    del survivors


def test_set_switch_interval_follows_the_config() -> None:
    import sys

    from infercore.cli import set_switch_interval
    from infercore.config.compose import compose

    before = sys.getswitchinterval()
    try:
        cfg = compose(["+recipe=iris"]).config.server
        assert cfg.gil_switch_interval_ms == 0.5
        set_switch_interval(cfg.gil_switch_interval_ms)
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        set_switch_interval(2.0)
        assert sys.getswitchinterval() == pytest.approx(0.002)
    finally:
        sys.setswitchinterval(before)


def test_a_switch_interval_out_of_range_is_a_config_error() -> None:
    from infercore.config.compose import compose
    from infercore.errors import ConfigError

    with pytest.raises(ConfigError, match="gil_switch_interval_ms"):
        compose(["+recipe=iris", "server.gil_switch_interval_ms=0"])


def test_set_gc_threshold_follows_the_config_and_keeps_the_older_generations() -> None:
    import gc

    from infercore.cli import set_gc_threshold
    from infercore.config.compose import compose
    from infercore.errors import ConfigError

    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 11, 12)
        cfg = compose(["+recipe=iris"]).config.server
        assert cfg.gc_gen0_threshold == 10_000
        set_gc_threshold(cfg.gc_gen0_threshold)
        assert gc.get_threshold() == (10_000, 11, 12)
        set_gc_threshold(
            compose(
                ["+recipe=iris", "server.gc_gen0_threshold=700"]
            ).config.server.gc_gen0_threshold
        )
        assert gc.get_threshold() == (700, 11, 12)
    finally:
        gc.set_threshold(*before)
    with pytest.raises(ConfigError, match=r"server\.gc_gen0_threshold"):
        compose(["+recipe=iris", "server.gc_gen0_threshold=10"])
