"""``infercore new-plugin``: names, refusals, and generated plugins that lint, type-check, pass
their own tests and work when installed, for every component role."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import pytest

from infercore import cli
from infercore.registry import KINDS
from infercore.scaffold import ROLES, ScaffoldError, new_plugin, plugin_names

ROLE_NAMES = [spec.role for spec in KINDS]
#: One plugin per role, named after it.
PLUGIN_OF = {role: f"p-{role.replace('_', '-')}" for role in ROLE_NAMES}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("INFERCORE_LOAD_PLUGINS", "INFERCORE_DISABLE_PLUGINS", "INFERCORE_RECIPES_DIR"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A plugin of every role, as ``new_plugin`` writes it: role -> its folder."""
    root = tmp_path_factory.mktemp("plugins")
    return {role: new_plugin(PLUGIN_OF[role], role, root)[0].parent for role in ROLE_NAMES}


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("INFERCORE_") and k != "PYTHONPATH"
    }
    env.update(extra)
    return env


def _run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        cmd, capture_output=True, text=True, timeout=180, check=False, **kwargs
    )


# --- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "distribution", "package", "kind", "camel"),
    [
        ("linear", "infercore-linear", "infercore_linear", "linear", "Linear"),
        ("my-format", "infercore-my-format", "infercore_my_format", "my_format", "MyFormat"),
        ("my_store2", "infercore-my-store2", "infercore_my_store2", "my_store2", "MyStore2"),
    ],
)
def test_names_derive_from_the_plugin_name(
    name: str, distribution: str, package: str, kind: str, camel: str
) -> None:
    names = plugin_names(name)
    assert (names.distribution, names.package, names.kind, names.camel) == (
        distribution,
        package,
        kind,
        camel,
    )


@pytest.mark.parametrize(
    "name", ["", "My-Format", "2fast", "-x", "x-", "a--b", "a b", "x.y", "über", "a" * 25]
)
def test_invalid_names_are_refused_with_the_rule(name: str) -> None:
    with pytest.raises(ScaffoldError) as info:
        plugin_names(name)
    assert "lower-case letters and digits" in str(info.value)


def test_the_infercore_prefix_is_refused_with_the_fix() -> None:
    with pytest.raises(ScaffoldError) as info:
        plugin_names("infercore-redis")
    assert "leave out the 'infercore' prefix" in str(info.value)
    assert "infercore new-plugin redis" in str(info.value)


def test_a_keyword_is_refused() -> None:
    with pytest.raises(ScaffoldError, match="Python keyword"):
        plugin_names("class")


def test_a_kind_an_installed_plugin_has_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ScaffoldError) as info:
        new_plugin("dynamic", "batcher", tmp_path)
    assert "batcher kind 'dynamic' is already registered by the installed plugin" in str(info.value)
    assert "'builtins.batchers'" in str(info.value)
    assert list(tmp_path.iterdir()) == []
    new_plugin("dynamic", "router", tmp_path)  # kinds are per role


def test_an_existing_folder_with_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "infercore-x").mkdir()
    new_plugin("x", "router", tmp_path)  # an empty folder is fine
    with pytest.raises(ScaffoldError, match="already exists and is not empty"):
        new_plugin("x", "router", tmp_path)


def test_a_folder_that_cannot_be_written_is_refused(tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    # Below a file: no folder can be made there, whoever runs the test (root included).
    with pytest.raises(ScaffoldError, match=r"^--dir: cannot write '.*a-file/infercore-x/"):
        new_plugin("x", "router", a_file)
    assert a_file.read_text() == ""


def test_an_unknown_role_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ScaffoldError, match="choose one of: model_loader, feature_source"):
        new_plugin("x", "model", tmp_path)


def test_every_role_has_a_template() -> None:
    assert list(ROLES) == ROLE_NAMES
    assert {(r.role, r.hook) for r in ROLES.values()} == {(k.role, k.hook) for k in KINDS}
    assert {r.base for r in ROLES.values()} == {k.base.__name__ for k in KINDS}


# --- the command ---------------------------------------------------------------------------


def test_the_command_creates_the_distribution(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "new" / "place"
    assert (
        cli.run(["new-plugin", "shop-items", "--kind", "feature_source", "--dir", str(target)]) == 0
    )
    out = capsys.readouterr().out
    root = target / "infercore-shop-items"
    assert out.startswith(f"created {root}/ (feature_source kind 'shop_items'):")
    for rel in (
        "pyproject.toml",
        "README.md",
        "src/infercore_shop_items/__init__.py",
        "src/infercore_shop_items/features.py",
        "src/infercore_shop_items/py.typed",
        "tests/test_shop_items.py",
    ):
        assert (root / rel).is_file(), rel
        assert f"  {rel}\n" in out
    assert f"uv pip install -e '{root}[test]'" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["new-plugin", "Bad", "--kind", "router"], "plugin name 'Bad' is not valid"),
        (["new-plugin", "none", "--kind", "batcher"], "batcher kind 'none' is already registered"),
        (["new-plugin", "infercore-x", "--kind", "action"], "leave out the 'infercore' prefix"),
    ],
)
def test_command_errors_are_one_line_and_exit_2(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.run(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("infercore: new-plugin: ")
    assert message in err
    assert err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_an_existing_folder_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "infercore-x" / "src").mkdir(parents=True)
    assert cli.run(["new-plugin", "x", "--kind", "router", "--dir", str(tmp_path)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err


def test_an_unknown_kind_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.run(["new-plugin", "x", "--kind", "model"])
    assert info.value.code == 2
    assert "invalid choice: 'model'" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    with pytest.raises(ScaffoldError):
        cli.run(["--debug", "new-plugin", "Bad", "--kind", "router", "--dir", str(tmp_path)])


# --- what is generated ---------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLE_NAMES)
def test_the_distribution_is_complete(generated: dict[str, Path], role: str) -> None:
    root = generated[role]
    names = plugin_names(PLUGIN_OF[role])
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == sorted(
        [
            "README.md",
            "pyproject.toml",
            f"src/{names.package}/__init__.py",
            f"src/{names.package}/{ROLES[role].module}.py",
            f"src/{names.package}/py.typed",
            f"tests/test_{names.kind}.py",
        ]
    )
    for path in root.rglob("*"):
        if path.is_file():
            assert "{{" not in path.read_text(), f"{path}: a placeholder is left"
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert project["project"]["name"] == names.distribution
    assert project["project"]["entry-points"]["infercore"] == {names.kind: names.package}
    assert project["project"]["license"] == "Apache-2.0"
    assert any(dep.startswith("infercore") for dep in project["project"]["dependencies"])
    assert project["build-system"]["build-backend"] == "hatchling.build"
    assert project["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"] == [
        f"src/{names.package}"
    ]


@pytest.mark.parametrize("role", ROLE_NAMES)
def test_the_component_registers_and_its_readme_names_every_option(
    generated: dict[str, Path], role: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from infercore.testing import plugin_manager

    names = plugin_names(PLUGIN_OF[role])
    monkeypatch.syspath_prepend(str(generated[role] / "src"))
    module = importlib.import_module(names.package)
    try:
        plugins = plugin_manager(module)
        cls = plugins.kinds(role)[names.kind]
        assert cls.__name__ == names.camel + ROLES[role].suffix
        assert plugins.plugin_of(role, names.kind) == names.package
        options = [f.name for f in msgspec.structs.fields(cls.Config)]
        assert options, "a scaffold component shows how options are declared"
        readme = (generated[role] / "README.md").read_text()
        for option in options:
            assert f"| `{option}` |" in readme, f"README lacks the option {option}"
        assert f"kind `{names.kind}`" in readme
    finally:
        for key in [k for k in sys.modules if k.startswith(names.package)]:
            del sys.modules[key]


def test_the_generated_code_is_lint_clean_and_formatted(generated: dict[str, Path]) -> None:
    ruff = shutil.which("ruff", path=os.path.dirname(sys.executable)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed")
    folders = [str(p) for p in generated.values()]
    check = _run([ruff, "check", "--no-cache", *folders])
    assert check.returncode == 0, check.stdout + check.stderr
    fmt = _run([ruff, "format", "--check", "--no-cache", *folders])
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_the_generated_code_type_checks_strictly(
    generated: dict[str, Path], tmp_path: Path
) -> None:
    pytest.importorskip("mypy")
    sources = [str(p / "src") for p in generated.values()]
    tests = [str(t) for p in generated.values() for t in (p / "tests").glob("test_*.py")]
    result = _run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--cache-dir",
            str(tmp_path / "mypy"),
            *sources,
            *tests,
        ],
        env=_env(MYPYPATH=os.pathsep.join(sources)),
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_generated_tests_pass(generated: dict[str, Path]) -> None:
    sources = [str(p / "src") for p in generated.values()]
    tests = [str(p / "tests") for p in generated.values()]
    result = _run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        env=_env(PYTHONPATH=os.pathsep.join(sources)),
        cwd=next(iter(generated.values())).parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed and int(passed.group(1)) >= 3 * len(ROLE_NAMES), result.stdout
    assert "failed" not in result.stdout and "error" not in result.stdout.lower()


# --- installed: listed, and usable from a recipe ---------------------------------------------

_SERVE = textwrap.dedent(
    """
    import json, sys
    from infercore.config.compose import compose
    from infercore.runtime import Runtime
    from infercore.testing import app_client

    runtime = Runtime(compose(["+recipe=generated"]))
    with app_client(runtime) as client:
        body = {"instances": [{"id": "a"}, {"id": "b"}]}
        response = client.post("/v1/models/m:predict", json=body)
    print(json.dumps({"status": response.status_code, "body": response.json()}))
    """
)


def _installed(generated: dict[str, Path], site: Path) -> str:
    """A PYTHONPATH on which every generated plugin is importable and its entry point found,
    as after ``pip install -e`` (the tutorial's test does the real install)."""
    paths = []
    for role, root in generated.items():
        names = plugin_names(PLUGIN_OF[role])
        dist = site / f"{names.package}-0.1.0.dist-info"
        dist.mkdir(parents=True, exist_ok=True)
        (dist / "METADATA").write_text(
            f"Metadata-Version: 2.4\nName: {names.distribution}\nVersion: 0.1.0\n"
            "License-Expression: Apache-2.0\n"
        )
        (dist / "entry_points.txt").write_text(f"[infercore]\n{names.kind} = {names.package}\n")
        paths.append(str(root / "src"))
    return os.pathsep.join([*paths, str(site)])


def test_installed_plugins_are_listed_and_a_recipe_uses_their_kinds(
    generated: dict[str, Path], tmp_path: Path
) -> None:
    kinds = {role: plugin_names(PLUGIN_OF[role]).kind for role in ROLE_NAMES}
    env = _env(
        PYTHONPATH=_installed(generated, tmp_path / "site"),
        INFERCORE_LOAD_PLUGINS=",".join(kinds.values()),
        INFERCORE_RECIPES_DIR=str(tmp_path / "recipes"),
    )
    listed = _run([sys.executable, "-m", "infercore.cli", "plugins"], env=env)
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    for role, kind in kinds.items():
        assert rows[kind].split()[1:4] == [
            f"infercore-{kind.replace('_', '-')}",
            "0.1.0",
            "Apache-2.0",
        ]
        assert rows[kind].rstrip().endswith(f"{role}: {kind}")

    (tmp_path / "recipes").mkdir()
    recipe = {
        "features": {
            "kind": kinds["feature_source"],
            "table": {"a": [1, 2, 3], "b": [4, 5, 6]},
        },
        "batching": {"kind": kinds["batcher"]},
        "routing": {"kind": kinds["router"]},
        "models": {
            "m": {
                "versions": {
                    "1": {"loader": {"kind": kinds["model_loader"], "width": 3, "factor": 10}}
                }
            }
        },
    }
    (tmp_path / "recipes" / "generated.yaml").write_text(
        "# @package _global_\n" + json.dumps(recipe)
    )
    validate = _run(
        [sys.executable, "-m", "infercore.cli", "config", "validate", "+recipe=generated"], env=env
    )
    assert validate.returncode == 0, validate.stderr
    assert validate.stdout.startswith("ok: recipe=generated, 1 model(s)")
    typo = _run(
        [
            sys.executable,
            "-m",
            "infercore.cli",
            "config",
            "validate",
            "+recipe=generated",
            "+models.m.versions.1.loader.factr=3",
        ],
        env=env,
    )
    assert typo.returncode == 2
    assert "models.m.versions.1.loader.factr: unknown key" in typo.stderr

    served = _run([sys.executable, "-c", _SERVE], env=env, cwd=tmp_path)
    assert served.returncode == 0, served.stderr
    answer = json.loads(served.stdout)
    assert answer["status"] == 200, answer
    # One output, so V1 predictions are its rows: the features of a and b, times 10.
    assert answer["body"]["predictions"] == [[10.0, 20.0, 30.0], [40.0, 50.0, 60.0]]
