"""The ``onnx`` model loader against real ONNX models built at fixture time with ``onnx.helper``."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata as md
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

import infercore_onnx
from infercore.components import ComponentContext, TensorSpec
from infercore.errors import (
    BackendError,
    ConfigError,
    InvalidInput,
    ModelLoadError,
    ModelNotReady,
)
from infercore_onnx import ModelTooLarge, OnnxModel, external_data
from infercore_onnx import model as onnx_model_module
from infercore_onnx.feed import prepare_input

CONFIG_PATH = "models.iris.versions.1.loader"
HAS_CUDA = "CUDAExecutionProvider" in onnxruntime.get_available_providers()

W = np.arange(8, dtype=np.float32).reshape(4, 2) / 10
B = np.array([0.5, -1.0], dtype=np.float32)


# -- model builders -----------------------------------------------------------------------


def _model(graph: onnx.GraphProto, *, ml: bool = False) -> onnx.ModelProto:
    # Opset 17 / IR 8: old enough for every onnxruntime this plugin supports (>= 1.18).
    opsets = [helper.make_opsetid("", 17)]
    if ml:
        opsets.append(helper.make_opsetid("ai.onnx.ml", 1))
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def linear_model() -> onnx.ModelProto:
    """Y = X @ W + B with a symbolic batch dimension."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["X", "W"], ["XW"]),
            helper.make_node("Add", ["XW", "B"], ["Y"]),
        ],
        "linear",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")],
    )
    onnx.checker.check_model(_model(graph))
    return _model(graph)


def int64_model() -> onnx.ModelProto:
    """Y = X * 3 for int64 tensors, batch dimension left unnamed."""
    three = numpy_helper.from_array(np.array([3], dtype=np.int64), "three")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["X", "three"], ["Y"])],
        "int64",
        [helper.make_tensor_value_info("X", TensorProto.INT64, [None, 3])],
        [helper.make_tensor_value_info("Y", TensorProto.INT64, [None, 3])],
        [three],
    )
    return _model(graph)


def string_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["S"], ["T"])],
        "strings",
        [helper.make_tensor_value_info("S", TensorProto.STRING, ["N", 2])],
        [helper.make_tensor_value_info("T", TensorProto.STRING, ["N", 2])],
    )
    return _model(graph)


DTYPES = {
    TensorProto.BOOL: "BOOL",
    TensorProto.INT8: "INT8",
    TensorProto.INT16: "INT16",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.UINT8: "UINT8",
    TensorProto.UINT16: "UINT16",
    TensorProto.UINT32: "UINT32",
    TensorProto.UINT64: "UINT64",
    TensorProto.FLOAT16: "FP16",
    TensorProto.FLOAT: "FP32",
    TensorProto.DOUBLE: "FP64",
    TensorProto.STRING: "BYTES",
}


def all_dtypes_model() -> onnx.ModelProto:
    """One Identity per element type, so the signature holds every mapped type."""
    nodes, ins, outs = [], [], []
    for proto_type, name in DTYPES.items():
        nodes.append(helper.make_node("Identity", [f"in_{name}"], [f"out_{name}"]))
        ins.append(helper.make_tensor_value_info(f"in_{name}", proto_type, ["batch", 3]))
        outs.append(helper.make_tensor_value_info(f"out_{name}", proto_type, ["batch", 3]))
    return _model(helper.make_graph(nodes, "dtypes", ins, outs))


def zipmap_model() -> onnx.ModelProto:
    """What skl2onnx exports for a classifier by default: probabilities as seq(map)."""
    zipmap_type = helper.make_sequence_type_proto(
        helper.make_map_type_proto(
            TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])
        )
    )
    graph = helper.make_graph(
        [
            helper.make_node(
                "ZipMap",
                ["P"],
                ["output_probability"],
                domain="ai.onnx.ml",
                classlabels_int64s=[0, 1],
            )
        ],
        "zipmap",
        [helper.make_tensor_value_info("P", TensorProto.FLOAT, ["N", 2])],
        [helper.make_value_info("output_probability", zipmap_type)],
    )
    return _model(graph, ml=True)


def sequence_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("SequenceConstruct", ["X"], ["S"])],
        "sequence",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_sequence_value_info("S", TensorProto.FLOAT, None)],
    )
    return _model(graph)


def failing_model() -> onnx.ModelProto:
    """Valid signature, but Reshape of N*4 values into 3 fails at run time for any N."""
    shape = numpy_helper.from_array(np.array([3], dtype=np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["X", "shape"], ["Y"])],
        "failing",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3])],
        [shape],
    )
    return _model(graph)


def _external(name: str, location: str, **entries: int) -> TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[4, 2])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, **entries}.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)
    return tensor


def external_data_model(location: str) -> onnx.ModelProto:
    """The linear model with W stored externally at ``location`` (written verbatim)."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        "external",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 2])],
        [_external("W", location)],
    )
    return _model(graph)


def two_external_tensors_model(first: str, second: str) -> onnx.ModelProto:
    """Y = X @ A + X @ B, with A at offset 0 of ``first`` and B at offset 32 of ``second``."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["X", "A"], ["XA"]),
            helper.make_node("MatMul", ["X", "B"], ["XB"]),
            helper.make_node("Add", ["XA", "XB"], ["Y"]),
        ],
        "two_external",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 2])],
        [_external("A", first, offset=0, length=32), _external("B", second, offset=32)],
    )
    return _model(graph)


# -- helpers --------------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    model_root = tmp_path / "models"
    (model_root / "iris" / "artifacts").mkdir(parents=True)
    return model_root


def save(root: Path, model: onnx.ModelProto, rel: str = "iris/artifacts/model.onnx") -> Path:
    target = root / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    # Raw bytes instead of onnx.save: the external-data tests need locations onnx.save refuses.
    target.write_bytes(model.SerializeToString())
    return target


def make(root: Path, **options: Any) -> OnnxModel:
    options.setdefault("path", "iris/artifacts/model.onnx")
    config = msgspec.convert(options, OnnxModel.Config)
    context = ComponentContext(path=CONFIG_PATH, model_root=root, model_name="iris", version="1")
    return OnnxModel(config, context)


def load(root: Path, **options: Any) -> OnnxModel:
    model = make(root, **options)
    asyncio.run(model.start())
    return model


def load_error(root: Path, error: type[Exception], **options: Any) -> Exception:
    model = make(root, **options)
    with pytest.raises(error) as info:
        asyncio.run(model.start())
    # A failed load keeps nothing: no signature, and predict refuses.
    assert model.inputs == [] and model.outputs == []
    with pytest.raises(ModelNotReady):
        asyncio.run(model.predict({}))
    return info.value


def assert_no_paths(message: str, root: Path) -> None:
    assert str(root.parent) not in message
    assert str(root.resolve().parent) not in message


# -- plugin ---------------------------------------------------------------------------------


def test_hook_registers_the_onnx_loader() -> None:
    assert infercore_onnx.register_model_loaders() == [OnnxModel]
    assert OnnxModel.kind == "onnx"
    assert OnnxModel.platform == "onnxruntime_onnx"


def test_entry_point_points_at_the_plugin_module() -> None:
    eps = {ep.name: ep.value for ep in md.entry_points(group="infercore")}
    assert eps.get("onnx") == "infercore_onnx"


def test_importing_the_plugin_does_not_import_onnxruntime() -> None:
    code = "import sys, infercore_onnx; print('onnxruntime' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "False"


# -- config ---------------------------------------------------------------------------------


def test_config_defaults() -> None:
    config = msgspec.convert({"path": "m.onnx"}, OnnxModel.Config)
    assert config == OnnxModel.Config(path="m.onnx")
    assert config.max_model_bytes == 2 * 1024**3  # finite: protobuf's limit for one message
    assert (config.sha256, config.intra_op_num_threads, config.inter_op_num_threads) == (None, 1, 1)
    assert (config.execution_mode, config.graph_optimization_level, config.device) == (
        "sequential",
        "all",
        "cpu",
    )


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"path": "m.onnx", "devcie": "cpu"}, "unknown field `devcie`"),
        ({}, "missing required field `path`"),
        ({"path": ""}, "length >= 1"),
        ({"path": "m.onnx", "intra_op_num_threads": -1}, ">= 0"),
        ({"path": "m.onnx", "inter_op_num_threads": -2}, ">= 0"),
        ({"path": "m.onnx", "device": "gpu"}, "Invalid enum value 'gpu'"),
        ({"path": "m.onnx", "execution_mode": "fast"}, "Invalid enum value 'fast'"),
        ({"path": "m.onnx", "graph_optimization_level": "max"}, "Invalid enum value 'max'"),
        ({"path": "m.onnx", "sha256": "abc"}, "matching regex"),
        ({"path": "m.onnx", "external_data_sha256": {"w.bin": "abc"}}, "matching regex"),
        ({"path": "m.onnx", "external_data_sha256": {"": "0" * 64}}, "length >= 1"),
        ({"path": "m.onnx", "external_data_sha256": ["w.bin"]}, "Expected `object`"),
        ({"path": "m.onnx", "run_on": "gpu"}, "Invalid enum value 'gpu'"),
        ({"path": "m.onnx", "loop_max_ms": -1}, ">= 0"),
        ({"path": "m.onnx", "loop_max_ms": 5000}, "<= 1000"),
        ({"path": "m.onnx", "max_model_bytes": 0}, ">= 1"),
        ({"path": "m.onnx", "max_model_bytes": "2GiB"}, "Expected `int`"),
    ],
)
def test_config_rejects_bad_options(options: dict[str, Any], needle: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=needle):
        msgspec.convert(options, OnnxModel.Config)


def test_session_options_follow_the_config(root: Path) -> None:
    save(root, linear_model())
    model = load(
        root,
        intra_op_num_threads=2,
        inter_op_num_threads=3,
        execution_mode="parallel",
        graph_optimization_level="basic",
    )
    options = model._session.get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.inter_op_num_threads == 3
    assert options.execution_mode == onnxruntime.ExecutionMode.ORT_PARALLEL
    assert options.graph_optimization_level == onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC


# -- signature ------------------------------------------------------------------------------


def test_signature_of_the_linear_model(root: Path) -> None:
    save(root, linear_model())
    model = load(root)
    assert model.inputs == [TensorSpec("X", "FP32", (-1, 4))]
    assert model.outputs == [TensorSpec("Y", "FP32", (-1, 2))]
    assert model.batchable
    assert model.providers == ["CPUExecutionProvider"]


def test_signature_maps_every_element_type(root: Path) -> None:
    save(root, all_dtypes_model())
    model = load(root)
    assert {s.name: s.datatype for s in model.inputs} == {f"in_{n}": n for n in DTYPES.values()}
    assert {s.name: s.datatype for s in model.outputs} == {f"out_{n}": n for n in DTYPES.values()}
    assert {s.shape for s in model.inputs + model.outputs} == {(-1, 3)}


def test_unnamed_dimension_becomes_minus_one(root: Path) -> None:
    save(root, int64_model())
    model = load(root)
    assert model.inputs == [TensorSpec("X", "INT64", (-1, 3))]


def test_zipmap_output_is_refused_with_a_hint(root: Path) -> None:
    save(root, zipmap_model())
    error = load_error(root, ModelLoadError)
    assert "output_probability" in str(error)
    assert "seq(map(int64,tensor(float)))" in str(error)
    assert "zipmap" in str(error).lower()
    assert CONFIG_PATH in str(error)


def test_sequence_output_is_refused(root: Path) -> None:
    save(root, sequence_model())
    error = load_error(root, ModelLoadError)
    assert "'S'" in str(error) and "not a tensor" in str(error)


def test_skl2onnx_classifier_with_and_without_zipmap(root: Path) -> None:
    skl2onnx = pytest.importorskip("skl2onnx")
    linear_model_module = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(60, 4)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    clf = linear_model_module.LogisticRegression().fit(x, y)

    save(root, skl2onnx.to_onnx(clf, x[:1], target_opset=17))
    error = load_error(root, ModelLoadError)
    assert "zipmap" in str(error).lower()

    save(root, skl2onnx.to_onnx(clf, x[:1], options={"zipmap": False}, target_opset=17))
    model = load(root)
    assert [s.datatype for s in model.outputs] == ["INT64", "FP32"]
    out = asyncio.run(model.predict({"X": x[:5]}))
    np.testing.assert_array_equal(out["label"], clf.predict(x[:5]))
    np.testing.assert_allclose(out["probabilities"], clf.predict_proba(x[:5]), rtol=1e-4)


# -- predict --------------------------------------------------------------------------------


def test_predict_matches_numpy_for_a_batch(root: Path) -> None:
    save(root, linear_model())
    model = load(root)
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    out = asyncio.run(model.predict({"X": x}))
    assert list(out) == ["Y"]
    assert out["Y"].shape == (5, 2)
    np.testing.assert_allclose(out["Y"], x @ W + B, rtol=1e-5, atol=1e-6)


class _ThreadCalls:
    """Counts the calls ``asyncio.to_thread`` gets from the plugin (and still runs them)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = asyncio.to_thread

        async def to_thread(fn: Any, /, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return await real(fn, *args, **kwargs)

        monkeypatch.setattr(asyncio, "to_thread", to_thread)


class _SlowSession:
    """A model's session whose every call first spends ``cpu_s`` seconds of CPU (the
    ``run_on: auto`` estimate counts CPU time, not waiting)."""

    def __init__(self, session: Any, cpu_s: float) -> None:
        self.session = session
        self.cpu_s = cpu_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)

    def run(self, *args: Any) -> Any:
        import time

        until = time.thread_time() + self.cpu_s
        while time.thread_time() < until:
            pass
        return self.session.run(*args)


async def _predict_n(model: OnnxModel, n: int) -> list[Any]:
    x = np.ones((2, 4), dtype=np.float32)
    return [await model.predict({"X": x}) for _ in range(n)]


@pytest.mark.parametrize(("run_on", "threaded"), [("loop", 0), ("thread", 5), ("auto", 0)])
def test_run_on_chooses_where_a_call_runs(
    root: Path, monkeypatch: pytest.MonkeyPatch, run_on: str, threaded: int
) -> None:
    save(root, linear_model())
    model = load(root, run_on=run_on)
    spy = _ThreadCalls(monkeypatch)
    outs = asyncio.run(_predict_n(model, 5))
    assert spy.calls == threaded
    for out in outs:  # same answers wherever it ran
        np.testing.assert_allclose(out["Y"], np.ones((2, 4)) @ W + B, rtol=1e-5, atol=1e-6)


def test_run_on_auto_moves_a_slow_model_to_a_thread_and_probes_it_again(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save(root, linear_model())
    model = load(root, loop_max_ms=0.5)
    slow = model._session = _SlowSession(model._session, 0.005)  # ten times loop_max_ms
    spy = _ThreadCalls(monkeypatch)
    asyncio.run(_predict_n(model, 1))  # measured on the loop: too slow for it
    assert spy.calls == 0
    asyncio.run(_predict_n(model, 10))
    assert spy.calls == 10
    # Once in _PROBE_EVERY thread calls it is measured on the loop again; fast now, it stays.
    slow.cpu_s = 0.0
    asyncio.run(_predict_n(model, infercore_onnx.model._PROBE_EVERY - 10))
    calls = spy.calls
    asyncio.run(_predict_n(model, 5))
    assert spy.calls == calls, "a model that became fast went on running in a thread"


def test_run_on_auto_never_probes_a_model_much_slower_than_loop_max_ms_on_the_loop(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A probe runs one whole call on the event loop; for a heavy model (an MLP of 30 ms a
    # batch) every request in flight would wait that long. Its calls in the worker thread say
    # it is still far too slow, so it is not probed.
    save(root, linear_model())
    model = load(root, loop_max_ms=0.5)
    model._session = _SlowSession(model._session, 0.003)  # six times loop_max_ms
    spy = _ThreadCalls(monkeypatch)
    asyncio.run(_predict_n(model, 1))  # measured on the loop: too slow for it
    n = infercore_onnx.model._PROBE_EVERY + 20
    asyncio.run(_predict_n(model, n))
    assert spy.calls == n  # every one in a thread: no call probed on the loop


def test_predict_rows_are_independent(root: Path) -> None:
    save(root, linear_model())
    model = load(root)
    x = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    batch = asyncio.run(model.predict({"X": x}))["Y"]
    for i in range(3):
        row = asyncio.run(model.predict({"X": x[i : i + 1]}))["Y"]
        np.testing.assert_allclose(batch[i : i + 1], row, rtol=1e-6)


def test_predict_accepts_float64_and_non_contiguous_arrays(root: Path) -> None:
    save(root, linear_model())
    model = load(root)
    wide = np.random.default_rng(2).normal(size=(3, 8))
    x = wide[:, ::2]  # float64, strided
    assert not x.flags.c_contiguous
    out = asyncio.run(model.predict({"X": x}))
    np.testing.assert_allclose(out["Y"], x.astype(np.float32) @ W + B, rtol=1e-5, atol=1e-6)


def test_prepare_input_does_not_copy_a_ready_array() -> None:
    spec = TensorSpec("X", "FP32", (-1, 4))
    ready = np.zeros((2, 4), dtype=np.float32)
    assert prepare_input(spec, ready) is ready
    fortran = np.asfortranarray(np.zeros((2, 4), dtype=np.float32))
    prepared = prepare_input(spec, fortran)
    assert prepared.flags.c_contiguous and prepared.dtype == np.float32


def test_prepare_input_refuses_floats_for_an_integer_input() -> None:
    with pytest.raises(InvalidInput, match="'X'"):
        prepare_input(TensorSpec("X", "INT64", (-1, 3)), np.ones((1, 3)))


def test_int64_model_predicts_and_warms_up(root: Path) -> None:
    save(root, int64_model())
    model = load(root)
    asyncio.run(model.warmup())
    x = np.array([[1, 2, 3], [-4, 5, 2**40]], dtype=np.int64)
    out = asyncio.run(model.predict({"X": x}))
    assert out["Y"].dtype == np.int64
    np.testing.assert_array_equal(out["Y"], x * 3)


def test_string_model_takes_bytes_and_str(root: Path) -> None:
    save(root, string_model())
    model = load(root)
    assert model.inputs == [TensorSpec("S", "BYTES", (-1, 2))]
    asyncio.run(model.warmup())
    s = np.array([[b"caf\xc3\xa9", "tea"], [b"", "x"]], dtype=object)
    out = asyncio.run(model.predict({"S": s}))
    assert out["T"].tolist() == [["café", "tea"], ["", "x"]]


def test_string_input_that_is_not_utf8_is_invalid_input(root: Path) -> None:
    save(root, string_model())
    model = load(root)
    with pytest.raises(InvalidInput, match="UTF-8"):
        asyncio.run(model.predict({"S": np.array([[b"\xff", b"ok"]], dtype=object)}))


def test_warmup_covers_every_element_type(root: Path) -> None:
    save(root, all_dtypes_model())
    model = load(root)
    calls: list[dict[str, npt.NDArray[Any]]] = []
    predict = model.predict

    async def spy(inputs: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        out = await predict(inputs)
        calls.append(out)
        return out

    model.predict = spy  # type: ignore[method-assign]
    asyncio.run(model.warmup())
    assert len(calls) == 1
    assert {k: v.shape for k, v in calls[0].items()} == {
        f"out_{n}": (1, 3) for n in DTYPES.values()
    }


def test_missing_input_is_invalid_input(root: Path) -> None:
    save(root, linear_model())
    model = load(root)
    with pytest.raises(InvalidInput, match="'X'"):
        asyncio.run(model.predict({}))


def test_shape_onnxruntime_would_refuse_is_invalid_input_before_it_runs(root: Path) -> None:
    save(root, linear_model())
    model = load(root)
    with pytest.raises(InvalidInput, match=r"input 'X': shape \[2, 3\] does not match") as info:
        asyncio.run(model.predict({"X": np.ones((2, 3), dtype=np.float32)}))
    assert "ONNXRuntimeError" not in str(info.value)


def test_runtime_failure_is_a_backend_error_with_a_generic_message(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save(root, failing_model())
    model = load(root)
    x = np.ones((1, 4), dtype=np.float32)
    with (
        caplog.at_level(logging.ERROR, logger="infercore.onnx"),
        pytest.raises(BackendError) as info,
    ):
        asyncio.run(model.predict({"X": x}))
    assert info.value.message == f"{CONFIG_PATH}: the model failed to run"
    logged = [r.getMessage() for r in caplog.records if r.name == "infercore.onnx"]
    assert any("Reshape" in line for line in logged)


def test_stop_drops_the_session(root: Path) -> None:
    save(root, linear_model())
    model = load(root)
    asyncio.run(model.stop())
    with pytest.raises(ModelNotReady):
        asyncio.run(model.predict({"X": np.ones((1, 4), dtype=np.float32)}))


# -- artifacts ------------------------------------------------------------------------------


def test_pinned_sha256_that_matches_loads(root: Path) -> None:
    artifact = save(root, linear_model())
    digest = hashlib.sha256(artifact.read_bytes()).hexdigest()
    model = load(root, sha256=digest.upper())
    assert model.inputs == [TensorSpec("X", "FP32", (-1, 4))]


def test_pinned_sha256_mismatch_loads_nothing(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save(root, linear_model())
    sessions: list[Any] = []
    real = onnxruntime.InferenceSession

    def spy(*args: Any, **kwargs: Any) -> Any:
        sessions.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", spy)
    error = load_error(root, ModelLoadError, sha256="0" * 64)
    assert "sha256 mismatch" in str(error)
    assert f"{CONFIG_PATH}.sha256" in str(error)
    assert sessions == []


@pytest.mark.parametrize("pinned", [True, False], ids=["sha256", "no-sha256"])
def test_a_file_swapped_after_its_checks_is_not_what_loads(
    root: Path, monkeypatch: pytest.MonkeyPatch, pinned: bool
) -> None:
    """ONNX Runtime loads the bytes whose digest and external data were checked: a file
    swapped on disk between the checks and the load (another model) cannot slip in."""
    artifact = save(root, linear_model())
    digest = hashlib.sha256(artifact.read_bytes()).hexdigest()
    real = external_data.external_files

    def then_swap(*args: Any, **kwargs: Any) -> list[external_data.ExternalFile] | None:
        found = real(*args, **kwargs)
        artifact.write_bytes(int64_model().SerializeToString())  # checked, then swapped
        return found

    monkeypatch.setattr(external_data, "external_files", then_swap)
    monkeypatch.setattr(onnx_model_module, "external_files", then_swap)
    model = load(root, **({"sha256": digest} if pinned else {}))
    assert model.inputs == [TensorSpec("X", "FP32", (-1, 4))]  # the linear model, not int64


def test_missing_file_is_a_load_error(root: Path) -> None:
    error = load_error(root, ModelLoadError, path="iris/artifacts/nope.onnx")
    assert CONFIG_PATH in str(error)


def test_directory_is_a_load_error(root: Path) -> None:
    error = load_error(root, ModelLoadError, path="iris/artifacts")
    assert "not a file" in str(error)


@pytest.mark.parametrize("with_onnx_check", [True, False], ids=["onnx-check", "ort-only"])
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_file_is_a_load_error_without_paths(
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    damage: str,
    with_onnx_check: bool,
) -> None:
    if not with_onnx_check:
        # As on a server without the `onnx` package: only onnxruntime reads the file.
        monkeypatch.setattr(external_data, "_onnx", lambda: None)
    good = linear_model().SerializeToString()
    data = {
        "truncated": good[: len(good) // 2],
        "garbage": b"\x08\x07not a model at all" * 4,
        "empty": b"",
    }[damage]
    (root / "iris/artifacts/model.onnx").write_bytes(data)
    with caplog.at_level(logging.INFO, logger="infercore.onnx"):
        error = load_error(root, ModelLoadError)
    message = str(error)
    assert CONFIG_PATH in message
    assert "\n" not in message
    assert_no_paths(message, root)
    for record in caplog.records:
        assert_no_paths(record.getMessage(), root)


def test_an_onnx_file_over_the_default_limit_is_refused_before_it_is_read(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 3 GiB file (sparse: no disk used) is refused from its size at once; read, it would
    take 3 GiB of memory before protobuf refused it."""
    with (root / "iris/artifacts/model.onnx").open("wb") as fh:
        fh.truncate(3 * 1024**3)
    sessions = before_session(monkeypatch)
    error = load_error(root, ModelTooLarge)
    assert isinstance(error, ModelLoadError)
    assert (error.size, error.limit) == (3 * 1024**3, 2 * 1024**3)
    message = str(error)
    assert f"{CONFIG_PATH}.path: the ONNX file is 3,221,225,472 bytes (3 GiB)" in message
    assert "over the limit of 2,147,483,648 bytes (2 GiB)" in message
    assert f"({CONFIG_PATH}.max_model_bytes); nothing was read" in message
    assert "external data" in message  # how a model that large is saved
    assert_no_paths(message, root)
    assert sessions == []


def test_max_model_bytes_bounds_the_onnx_file(root: Path) -> None:
    size = save(root, linear_model()).stat().st_size
    error = load_error(root, ModelTooLarge, max_model_bytes=size - 1)
    assert (error.size, error.limit) == (size, size - 1)
    assert f"the ONNX file is {size:,} bytes, over the limit of {size - 1:,} bytes" in str(error)
    assert f"raise {CONFIG_PATH}.max_model_bytes (default 2,147,483,648 bytes" in str(error)
    assert load(root, max_model_bytes=size).inputs == [TensorSpec("X", "FP32", (-1, 4))]


def test_an_onnx_file_that_grows_while_read_is_refused(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read stops one byte past the size checked: a file that grew since (here: one whose
    size was taken before a writer appended) is refused, not read on past the bound."""
    artifact = save(root, linear_model())
    inode, real = artifact.stat().st_ino, os.fstat

    def earlier(fd: int) -> os.stat_result:
        found = real(fd)
        if found.st_ino != inode:
            return found
        fields = list(found)
        fields[6] = 16  # st_size, as it was before the writer went on
        return os.stat_result(fields)

    monkeypatch.setattr(os, "fstat", earlier)
    error = load_error(root, ModelLoadError, max_model_bytes=16)
    assert "grew while it was read" in str(error)


def test_path_traversal_is_a_config_error(root: Path) -> None:
    save(root, linear_model(), rel="../x.onnx")  # exists, just outside the root
    error = load_error(root, ConfigError, path="../x.onnx")
    assert f"{CONFIG_PATH}.path" in str(error)


def test_symlink_out_of_the_root_is_a_config_error(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere" / "model.onnx"
    outside.parent.mkdir()
    outside.write_bytes(linear_model().SerializeToString())
    os.symlink(outside, root / "iris/artifacts/model.onnx")
    load_error(root, ConfigError)


def test_external_data_inside_the_folder_loads(root: Path) -> None:
    save(root, external_data_model("weights.bin"))
    (root / "iris/artifacts/weights.bin").write_bytes(W.tobytes())
    model = load(root)
    x = np.ones((2, 4), dtype=np.float32)
    np.testing.assert_allclose(asyncio.run(model.predict({"X": x}))["Y"], x @ W, rtol=1e-6)


@pytest.mark.parametrize("with_onnx_check", [True, False], ids=["onnx-check", "ort-only"])
@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_external_data_outside_the_folder_is_refused(
    root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    kind: str,
    with_onnx_check: bool,
) -> None:
    secret = root / "iris" / "secret.bin"  # inside the model root, outside the model's folder
    secret.write_bytes(W.tobytes())
    location = {"dotdot": "../secret.bin", "absolute": str(secret), "symlink": "link.bin"}[kind]
    if kind == "symlink":
        os.symlink(secret, root / "iris/artifacts/link.bin")
    save(root, external_data_model(location))
    if not with_onnx_check:
        monkeypatch.setattr(external_data, "_onnx", lambda: None)
        probe = make(root)
        try:
            asyncio.run(probe.start())
        except ModelLoadError:
            pass
        else:  # pragma: no cover - depends on the installed onnxruntime
            pytest.skip("this onnxruntime does not validate external data locations itself")
    with caplog.at_level(logging.INFO, logger="infercore.onnx"):
        error = load_error(root, ModelLoadError)
    assert CONFIG_PATH in str(error)
    assert_no_paths(str(error), root)
    if with_onnx_check:
        assert "outside the model file's folder" in str(error)
    for record in caplog.records:
        assert_no_paths(record.getMessage(), root)


def test_external_data_check_reports_whether_it_ran(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    artifact = save(root, linear_model())
    assert external_data.check_external_data(artifact, config_path=CONFIG_PATH) is True
    monkeypatch.setattr(external_data, "_onnx", lambda: None)
    assert external_data.check_external_data(artifact, config_path=CONFIG_PATH) is False


# -- external data: read once, pinned ---------------------------------------------------------


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_external(root: Path, weights: bytes = W.tobytes()) -> tuple[str, str]:
    """The external-data linear model with ``weights`` in ``weights.bin``; both digests."""
    artifact = save(root, external_data_model("weights.bin"))
    data = root / "iris/artifacts/weights.bin"
    data.write_bytes(weights)
    return sha256_of(artifact), sha256_of(data)


def before_session(monkeypatch: pytest.MonkeyPatch, action: Any = None) -> list[Any]:
    """Run ``action`` just before ONNX Runtime creates a session (after every check); the
    sessions asked for are listed in the returned list."""
    sessions: list[Any] = []
    real = onnxruntime.InferenceSession

    def spy(*args: Any, **kwargs: Any) -> Any:
        sessions.append(args)
        if action is not None:
            action()
        return real(*args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", spy)
    return sessions


def assert_predicts_with(model: OnnxModel, weights: npt.NDArray[np.float32]) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_allclose(asyncio.run(model.predict({"X": x}))["Y"], x @ weights, rtol=1e-6)


@pytest.mark.parametrize("swap", ["rewritten", "removed"])
@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "unpinned"])
def test_external_data_swapped_after_its_checks_is_not_what_loads(
    root: Path, monkeypatch: pytest.MonkeyPatch, swap: str, pinned: bool
) -> None:
    """The external data is read once, checked and handed to ONNX Runtime from memory: the
    file rewritten (other weights) or removed on disk right before the session is created
    changes nothing, because ONNX Runtime never opens it."""
    model_sha, data_sha = save_external(root)
    data = root / "iris/artifacts/weights.bin"

    def then_swap() -> None:
        if swap == "rewritten":
            data.write_bytes((W * 100).tobytes())
        else:
            data.unlink()

    sessions = before_session(monkeypatch, then_swap)
    pins = {"sha256": model_sha, "external_data_sha256": {"weights.bin": data_sha}}
    model = load(root, **(pins if pinned else {}))
    assert len(sessions) == 1
    assert_predicts_with(model, W)


@pytest.mark.parametrize("key", ["weights.bin", "./weights.bin"])
def test_pinned_external_data_that_matches_loads(root: Path, key: str) -> None:
    model_sha, data_sha = save_external(root)
    model = load(root, sha256=model_sha, external_data_sha256={key: data_sha.upper()})
    assert_predicts_with(model, W)


def test_external_data_digest_mismatch_loads_nothing(
    root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Other weights than those pinned: the load fails naming the file (relative, as pinned),
    before ONNX Runtime sees a byte, so a reload leaves the serving version in place."""
    model_sha, data_sha = save_external(root)
    (root / "iris/artifacts/weights.bin").write_bytes((W * 100).tobytes())  # swapped since
    sessions = before_session(monkeypatch)
    with caplog.at_level(logging.INFO, logger="infercore.onnx"):
        error = load_error(
            root,
            ModelLoadError,
            sha256=model_sha,
            external_data_sha256={"weights.bin": data_sha},
        )
    message = str(error)
    assert message.startswith(
        f"{CONFIG_PATH}.external_data_sha256['weights.bin']: sha256 mismatch (expected "
        f"{data_sha[:12]}…"
    )
    assert_no_paths(message, root)
    for record in caplog.records:
        assert_no_paths(record.getMessage(), root)
    assert sessions == []


@pytest.mark.parametrize("pins", ["model-sha256", "another-file"])
def test_pinned_model_with_unpinned_external_data_is_refused(
    root: Path, monkeypatch: pytest.MonkeyPatch, pins: str
) -> None:
    """A pin on the .onnx alone would let its weights be swapped unnoticed: refused, naming
    the file to pin; so is a pin list that misses a file (a typo in a name, say)."""
    model_sha, data_sha = save_external(root)
    options: dict[str, Any] = (
        {"sha256": model_sha}
        if pins == "model-sha256"
        else {"external_data_sha256": {"weigths.bin": data_sha}}
    )
    sessions = before_session(monkeypatch)
    error = load_error(root, ModelLoadError, **options)
    assert f"{CONFIG_PATH}.external_data_sha256: external data file 'weights.bin' is not " in (
        str(error)
    )
    assert "sha256sum" in str(error)
    assert sessions == []


def test_unpinned_model_loads_unpinned_external_data(root: Path) -> None:
    """Nothing pinned: external data loads unchecked, as the .onnx does (and from memory)."""
    save_external(root)
    assert_predicts_with(load(root), W)


def test_only_the_bytes_its_tensors_use_are_kept(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A data file far larger than its tensors is not held in memory whole; a pinned one is
    still hashed whole (as sha256sum pins it)."""
    model_sha, data_sha = save_external(root, W.tobytes() + b"\0" * (4 << 20))
    kept: list[dict[str, int]] = []
    real = external_data.read_external_files

    def spy(*args: Any, **kwargs: Any) -> dict[str, bytearray]:
        found = real(*args, **kwargs)
        kept.append({name: len(data) for name, data in found.items()})
        return found

    monkeypatch.setattr(onnx_model_module, "read_external_files", spy)
    model = load(root, sha256=model_sha, external_data_sha256={"weights.bin": data_sha})
    assert kept == [{"weights.bin": W.nbytes}]
    assert_predicts_with(model, W)


def test_external_data_shorter_than_its_tensors_is_a_load_error(root: Path) -> None:
    save_external(root, W.tobytes()[:20])
    error = load_error(root, ModelLoadError)
    assert "'weights.bin' is shorter than the model's tensors in it" in str(error)


def test_one_file_named_two_ways_is_read_once(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two tensors in one file, one located as ``w.bin``, the other as ``./w.bin`` (ONNX
    Runtime refuses the same file handed twice under those names)."""
    second = W * 10
    save(root, two_external_tensors_model("w.bin", "./w.bin"))
    (root / "iris/artifacts/w.bin").write_bytes(W.tobytes() + second.tobytes())
    reads: list[list[str]] = []
    real = external_data.read_external_files

    def spy(model_file: Path, files: list[external_data.ExternalFile], *a: Any, **k: Any) -> Any:
        reads.append([f.name for f in files])
        return real(model_file, files, *a, **k)

    monkeypatch.setattr(onnx_model_module, "read_external_files", spy)
    assert_predicts_with(load(root), W + second)
    assert reads == [["w.bin"]]


def test_external_data_through_a_symlink_inside_the_folder_loads(root: Path) -> None:
    save(root, external_data_model("link.bin"))
    (root / "iris/artifacts/weights.bin").write_bytes(W.tobytes())
    os.symlink("weights.bin", root / "iris/artifacts/link.bin")
    assert_predicts_with(load(root), W)


def test_external_data_turned_into_a_symlink_after_its_check_is_refused(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The location was checked with the file in place; a symlink out of the folder planted
    between that check and the read is not followed."""
    save_external(root)
    outside = tmp_path / "outside.bin"
    outside.write_bytes((W * 100).tobytes())
    data = root / "iris/artifacts/weights.bin"
    real = external_data.external_files

    def then_plant(*args: Any, **kwargs: Any) -> list[external_data.ExternalFile] | None:
        found = real(*args, **kwargs)
        data.unlink()
        os.symlink(outside, data)
        return found

    monkeypatch.setattr(onnx_model_module, "external_files", then_plant)
    error = load_error(root, ModelLoadError)
    assert "external data file 'weights.bin' cannot be opened" in str(error)
    assert_no_paths(str(error), root)


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_external_data_that_is_not_a_regular_file_is_refused(root: Path, kind: str) -> None:
    save(root, external_data_model("weights.bin"))
    target = root / "iris/artifacts/weights.bin"
    if kind == "fifo":
        os.mkfifo(target)  # opening it to read would wait for a writer
    else:
        target.mkdir()
    error = load_error(root, ModelLoadError)
    assert "external data file 'weights.bin' is not a regular file" in str(error)


def test_without_onnx_a_pinned_model_with_external_data_is_refused(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the onnx package the references cannot be read, so a pinned model's external
    data cannot be pinned: the model is loaded from its checked bytes where ONNX Runtime finds
    no data file, not even in the working directory (where it looks for a model from bytes)."""
    model_sha, _ = save_external(root)
    monkeypatch.setattr(external_data, "_onnx", lambda: None)
    monkeypatch.chdir(root / "iris/artifacts")
    for level in ("disable", "all"):
        error = load_error(root, ModelLoadError, sha256=model_sha, graph_optimization_level=level)
        assert "needs the onnx package" in str(error)
        assert_no_paths(str(error), root)


def test_without_onnx_external_data_pins_cannot_be_checked(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, data_sha = save_external(root)
    monkeypatch.setattr(external_data, "_onnx", lambda: None)
    error = load_error(root, ModelLoadError, external_data_sha256={"weights.bin": data_sha})
    assert f"{CONFIG_PATH}.external_data_sha256: checking external data needs the onnx" in (
        str(error)
    )


def test_without_onnx_a_pinned_model_loads_the_bytes_it_checked(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    artifact = save(root, linear_model())
    monkeypatch.setattr(external_data, "_onnx", lambda: None)
    before_session(monkeypatch, lambda: artifact.write_bytes(int64_model().SerializeToString()))
    model = load(root, sha256=sha256_of(artifact))
    assert model.inputs == [TensorSpec("X", "FP32", (-1, 4))]  # the linear model, not int64


def test_without_onnx_an_unpinned_model_with_external_data_loads_from_its_path(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_external(root)
    monkeypatch.setattr(external_data, "_onnx", lambda: None)
    assert_predicts_with(load(root), W)


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "unpinned"])
def test_onnxruntime_without_in_memory_external_data(
    root: Path, monkeypatch: pytest.MonkeyPatch, pinned: bool
) -> None:
    """An onnxruntime that cannot take external data from memory: a pinned model is refused
    (its pinned data would be read again by path), an unpinned one loads from its path."""
    model_sha, data_sha = save_external(root)
    monkeypatch.delattr(
        onnxruntime.SessionOptions, "add_external_initializers_from_files_in_memory"
    )
    if pinned:
        error = load_error(
            root, ModelLoadError, sha256=model_sha, external_data_sha256={"weights.bin": data_sha}
        )
        assert "cannot take external data from memory" in str(error)
        assert f"onnxruntime {onnxruntime.__version__} cannot" in str(error)
        assert "upgrade to onnxruntime 1.24 or newer" in str(error)
    else:
        assert_predicts_with(load(root), W)


# -- devices --------------------------------------------------------------------------------


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime build has CUDA")
def test_device_cuda_without_cuda_is_a_load_error(root: Path) -> None:
    save(root, linear_model())
    error = load_error(root, ModelLoadError, device="cuda")
    assert f"{CONFIG_PATH}.device" in str(error)
    assert "gpu" in str(error)


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime build has CUDA")
def test_device_auto_falls_back_to_cpu_with_a_log_line(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save(root, linear_model())
    with caplog.at_level(logging.INFO, logger="infercore.onnx"):
        model = load(root, device="auto")
    assert model.providers == ["CPUExecutionProvider"]
    fallback = [r for r in caplog.records if "device=auto" in r.getMessage()]
    assert len(fallback) == 1
    assert fallback[0].levelno == logging.INFO
    assert "CPU" in fallback[0].getMessage()


def test_device_cpu_logs_no_fallback(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    save(root, linear_model())
    with caplog.at_level(logging.INFO, logger="infercore.onnx"):
        load(root, device="cpu")
    assert not [r for r in caplog.records if "device=auto" in r.getMessage()]


# -- I/O binding ------------------------------------------------------------------------------


def test_io_binding_on_cpu_changes_nothing(
    root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    save(root, linear_model())
    x = np.random.default_rng(3).normal(size=(6, 4)).astype(np.float32)
    plain = asyncio.run(load(root).predict({"X": x}))

    def no_binding(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("io_binding() used without the CUDA execution provider")

    monkeypatch.setattr(onnxruntime.InferenceSession, "io_binding", no_binding)
    with caplog.at_level(logging.INFO, logger="infercore.onnx"):
        model = load(root, io_binding=True, device="cpu")
    assert model._bind_on_cuda is False
    bound = asyncio.run(model.predict({"X": x}))
    np.testing.assert_array_equal(bound["Y"], plain["Y"])
    notes = [r.getMessage() for r in caplog.records if "io_binding" in r.getMessage()]
    assert notes == [f"{CONFIG_PATH}: io_binding: the session has no CUDA execution provider; "
                     "running without it"]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu with a CUDA device")
def test_io_binding_on_cuda_matches_the_plain_run(root: Path) -> None:
    save(root, linear_model())
    x = np.random.default_rng(4).normal(size=(64, 4)).astype(np.float32)
    model = load(root, io_binding=True, device="cuda")
    assert model._bind_on_cuda is True
    out = asyncio.run(model.predict({"X": x}))
    np.testing.assert_allclose(out["Y"], x @ W + B, rtol=1e-4, atol=1e-5)
