"""A model that fails inside its graph is the model's failure: 500 ``backend_error``, never 400.

ONNX Runtime raises ``INVALID_ARGUMENT`` both for its own input checks and for many failures
inside a node (a Gather index out of range): answered 400 ``invalid_input``, a broken canary
was never counted as failing and the guard never dropped it, while ONNX Runtime's message
(node names, source files) went out in the body. The inputs are checked against the signature
before ONNX Runtime sees them, so whatever it raises while running is the model's: 500
``backend_error`` with a generic message, its text only in the log. A request that does not
match the signature is still a 400, in infercore's words.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from infercore.components import ComponentContext
from infercore.errors import BackendError, InvalidInput
from infercore.testing import async_app_client, runtime_from_dict
from infercore.testing import metric_value as metric
from infercore_onnx import OnnxModel

CONFIG_PATH = "models.fraud.versions.2.loader"
ORT_WORDS = ("ONNXRuntimeError", "Gather", "Non-zero status", "INVALID_ARGUMENT", "idx=")


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def score_model(*, gather: bool) -> onnx.ModelProto:
    """``X`` FP32 [N, 4] (column 0: the amount) -> ``Y`` FP32 [N, 1].

    Without ``gather``: ``Y = amount``. With it, ``Y`` is looked up in a 101-entry table at
    index ``floor(amount * 200)``: any amount over 0.5 is out of the table's range and the
    Gather node fails at run time (the warm-up's zeros pass).
    """
    first = numpy_helper.from_array(np.array([[1], [0], [0], [0]], np.float32), "first")
    nodes = [helper.make_node("MatMul", ["X", "first"], ["amount"])]
    initializers = [first]
    if gather:
        nodes += [
            helper.make_node("Mul", ["amount", "scale"], ["scaled"]),
            helper.make_node("Floor", ["scaled"], ["floored"]),
            helper.make_node("Cast", ["floored"], ["index"], to=TensorProto.INT64),
            helper.make_node("Gather", ["table", "index"], ["Y"], axis=0),
        ]
        initializers += [
            numpy_helper.from_array(np.array(200, np.float32), "scale"),
            numpy_helper.from_array(np.linspace(0, 1, 101, dtype=np.float32), "table"),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["amount"], ["Y"]))
    graph = helper.make_graph(
        nodes,
        "score",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 1])],
        initializers,
    )
    return _model(graph)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for version, gather in (("1", False), ("2", True)):
        folder = tmp_path / "fraud" / version
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(score_model(gather=gather).SerializeToString())
    return tmp_path


def load(root: Path) -> OnnxModel:
    config = msgspec.convert({"path": "fraud/2/model.onnx"}, OnnxModel.Config)
    context = ComponentContext(path=CONFIG_PATH, model_root=root, model_name="fraud", version="2")
    model = OnnxModel(config, context)
    asyncio.run(model.start())
    return model


def rows(*amounts: float) -> np.ndarray[Any, Any]:
    x = np.zeros((len(amounts), 4), np.float32)
    x[:, 0] = amounts
    return x


# -- the model --------------------------------------------------------------------------


@pytest.mark.parametrize("run_on", ["loop", "thread"])
def test_a_failure_inside_a_node_is_a_backend_error_with_ort_text_only_in_the_log(
    root: Path, caplog: pytest.LogCaptureFixture, run_on: str
) -> None:
    model = load(root)
    model = OnnxModel(
        msgspec.convert({"path": "fraud/2/model.onnx", "run_on": run_on}, OnnxModel.Config),
        model.context,
    )
    asyncio.run(model.start())
    asyncio.run(model.warmup())  # zeros: in range
    ok = asyncio.run(model.predict({"X": rows(0.2, 0.5)}))["Y"]
    np.testing.assert_allclose(ok[:, 0], [0.4, 1.0], rtol=1e-6)
    with (
        caplog.at_level(logging.ERROR, logger="infercore.onnx"),
        pytest.raises(BackendError) as info,
    ):
        asyncio.run(model.predict({"X": rows(0.2, 0.9)}))
    # ORT says INVALID_ARGUMENT here, as for its own input checks: still the model's failure.
    assert type(info.value.__cause__).__name__ == "InvalidArgument"
    assert info.value.status_code == 500 and info.value.reason == "backend_error"
    assert str(info.value) == f"{CONFIG_PATH}: the model failed to run"
    logged = " ".join(r.getMessage() for r in caplog.records if r.name == "infercore.onnx")
    assert "Gather" in logged and "out of" in logged


def test_repeated_run_failures_log_one_error_and_nothing_on_stderr(
    root: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    """A broken canary fails every request it gets: one ERROR per kind of failure and 10 s
    (the rest at DEBUG), and ONNX Runtime's own line, which bypasses infercore's log format,
    not at all."""
    model = load(root)
    model = OnnxModel(
        msgspec.convert({"path": "fraud/2/model.onnx", "run_on": "loop"}, OnnxModel.Config),
        model.context,
    )
    asyncio.run(model.start())
    capfd.readouterr()
    with caplog.at_level(logging.DEBUG, logger="infercore.onnx"):
        for _ in range(5):
            with pytest.raises(BackendError):
                asyncio.run(model.predict({"X": rows(0.9)}))
    failed = [r for r in caplog.records if "onnxruntime run failed" in r.getMessage()]
    assert [r.levelno for r in failed] == [logging.ERROR] + [logging.DEBUG] * 4
    assert "Gather" not in capfd.readouterr().err


def test_a_shape_onnxruntime_would_refuse_is_invalid_input_in_infercores_words(
    root: Path,
) -> None:
    model = load(root)
    for bad, shown in ((np.ones((2, 3), np.float32), "[2, 3]"), (np.ones(4, np.float32), "[4]")):
        with pytest.raises(InvalidInput) as info:
            asyncio.run(model.predict({"X": bad}))
        message = str(info.value)
        assert message.startswith(f"input 'X': shape {shown} does not match the model's [-1, 4]")
        assert not any(word in message for word in ("ONNXRuntimeError", "invalid dimensions"))


# -- over HTTP, with a canary -----------------------------------------------------------


def canary_config(**guard: Any) -> dict[str, Any]:
    return {
        "batching": {"kind": "none"},
        "models": {
            "fraud": {
                "primary": "1",
                "routing": {"kind": "weighted"},
                "rollout": {"guard": {"min_requests": 20, "check_interval_s": 0, **guard}},
                "versions": {
                    "1": {"loader": {"kind": "onnx", "path": "fraud/1/model.onnx"}},
                    "2": {
                        "loader": {"kind": "onnx", "path": "fraud/2/model.onnx"},
                        "stage": "canary",
                        "weight": 50,
                    },
                },
            }
        },
    }


def body(amount: float) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [amount, 0.0, 0.0, 0.0]}
        ]
    }


def test_over_http_a_node_failure_is_500_backend_error_and_the_canary_guard_drops_it(
    root: Path,
) -> None:
    rt = runtime_from_dict(canary_config(), recipes_dir=root)

    async def scenario() -> tuple[list[tuple[int, Any]], list[tuple[int, Any]], str]:
        async with async_app_client(rt) as c:
            direct = []
            for amount in (0.3, 0.9):
                r = await c.post("/v2/models/fraud/versions/2/infer", json=body(amount))
                direct.append((r.status_code, r.json()))
            routed = []
            for _ in range(200):
                r = await c.post("/v2/models/fraud/infer", json=body(0.9))
                routed.append((r.status_code, r.json()))
            return direct, routed, (await c.get("/metrics")).text

    direct, routed, text = asyncio.run(scenario())
    (ok_status, ok), (failed_status, failed) = direct
    assert ok_status == 200 and ok["model_version"] == "2"
    assert failed_status == 500
    # The server's generic message: no ONNX Runtime text, no config path.
    assert failed == {"error": "the model failed to process the request", "reason": "backend_error"}
    failures = [answer for status, answer in routed if status != 200]
    assert failures, "the canary never failed"
    assert all(a["reason"] == "backend_error" for a in failures), failures
    assert not any(word in a["error"] for a in failures for word in ORT_WORDS)
    # The canary's failures count against it, and the guard drops it: the primary answers on.
    served = rt.models["fraud"]
    assert served.versions["2"].weight == 0
    assert metric(text, "infercore_canary_guard_trips_total", version="2", cause="error_rate") == 1
    # Every failure counts against version 2: the routed ones and the one sent to it directly.
    assert metric(text, "infercore_route_errors_total", version="2") == len(failures) + 1
    last_failure = max(i for i, (status, _) in enumerate(routed) if status != 200)
    assert {a["model_version"] for _, a in routed[last_failure + 1 :]} == {"1"}
    assert len(routed) - last_failure > 100
