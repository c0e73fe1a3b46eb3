"""A real ``infercore serve`` with two workers and an installed plugin whose ``predict`` sleeps
on the event loop: the worker that served it logs one WARNING naming the plugin's
``SleepyModel.predict`` (module and line, no file path), then the stall's end; ``/metrics``
from either worker counts the stall; SIGTERM still stops everything with exit 0.
"""

from __future__ import annotations

import os
import subprocess
import textwrap
import time
from pathlib import Path

import e2e_support as e2e
import httpx
import pytest

from infercore.testing import metric_value

pytestmark = pytest.mark.e2e

PLUGIN = textwrap.dedent(
    """\
    import time

    from infercore import hookimpl
    from infercore.components import EmptyConfig, Model, TensorSpec


    class SleepyModel(Model):
        kind = "sleepy"
        Config = EmptyConfig

        async def start(self):
            self.inputs = [TensorSpec("x", "FP32", (-1, 4))]
            self.outputs = [TensorSpec("y", "FP32", (-1,))]

        async def predict(self, inputs):
            x = inputs["x"]
            if len(x) and x[0, 0] == 1:
                time.sleep(0.6)
            return {"y": x.sum(axis=1)}


    @hookimpl
    def register_model_loaders():
        return [SleepyModel]
    """
)
SLEEP_LINE = 1 + PLUGIN.splitlines().index("            time.sleep(0.6)")
CULPRIT = f"sleepy_loop_plugin:{SLEEP_LINE} SleepyModel.predict"
SLOW = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}


def _install(root: Path) -> dict[str, str]:
    """The plugin, visible to every worker through its entry point (as an install makes it),
    and a recipe serving it; the environment that finds both."""
    site = root / "site"
    dist = site / "sleepy_loop_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (site / "sleepy_loop_plugin.py").write_text(PLUGIN)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: sleepy-loop-plugin\nVersion: 0.1\n"
    )
    (dist / "entry_points.txt").write_text("[infercore]\nsleepy = sleepy_loop_plugin\n")
    recipes = root / "recipes"
    recipes.mkdir()
    (recipes / "sleepy.yaml").write_text(
        '# @package _global_\nmodels:\n  m:\n    versions:\n      "1":\n'
        "        loader: {kind: sleepy}\n"
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "INFERCORE_RECIPES_DIR": str(recipes)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    for name in ("INFERCORE_PORT", "INFERCORE_LOAD_PLUGINS", "INFERCORE_DISABLE_PLUGINS"):
        env.pop(name, None)
    return env


def _long_stalls(metrics: str) -> float:
    """Stalls over 0.25 s, as the histogram of every worker counts them."""
    count = metric_value(metrics, "infercore_event_loop_stall_seconds_count")
    return count - metric_value(metrics, "infercore_event_loop_stall_seconds_bucket", le="0.25")


def test_two_workers_name_a_predict_that_blocks_the_loop_and_count_it(tmp_path: Path) -> None:
    env = _install(tmp_path)
    port = e2e.free_port()
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                str(e2e.INFERCORE),
                "serve",
                "+recipe=sleepy",
                "server.workers=2",
                "server.loop_block_warn_ms=100",
                f"server.port={port}",
            ],
            cwd=e2e.REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    server = e2e.Server(process, port, log)
    try:
        e2e.wait_ready(server)
        with httpx.Client(base_url=server.url, timeout=10.0) as client:
            assert client.post("/v2/models/m/infer", json=SLOW).status_code == 200
            # Other stalls may be counted too (a busy machine can hold a loop 100 ms): wait
            # for one of over 0.25 s, which only the sleep makes.
            deadline = time.monotonic() + 10
            while _long_stalls(text := client.get("/metrics").text) < 1:
                assert time.monotonic() < deadline, text
                time.sleep(0.05)
        assert metric_value(text, "infercore_event_loop_stalls_total") >= 1
    finally:
        code = e2e.stop_server(server)
    output = server.log_text()
    assert code == 0, output
    named = [
        line
        for line in output.splitlines()
        if "WARNING infercore.server.loop: event loop blocked for" in line and CULPRIT in line
    ]
    assert len(named) == 1, output
    assert "(plugin 'sleepy')" in named[0]
    assert str(tmp_path) not in named[0]  # module names, not the plugin's file path (S6)
    assert any(
        "INFO    infercore.server.loop: event loop running again after" in line and CULPRIT in line
        for line in output.splitlines()
    ), output
