"""A plugin installed as its own distribution adds a kind that a recipe then uses.

The plugin (``tests/integration/fixtures/echo_plugin``, distribution ``infercore-echo-plugin``)
registers through the entry-point group ``infercore`` exactly as a third-party plugin would: it
is installed, with infercore and infercore-onnx, into a fresh virtual environment, and that
environment's ``infercore`` command lists it, validates a recipe using ``kind: echo`` and serves it.
"""

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
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "echo_plugin"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("INFERCORE_") and k not in ("VIRTUAL_ENV", "PYTHONPATH")
    }
    env.update(extra)
    return env


def _run(cmd: list[str], *, timeout: float, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        cmd, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with infercore, infercore-onnx and the echo plugin."""
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not installed")
    root = tmp_path_factory.mktemp("venv") / "env"
    made = _run([uv, "venv", "-q", "--python", sys.executable, str(root)], timeout=60, env=_env())
    assert made.returncode == 0, made.stderr
    python = root / "bin" / "python"
    install = [
        uv, "pip", "install", "-q", "--python", str(python),
        "-e", str(REPO), "-e", str(REPO / "plugins" / "onnx"), "-e", str(FIXTURE),
    ]  # fmt: skip
    # The uv cache usually holds everything; the registry is the fallback.
    result = _run([*install, "--offline"], timeout=120, env=_env())
    if result.returncode != 0:
        result = _run(install, timeout=180, env=_env())
    assert result.returncode == 0, result.stderr
    return root


@pytest.fixture
def echo_recipes(tmp_path: Path) -> Path:
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "echo.yaml").write_text(
        "# @package _global_\n"
        + textwrap.dedent(
            """\
            description: the echo plugin's model
            models:
              echo:
                versions:
                  "1":
                    loader: {kind: echo}
            """
        )
    )
    return folder


def _infercore(
    venv: Path, *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return _run([str(venv / "bin" / "infercore"), *args], timeout=timeout, env=env, cwd=venv)


def test_plugins_lists_the_installed_plugin(venv: Path) -> None:
    result = _infercore(venv, "plugins", env=_env())
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert "echo" in rows, result.stdout
    cols = rows["echo"].split()
    assert cols[1] == "infercore-echo-plugin"
    assert cols[2] == "0.0.1"
    assert cols[3] == "MIT"
    assert rows["echo"].rstrip().endswith("model_loader: echo")
    assert "onnx" in rows
    assert "sklearn" not in rows, "the fresh environment did not install infercore-sklearn"


def test_the_plugin_can_be_disabled(venv: Path) -> None:
    result = _infercore(venv, "plugins", env=_env(INFERCORE_DISABLE_PLUGINS="echo"))
    assert result.returncode == 0, result.stderr
    assert "echo" not in result.stdout


def test_a_recipe_using_the_plugin_kind_validates(venv: Path, echo_recipes: Path) -> None:
    env = _env(INFERCORE_RECIPES_DIR=str(echo_recipes))
    result = _infercore(venv, "config", "validate", "+recipe=echo", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: recipe=echo")

    shown = _infercore(venv, "config", "show", "+recipe=echo", env=env)
    assert shown.returncode == 0, shown.stderr
    assert "kind: echo" in shown.stdout
    assert "factor: 2.0" in shown.stdout  # the plugin's own Config default, filled in

    typo = _infercore(
        venv,
        "config",
        "validate",
        "+recipe=echo",
        "+models.echo.versions.1.loader.factr=3",
        env=env,
    )
    assert typo.returncode == 2
    assert typo.stderr.startswith("infercore: config error: models.echo.versions.1.loader.factr")
    assert "factor" in typo.stderr


def test_the_recipe_fails_without_the_plugin(venv: Path, echo_recipes: Path) -> None:
    env = _env(INFERCORE_RECIPES_DIR=str(echo_recipes), INFERCORE_DISABLE_PLUGINS="echo")
    result = _infercore(venv, "config", "validate", "+recipe=echo", env=env)
    assert result.returncode == 2
    assert "unknown model_loader 'echo'; available: onnx" in result.stderr


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_answers_with_the_plugin_model(
    venv: Path, echo_recipes: Path, tmp_path: Path
) -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    err_path = tmp_path / "stderr.log"
    with err_path.open("w") as err:
        proc = subprocess.Popen(
            [str(venv / "bin" / "infercore"), "serve", "+recipe=echo", f"server.port={port}"],
            cwd=venv,
            env=_env(INFERCORE_RECIPES_DIR=str(echo_recipes)),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 30
        ready = False
        while time.monotonic() < deadline and not ready:
            assert proc.poll() is None, f"server exited early:\n{err_path.read_text()}"
            try:
                with urllib.request.urlopen(f"{base}/v2/health/ready", timeout=2) as response:
                    ready = response.status == 200
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        assert ready, f"not ready within 30 s:\n{err_path.read_text()}"

        body = {
            "inputs": [
                {"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5, -6.5]}
            ]
        }
        request = urllib.request.Request(
            f"{base}/v2/models/echo/infer",
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            doc = json.loads(response.read())
        assert doc["model_name"] == "echo"
        (output,) = doc["outputs"]
        assert output["name"] == "y"
        assert output["shape"] == [2, 3]
        assert output["datatype"] == "FP32"
        assert output["data"] == [2.0, 4.0, 6.0, 8.0, 10.0, -13.0]

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, err_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
