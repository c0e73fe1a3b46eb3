"""The plugin guide's tutorial, followed literally in a fresh virtual environment.

The tutorial of docs/plugins.md is turned into one bash script: its ``bash`` blocks in order,
and each file it asks you to write (a block marked ``<!-- file: PATH -->``) written at that
point. The guide's commands run as written, install line included (infercore is not on PyPI:
the guide installs it from a checkout), with only these substitutions, each of which must match
the guide exactly once:

- the placeholder ``/path/to/infercore`` becomes this checkout;
- ``uv venv .venv --python 3.11`` uses this test's interpreter (no interpreter download);
- port 8080 becomes a free port (at least twice).

The script scaffolds ``infercore-linear``, installs it into the fresh environment, lists it
with ``infercore plugins``, runs its tests (the generated ones, then the tutorial's), validates
the tutorial's recipe, serves it and makes one request; the outputs the guide shows must appear.
Every subprocess is bounded, and the whole process group is killed at the end.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
#: What the guide's install line says in place of the reader's checkout of infercore.
CHECKOUT_PLACEHOLDER = "/path/to/infercore"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _guide() -> Any:
    found = sys.modules.get("plugin_guide")
    if found is not None:
        return found
    spec = importlib.util.spec_from_file_location(
        "plugin_guide", REPO / "tests" / "docs" / "plugin_guide.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["plugin_guide"] = module
    spec.loader.exec_module(module)
    return module


guide = _guide()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tutorial_script(port: int) -> tuple[str, list[Any]]:
    """The tutorial as one bash script, and its blocks."""
    blocks = [b for b in guide.blocks() if b.within(guide.TUTORIAL_HEADING)]
    parts = ["set -euo pipefail"]
    for block in blocks:
        if block.file is not None:
            marker = "INFERCORE_TUTORIAL_EOF"
            assert marker not in block.code
            parts.append(
                f"mkdir -p {shlex.quote(str(Path(block.file).parent))}\n"
                f"cat > {shlex.quote(block.file)} <<'{marker}'\n{block.code}{marker}"
            )
        elif block.lang == "bash":
            parts.append(block.code)
    script = "\n".join(parts) + "\n"
    substitutions = {
        CHECKOUT_PLACEHOLDER: shlex.quote(str(REPO)),
        "uv venv .venv --python 3.11": f"uv venv .venv --python {shlex.quote(sys.executable)}",
        "8080": str(port),
    }
    for old, new in substitutions.items():
        count = script.count(old)
        if old == "8080":
            assert count >= 2, "the tutorial no longer serves on port 8080"
        else:
            assert count == 1, f"the tutorial no longer says {old!r} once (found {count})"
        script = script.replace(old, new)
    return script, blocks


def _shown_after(blocks: list[Any], needle: str) -> str:
    for i, block in enumerate(blocks):
        if block.lang == "bash" and needle in block.code:
            return str(blocks[i + 1].code)
    raise AssertionError(f"no bash block with {needle!r} in the tutorial")


def _run_script(script: str, cwd: Path, *, offline: bool) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("INFERCORE_", "UV_")) and k not in ("VIRTUAL_ENV", "PYTHONPATH")
    }
    if offline:
        env["UV_OFFLINE"] = "1"  # the uv cache usually holds everything
    proc = subprocess.Popen(
        ["bash", "-c", script],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        # The server the tutorial starts in the background, and anything else left behind.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait(timeout=10)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_following_the_tutorial_gives_a_working_plugin(tmp_path: Path) -> None:
    if shutil.which("uv") is None or shutil.which("curl") is None:
        pytest.skip("the tutorial needs uv and curl")
    port = _free_port()
    script, blocks = _tutorial_script(port)
    work = tmp_path / "work"
    work.mkdir()
    result = _run_script(script, work, offline=True)
    stderr = result.stderr.lower()
    if result.returncode != 0 and ("offline" in stderr or "network was disabled" in stderr):
        # Something was not in the uv cache (uv's wording differs between its versions).
        shutil.rmtree(work)
        work.mkdir()
        result = _run_script(script, work, offline=False)
    report = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, report

    out = result.stdout
    # infercore plugins: the installed plugin, its distribution, version, licence and kind.
    rows = [line.split() for line in out.splitlines() if line.startswith("linear ")]
    assert ["linear", "infercore-linear", "0.1.0", "Apache-2.0", "model_loader:", "linear"] in rows
    # The generated tests, then the tutorial's own, pass in the fresh environment.
    assert "4 passed" in out, report
    assert "6 passed" in out, report
    # config validate and the answer to the request are the ones the guide shows.
    validated = _shown_after(blocks, "infercore config validate +recipe=linear").strip()
    assert validated in out.splitlines(), report
    answer = _shown_after(blocks, "curl -s http://127.0.0.1:8080").strip()
    answers = [line for line in out.splitlines() if line.startswith('{"model_name"')]
    assert answers == [answer], report
    assert json.loads(answers[0])["outputs"][0]["data"] == [2.75, 4.5]

    # What the scaffold and the edits left on disk.
    plugin = work / "infercore-linear"
    assert (plugin / "src" / "infercore_linear" / "py.typed").is_file()
    model = (plugin / "src" / "infercore_linear" / "model.py").read_text()
    assert "read_verified" in model
    python = work / ".venv" / "bin" / "python"
    check = subprocess.run(
        [str(python), "-c", "import infercore_linear, infercore; print(infercore_linear.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip().startswith(str(plugin / "src")), "an editable install"
