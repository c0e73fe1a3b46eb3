"""The errors a plugin author meets, as the ``infercore`` command shows them: one line, naming
the plugin, the config path or the component, with a hint.

Each plugin here is a real installed-looking distribution: a package on ``PYTHONPATH`` and a
``*.dist-info`` folder declaring its entry point in the group ``infercore``, as ``pip install``
leaves them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PLUGINS = {
    # A hook whose argument is not the spec's (`runtime`).
    "wrongsig": """
        from infercore import hookimpl

        @hookimpl
        def register_routes(app):
            return []
    """,
    # Two plugins registering the same kind.
    "dup_a": """
        from infercore import hookimpl
        from infercore.testing import FakeModel

        class Dup(FakeModel):
            kind = "dup"

        @hookimpl
        def register_model_loaders():
            return [Dup]
    """,
    "dup_b": """
        from infercore import hookimpl
        from infercore.testing import FakeModel

        class Dup(FakeModel):
            kind = "dup"

        @hookimpl
        def register_model_loaders():
            return [Dup]
    """,
    # A model with options, and one that fails to start.
    "models": """
        from infercore import hookimpl
        from infercore.testing import FakeModel

        class Scaled(FakeModel):
            kind = "scaled"

        class Exploding(FakeModel):
            kind = "exploding"

            async def start(self):
                raise OSError("weights.bin: permission denied")

        @hookimpl
        def register_model_loaders():
            return [Scaled, Exploding]
    """,
}

RECIPES = {
    "scaled": """
        models:
          m:
            versions:
              "1": {loader: {kind: scaled, features: 2}}
    """,
    "exploding": """
        models:
          m:
            versions:
              "1": {loader: {kind: exploding}}
    """,
    "dup": """
        models:
          m:
            versions:
              "1": {loader: {kind: dup}}
    """,
}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("site")
    for name, source in PLUGINS.items():
        package = f"errplug_{name}"
        (root / package).mkdir()
        (root / package / "__init__.py").write_text(textwrap.dedent(source))
        dist = root / f"{package}-1.0.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(
            f"Metadata-Version: 2.4\nName: {package.replace('_', '-')}\nVersion: 1.0\n"
        )
        (dist / "entry_points.txt").write_text(f"[infercore]\n{name} = {package}\n")
    recipes = root / "recipes"
    recipes.mkdir()
    for name, body in RECIPES.items():
        (recipes / f"{name}.yaml").write_text("# @package _global_\n" + textwrap.dedent(body))
    return root


def _infercore(site: Path, load: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("INFERCORE_") and k != "PYTHONPATH"
    }
    env.update(
        PYTHONPATH=str(site),
        INFERCORE_LOAD_PLUGINS=load,
        INFERCORE_RECIPES_DIR=str(site / "recipes"),
    )
    return subprocess.run(
        [sys.executable, "-m", "infercore.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=site,
        check=False,
    )


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("infercore: ")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_a_wrong_hook_signature_names_the_plugin_and_the_argument(site: Path) -> None:
    result = _infercore(site, "wrongsig", "plugins")
    assert result.returncode == 1
    line = _one_line(result.stderr)
    assert line.startswith("infercore: error: plugin 'wrongsig' does not match infercore's hooks")
    assert "app" in line
    assert "(hint: check the hook's argument names against infercore.hookspecs)" in line


def test_a_duplicate_kind_names_both_plugins(site: Path) -> None:
    result = _infercore(site, "dup_a,dup_b", "config", "validate", "+recipe=dup")
    assert result.returncode == 1
    line = _one_line(result.stderr)
    assert "model_loader kind 'dup' is registered by two plugins: 'dup_a' and 'dup_b'" in line
    assert "INFERCORE_DISABLE_PLUGINS" in line  # the hint says how to choose one
    alone = _infercore(site, "dup_a", "config", "validate", "+recipe=dup")
    assert alone.returncode == 0, alone.stderr


def test_options_the_config_rejects_name_the_path_and_a_hint(site: Path) -> None:
    ok = _infercore(site, "models", "config", "validate", "+recipe=scaled")
    assert ok.returncode == 0, ok.stderr
    typo = _infercore(
        site,
        "models",
        "config",
        "validate",
        "+recipe=scaled",
        "+models.m.versions.1.loader.featurs=3",
    )
    assert typo.returncode == 2
    line = _one_line(typo.stderr)
    assert line.startswith(
        "infercore: config error: models.m.versions.1.loader.featurs: unknown key (value 3); "
        "valid keys here: features, latency_s"
    )
    assert "(recipe=scaled)" in line
    assert "(hint: fix the spelling or remove the key)" in line
    wrong_type = _infercore(
        site,
        "models",
        "config",
        "validate",
        "+recipe=scaled",
        "models.m.versions.1.loader.features=two",
    )
    assert wrong_type.returncode == 2
    assert "models.m.versions.1.loader.features: expected int, got 'two'" in _one_line(
        wrong_type.stderr
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_component_failing_to_start_names_the_path_and_the_class(site: Path) -> None:
    result = _infercore(site, "models", "serve", "+recipe=exploding", f"server.port={_free_port()}")
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("infercore: ")]
    assert errors == [
        "infercore: error: models.m.versions.1.loader: Exploding (plugin 'models') failed to "
        "load: "
        "OSError: weights.bin: permission denied"
    ], result.stderr
