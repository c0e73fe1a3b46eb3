"""Through the app: outputs unlike the model's declared ones are a 500 ``backend_error`` whose
log line names the model's config path, the output, what was declared and what came back
(the client body stays generic), on every path a request takes (``none``, ``dynamic``,
``adaptive``, request groups, shadow copies); and a model whose warm-up returns them fails
its load (start-up: exit 1 with one line; a reload: the old instance serves on)."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Literal

import msgspec
import numpy as np
import pytest

from infercore import hookimpl
from infercore.cli import _report
from infercore.components import Model, Tensors, TensorSpec
from infercore.errors import ModelLoadError
from infercore.runtime.errors import LoadFailed
from infercore.testing import (
    app_client,
    async_app_client,
    fake_model_config,
    metric_value,
    runtime_from_dict,
)

Returns = Literal["ok", "float64", "int64", "strings", "wide", "misnamed", "none"]
PATH = "models.m.versions.1.loader"


class SigConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    returns: Returns = "ok"


class SigModel(Model):
    """Declares ``y`` FP32 [-1, 2] and ``label`` BYTES [-1]; ``returns`` says what comes back."""

    kind = "sig"
    platform = "sig"
    Config = SigConfig
    config: SigConfig

    async def start(self) -> None:
        self.inputs = [TensorSpec("x", "FP32", (-1, 4))]
        self.outputs = [TensorSpec("y", "FP32", (-1, 2)), TensorSpec("label", "BYTES", (-1,))]

    async def predict(self, inputs: Tensors) -> Tensors:
        x = inputs["x"]
        y = np.stack([x.sum(axis=1), x.max(axis=1)], axis=1).astype(np.float32)
        label = np.array(["a"] * len(x), dtype=object)
        returns = self.config.returns
        if returns == "float64":
            y = y.astype(np.float64)
        elif returns == "int64":
            y = y.astype(np.int64)
        elif returns == "strings":
            y = y.astype(str).astype(object)
        elif returns == "wide":
            y = np.zeros((len(x), 5), np.float32)
        elif returns == "misnamed":
            return {"Y": y, "label": label}
        elif returns == "none":
            return None  # type: ignore[return-value]
        return {"y": y, "label": label}


class SigPlugin:
    @hookimpl
    def register_model_loaders(self) -> list[type[Model]]:
        return [SigModel]


def loader(returns: Returns) -> dict[str, Any]:
    return {"kind": "sig", "returns": returns}


def runtime(
    returns: Returns = "ok",
    *,
    batching: str = "none",
    warmup: bool = False,
    versions: dict[str, Any] | None = None,
    **model: Any,
) -> Any:
    cfg = fake_model_config(
        batching={"kind": batching},
        versions=versions or {"1": {"loader": loader(returns), "warmup": warmup}},
    )
    cfg["models"]["m"].update(model)
    return runtime_from_dict(cfg, extra_plugins=[("sig", SigPlugin())])


def body(n: int = 1) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [n, 4], "data": [1.0] * 4 * n}]}


GENERIC = {"error": "the model failed to process the request", "reason": "backend_error"}

WRONG: list[tuple[Returns, str]] = [
    ("float64", "model output 'y' is FP64 (float64), declared FP32 [-1, 2]"),
    ("int64", "model output 'y' is INT64 (int64), declared FP32 [-1, 2]"),
    ("strings", "model output 'y' is BYTES (object), declared FP32 [-1, 2]"),
    ("wide", "model output 'y' has shape [1, 5], declared FP32 [-1, 2]"),
]


@pytest.mark.parametrize("batching", ["none", "dynamic", "adaptive"])
@pytest.mark.parametrize(("returns", "logged"), WRONG, ids=[w[0] for w in WRONG])
def test_outputs_unlike_the_metadata_are_500_with_a_log_line_naming_them(
    batching: str, returns: Returns, logged: str, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="infercore"),
        app_client(runtime(returns, batching=batching)) as c,
    ):
        r = c.post("/v2/models/m/infer", json=body())
        assert r.status_code == 500
        assert r.json() == GENERIC  # no path, dtype or output name for the client
        v1 = c.post("/v1/models/m:predict", json={"instances": [[1.0, 2.0, 3.0, 4.0]]})
        assert v1.status_code == 500 and v1.json() == GENERIC
        meta = c.get("/v2/models/m").json()
    assert {"name": "y", "datatype": "FP32", "shape": [-1, 2]} in meta["outputs"]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request failed")]
    # The config path, the output, what was declared and what came back; then how to fix it.
    assert lines and lines[0].startswith(f"request failed: {PATH}: {logged} (hint: "), lines


@pytest.mark.parametrize("batching", ["none", "dynamic", "adaptive"])
def test_declared_outputs_are_served(batching: str) -> None:
    with app_client(runtime("ok", batching=batching, warmup=True)) as c:
        r = c.post("/v2/models/m/infer", json=body(2))
        assert r.status_code == 200, r.text
        y = next(o for o in r.json()["outputs"] if o["name"] == "y")
        assert y["datatype"] == "FP32" and y["shape"] == [2, 2]


def test_grouped_requests_go_through_the_same_check() -> None:
    async def scenario(returns: Returns) -> list[int]:
        rt = runtime(returns, batching="dynamic")
        async with async_app_client(rt) as c:
            assert rt.models["m"].versions["1"].groups is not None  # requests are grouped
            responses = await asyncio.gather(
                *(c.post("/v2/models/m/infer", json=body(1 + i % 2)) for i in range(8))
            )
            for r in responses:
                if r.status_code != 200:
                    assert r.json() == GENERIC
            return [r.status_code for r in responses]

    assert asyncio.run(scenario("ok")) == [200] * 8
    assert asyncio.run(scenario("float64")) == [500] * 8


def test_a_shadow_with_outputs_unlike_its_declaration_counts_errors_only() -> None:
    rt = runtime(
        batching="dynamic",
        versions={
            "1": {"loader": loader("ok")},
            "2": {"loader": loader("float64"), "stage": "shadow", "warmup": False},
        },
        primary="1",
        routing={"kind": "shadow"},
    )

    async def scenario() -> tuple[list[int], str]:
        async with async_app_client(rt) as c:
            statuses = [
                (await c.post("/v2/models/m/infer", json=body())).status_code for _ in range(5)
            ]
            for _ in range(200):
                text = (await c.get("/metrics")).text
                if metric_value(text, "infercore_shadow_requests_total", version="2") >= 5:
                    break
                await asyncio.sleep(0.01)
            return statuses, text

    statuses, text = asyncio.run(scenario())
    assert statuses == [200] * 5
    assert metric_value(text, "infercore_shadow_requests_total", version="2", outcome="error") == 5
    assert metric_value(text, "infercore_shadow_requests_total", version="2", outcome="ok") == 0


# --- the warm-up ---------------------------------------------------------------------------

WARM_UP: list[tuple[Returns, str]] = [
    ("float64", "model output 'y' is FP64 (float64), declared FP32 [-1, 2]"),
    ("misnamed", "model output 'y' is missing or not an array"),
    ("none", "the model returned NoneType, expected a dict of arrays"),
]


@pytest.mark.parametrize(("returns", "reason"), WARM_UP, ids=[w[0] for w in WARM_UP])
def test_a_required_model_whose_warm_up_outputs_are_wrong_fails_start_up(
    returns: Returns, reason: str
) -> None:
    rt = runtime(returns, warmup=True)
    with pytest.raises(ModelLoadError) as info, app_client(rt):
        pass
    assert not rt.ready
    message = info.value.message
    assert message == f"{PATH}: warm-up failed: {reason}" or message.startswith(
        f"{PATH}: warm-up failed: {reason} (hint: "
    ), message
    # What `infercore serve` prints for it: one line, exit 1.
    assert _report(info.value) == 1


def test_a_reload_whose_warm_up_outputs_are_wrong_leaves_the_old_instance_serving() -> None:
    rt = runtime("ok", warmup=True)

    async def scenario() -> None:
        async with async_app_client(rt) as c:
            before = rt.models["m"].versions["1"]
            before.node = loader("float64")  # the artifact changed: its outputs are FP64
            with pytest.raises(LoadFailed, match="warm-up failed: model output 'y' is FP64"):
                await rt.load("m", "1")
            assert rt.models["m"].versions["1"] is before and before.ready
            r = await c.post("/v2/models/m/infer", json=body())
            assert r.status_code == 200, r.text
            text = (await c.get("/metrics")).text
            assert metric_value(text, "infercore_model_load_failures_total", version="1") == 1

    asyncio.run(scenario())


PLUGIN = """
import numpy as np
from infercore import hookimpl
from infercore.components import EmptyConfig, Model, TensorSpec


class Float64Model(Model):
    kind = "float64_out"
    Config = EmptyConfig

    async def start(self):
        self.inputs = [TensorSpec("x", "FP32", (-1, 4))]
        self.outputs = [TensorSpec("y", "FP32", (-1,))]

    async def predict(self, inputs):
        return {"y": inputs["x"].sum(axis=1, dtype=np.float64)}


@hookimpl
def register_model_loaders():
    return [Float64Model]
"""

LAUNCHER = """
import sys
import infercore.plugin_manager as pm
pm.BUILTIN_PLUGINS += (("float64_out", "float64_plugin"),)
from infercore.cli import main
main(sys.argv[1:])
"""


def test_serve_with_a_model_whose_warm_up_outputs_are_wrong_exits_1_with_one_line(
    tmp_path: Path,
) -> None:
    (tmp_path / "float64_plugin.py").write_text(PLUGIN)
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "float64.yaml").write_text(
        "# @package _global_\n"
        + textwrap.dedent(
            """\
            models:
              m:
                versions:
                  "1":
                    loader: {kind: float64_out}
            """
        )
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(tmp_path),
        "PYTHONDONTWRITEBYTECODE": "1",
        "INFERCORE_RECIPES_DIR": str(recipes),
        "INFERCORE_LOAD_PLUGINS": "",
    }
    result = subprocess.run(
        [sys.executable, "-c", LAUNCHER, "serve", "+recipe=float64", "server.port=0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("infercore: ")]
    assert errors == [
        f"infercore: error: {PATH}: warm-up failed: model output 'y' is FP64 (float64), "
        "declared FP32 [-1] (hint: return FP32 (float32) from the model, or declare the output "
        "with the datatype it returns; infercore does not cast outputs)"
    ], result.stderr
