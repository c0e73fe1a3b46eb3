"""The ``torch-gpu`` batcher and its staging pipeline, on the CPU (and on CUDA when present)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from torch_test_support import CONFIG_PATH, Artifacts, scripted  # noqa: E402

from infercore.components import ComponentContext  # noqa: E402
from infercore.errors import BackendError, ConfigError, InvalidInput  # noqa: E402
from infercore.testing import FakeModel  # noqa: E402
from infercore_torch import TorchGpuBatcher, TorchModel  # noqa: E402
from infercore_torch.pipeline import StagingPipeline, padded_size  # noqa: E402

HAS_CUDA = bool(torch.cuda.is_available())
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def started_model(artifacts: Artifacts, device: str = "cpu") -> TorchModel:
    config = TorchModel.Config(
        path="mlp.pt2", trusted=True, sha256=artifacts.digest("mlp.pt2"), device=device
    )
    model = TorchModel(config, ComponentContext(path=CONFIG_PATH, model_root=artifacts.root))
    asyncio.run(model.start())
    return model


def batcher(model: Any, root: Path, **options: Any) -> TorchGpuBatcher:
    config = msgspec.convert(options, TorchGpuBatcher.Config)
    return TorchGpuBatcher(config, ComponentContext(path="batching", model_root=root), model)


def rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)


def alone(model: TorchModel, x: np.ndarray) -> np.ndarray:
    return asyncio.run(model.predict({"input": x}))["output"]


@pytest.fixture(scope="module")
def cpu_model(artifacts: Artifacts) -> TorchModel:
    return started_model(artifacts)


# -- padding -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows_", "pad", "want"),
    [(3, False, 3), (1, True, 2), (2, True, 2), (3, True, 4), (5, True, 8), (8, True, 8)],
)
def test_padded_size(rows_: int, pad: bool, want: int) -> None:
    assert padded_size(rows_, (2, 4, 8), pad) == want


def test_padding_beyond_the_largest_preferred_size_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="at most 8 rows per call"):
        padded_size(9, (2, 4, 8), True)


class Recording:
    """Wraps forward_tensors to record the shapes and storage of what the model saw."""

    def __init__(self, model: TorchModel, delay: float = 0.0) -> None:
        self.model, self.delay = model, delay
        self.shapes: list[tuple[int, ...]] = []
        self.pointers: list[int] = []
        self.real = model.forward_tensors
        self.running = 0
        self.max_running = 0
        self.lock = threading.Lock()

    def __call__(self, tensors: Sequence[Any]) -> list[Any]:
        with self.lock:
            self.shapes.append(tuple(tensors[0].shape))
            self.pointers.append(int(tensors[0].data_ptr()))
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            if self.delay:
                time.sleep(self.delay)
            return self.real(tensors)
        finally:
            with self.lock:
                self.running -= 1


def test_batches_are_padded_to_preferred_sizes_and_the_padding_is_dropped(
    cpu_model: TorchModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    recording = Recording(cpu_model)
    monkeypatch.setattr(cpu_model, "forward_tensors", recording)
    pipeline = StagingPipeline(
        torch, cpu_model, slots=1, buffer_rows=8, preferred=(2, 4, 8), pad=True
    )
    parts = [{"input": rows(1, 1)}, {"input": rows(2, 2)}]
    out = pipeline.run(parts)["output"]
    assert recording.shapes == [(4, 4)]
    assert out.shape == (3, 3)
    np.testing.assert_allclose(out[:1], alone(cpu_model, parts[0]["input"]), rtol=1e-6)
    np.testing.assert_allclose(out[1:], alone(cpu_model, parts[1]["input"]), rtol=1e-6)
    assert pipeline.stats.padded_rows == 1
    # The padding rows were zeros, not stale rows of an earlier batch.
    pipeline.run([{"input": rows(8, 3)}])
    pipeline.run([{"input": rows(1, 4)}])
    (slot,) = pipeline._slots
    assert recording.shapes[-1] == (2, 4)
    np.testing.assert_array_equal(slot.host_in["input"].numpy()[1:2], np.zeros((1, 4)))


def test_rows_go_into_the_preallocated_buffer_and_results_do_not_alias_it(
    cpu_model: TorchModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    recording = Recording(cpu_model)
    monkeypatch.setattr(cpu_model, "forward_tensors", recording)
    pipeline = StagingPipeline(torch, cpu_model, slots=1, buffer_rows=16)
    (slot,) = pipeline._slots
    buffer = slot.host_in["input"]
    assert tuple(buffer.shape) == (16, 4) and buffer.dtype == torch.float32
    first = pipeline.run([{"input": rows(3, 5)}, {"input": rows(4, 6)}])["output"]
    kept = first.copy()
    pipeline.run([{"input": rows(7, 7)}])
    assert recording.pointers == [buffer.data_ptr(), buffer.data_ptr()]  # no per-batch alloc
    np.testing.assert_array_equal(first, kept)  # the next batch did not overwrite it
    assert not np.shares_memory(first, buffer.numpy())


def test_an_oversize_batch_uses_a_temporary_buffer(cpu_model: TorchModel) -> None:
    pipeline = StagingPipeline(torch, cpu_model, slots=1, buffer_rows=4)
    x = rows(9, 8)
    np.testing.assert_allclose(
        pipeline.run([{"input": x}])["output"], alone(cpu_model, x), rtol=1e-6
    )
    assert pipeline.stats.oversize_buffers == 1
    assert tuple(pipeline._slots[0].host_in["input"].shape) == (4, 4)  # cache unchanged


def test_a_request_of_the_wrong_kind_is_invalid_input(cpu_model: TorchModel) -> None:
    pipeline = StagingPipeline(torch, cpu_model, slots=1, buffer_rows=4)
    with pytest.raises(InvalidInput, match="expected FP32 rows"):
        pipeline.run([{"input": np.ones((1, 4), dtype=np.complex64)}])
    with pytest.raises(InvalidInput, match="missing input 'input'"):
        pipeline.run([{"x": rows(1, 0)}])
    # A bad request behind good ones in one batch: named the same (it is not checked as the
    # first one's shape, nor written with the others in one copy).
    good = {"input": rows(1, 0)}
    with pytest.raises(InvalidInput, match=r"got complex64 \[1, 4\]"):
        pipeline.run([good, good, {"input": np.ones((1, 4), dtype=np.complex64)}])
    with pytest.raises(InvalidInput, match=r"shape \[1, 5\] does not match the model's \[-1, 4\]"):
        pipeline.run([good, {"input": np.ones((1, 5), dtype=np.float32)}])
    with pytest.raises(InvalidInput, match=r"shape \[1\] does not match"):
        pipeline.run([good, {"input": np.ones((1,), dtype=np.float32)}])
    assert pipeline.stats.in_flight == 0 and len(pipeline._free) == 1  # the slot came back


# -- overlap bookkeeping -------------------------------------------------------------------------


def test_batches_in_flight_each_hold_their_own_slot(
    cpu_model: TorchModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    recording = Recording(cpu_model, delay=0.2)
    monkeypatch.setattr(cpu_model, "forward_tensors", recording)
    pipeline = StagingPipeline(torch, cpu_model, slots=2, buffer_rows=8)
    xs = [rows(3, i) for i in range(4)]
    with ThreadPoolExecutor(2) as pool:  # as the batcher: at most `slots` batches at once
        outs = list(pool.map(lambda x: pipeline.run([{"input": x}])["output"], xs))
    for x, out in zip(xs, outs, strict=True):
        np.testing.assert_allclose(out, alone(cpu_model, x), rtol=1e-6)
    stats = pipeline.stats
    assert stats.max_in_flight == 2 and recording.max_running == 2
    assert stats.slots_used == {0, 1}
    assert stats.extra_slots == 0
    assert stats.in_flight == 0 and len(pipeline._free) == 2


def test_a_batch_beyond_the_slots_gets_a_temporary_one(cpu_model: TorchModel) -> None:
    pipeline = StagingPipeline(torch, cpu_model, slots=1, buffer_rows=8)
    held = pipeline._acquire()
    x = rows(2, 9)
    np.testing.assert_allclose(
        pipeline.run([{"input": x}])["output"], alone(cpu_model, x), rtol=1e-6
    )
    assert pipeline.stats.extra_slots == 1 and pipeline._free == []
    pipeline._release(held)
    assert pipeline._free == [held] and pipeline.stats.in_flight == 0


def test_the_batcher_keeps_its_batches_in_flight_within_the_slots(
    artifacts: Artifacts, cpu_model: TorchModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    recording = Recording(cpu_model, delay=0.05)
    monkeypatch.setattr(cpu_model, "forward_tensors", recording)
    b = batcher(cpu_model, artifacts.root, max_batch_size=4, max_concurrent_batches=2)

    async def scenario() -> list[np.ndarray]:
        await b.start()
        loop = asyncio.get_running_loop()
        try:
            results = await asyncio.gather(
                *(b.submit({"input": rows(2, i)}, deadline=loop.time() + 10) for i in range(12))
            )
        finally:
            await b.stop()
        return [r["output"] for r in results]

    outs = asyncio.run(scenario())
    for i, out in enumerate(outs):
        np.testing.assert_allclose(out, alone(cpu_model, rows(2, i)), rtol=1e-6)
    assert b.pipeline is None  # stopped
    assert recording.max_running == 2  # overlapped, and never more than the slots
    assert max(shape[0] for shape in recording.shapes) == 4  # batches were formed


# -- the batcher ----------------------------------------------------------------------------------


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=12),
    preferred=st.sampled_from([[], [1, 4, 16], [16]]),
)
def test_batched_results_equal_per_request_results(
    artifacts: Artifacts, cpu_model: TorchModel, sizes: list[int], preferred: list[int]
) -> None:
    b = batcher(
        cpu_model, artifacts.root, max_batch_size=16, max_queue_delay_ms=2,
        preferred_batch_sizes=preferred, pad_to_preferred=bool(preferred),
    )  # fmt: skip
    inputs = [rows(n, 100 + i) for i, n in enumerate(sizes)]

    async def scenario() -> list[np.ndarray]:
        await b.start()
        loop = asyncio.get_running_loop()
        try:
            got = await asyncio.gather(
                *(b.submit({"input": x}, deadline=loop.time() + 10) for x in inputs)
            )
        finally:
            await b.stop()
        return [g["output"] for g in got]

    for x, out in zip(inputs, asyncio.run(scenario()), strict=True):
        assert out.shape == (x.shape[0], 3)
        np.testing.assert_allclose(out, alone(cpu_model, x), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-CUDA fallback")
def test_without_cuda_it_batches_on_the_cpu_and_says_so_once(
    artifacts: Artifacts, caplog: pytest.LogCaptureFixture
) -> None:
    model = started_model(artifacts, device="auto")
    b = batcher(model, artifacts.root)

    async def scenario() -> None:
        await b.start()
        await b.stop()

    with caplog.at_level(logging.INFO, logger="infercore.torch"):
        asyncio.run(scenario())
    lines = [r.getMessage() for r in caplog.records if "torch-gpu" in r.getMessage()]
    assert lines == ["batching: no CUDA device; torch-gpu batches on the CPU"]


def test_preferred_size_above_max_fails_in_the_config() -> None:
    # The dynamic batcher's own rule, inherited: the config error names the option.
    with pytest.raises(msgspec.ValidationError, match="16 is above max_batch_size"):
        msgspec.convert(
            {"max_batch_size": 8, "preferred_batch_sizes": [4, 16]}, TorchGpuBatcher.Config
        )


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"preferred_batch_sizes": [8, 4]}, "ascending without repeats"),
        ({"preferred_batch_sizes": [4, 4]}, "ascending without repeats"),
        ({"pad_to_preferred": True}, "pad_to_preferred: needs preferred_batch_sizes"),
        (
            {"max_batch_size": 32, "preferred_batch_sizes": [8, 16], "pad_to_preferred": True},
            "ending at max_batch_size",
        ),
    ],
)
def test_bad_config_fails_in_init(
    artifacts: Artifacts, cpu_model: TorchModel, options: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        batcher(cpu_model, artifacts.root, **options)


@pytest.mark.parametrize(
    ("options", "match"),
    [({"max_concurrent_batches": 9}, "<= 8"), ({"preferred_batch_sizes": [0]}, ">= 1")],
)
def test_out_of_range_options_do_not_validate(options: dict[str, Any], match: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=match):
        msgspec.convert(options, TorchGpuBatcher.Config)


def test_only_torch_models_are_batched(tmp_path: Path) -> None:
    fake = FakeModel(FakeModel.Config(), ComponentContext(path="models.m.versions.1.loader",
                                                          model_root=tmp_path))  # fmt: skip
    with pytest.raises(ConfigError, match="'torch-gpu' batches torch models only"):
        batcher(fake, tmp_path)


def test_a_model_without_a_batch_dimension_is_refused(artifacts: Artifacts) -> None:
    options = {
        "path": "mlp.pt2", "trusted": True, "sha256": artifacts.digest("mlp.pt2"),
        "device": "cpu", "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4]}],
    }  # fmt: skip
    config = msgspec.convert(options, TorchModel.Config)
    model = TorchModel(config, ComponentContext(path=CONFIG_PATH, model_root=artifacts.root))
    asyncio.run(model.start())
    b = batcher(model, artifacts.root)
    with pytest.raises(ConfigError, match="needs a model whose every input"):
        asyncio.run(b.start())


class FirstRowOnly(torch.nn.Module):
    """Returns one row whatever it is given: not the row-wise model torch-gpu needs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:1]


def test_a_wrong_row_count_names_the_model_and_the_fix(tmp_path: Path) -> None:
    model = scripted(tmp_path, FirstRowOnly(), "first.ts")
    # Padded to 2 rows, the warm-up's single row meets the fault at start-up (QA D4).
    pipeline = StagingPipeline(torch, model, slots=1, buffer_rows=8, preferred=(2, 4, 8), pad=True)
    with pytest.raises(BackendError) as info:
        pipeline.warm()
    assert info.value.message == (
        f"{CONFIG_PATH}.outputs: output 'y' has 1 rows for a batch of 2 rows; torch-gpu needs "
        "one output row per input row"
    )
    assert "batching: {kind: none}" in (info.value.hint or "")


# -- CUDA (skipped without a device; run by benchmarks/gpu/run_gpu_checks.sh) ---------------------


@pytest.mark.gpu
@gpu
def test_cuda_pipeline_uses_pinned_buffers_and_a_stream_per_slot(artifacts: Artifacts) -> None:
    model = started_model(artifacts, device="cuda")
    pipeline = StagingPipeline(torch, model, slots=3, buffer_rows=16, preferred=(8, 16), pad=True)
    assert pipeline.cuda
    streams = {id(slot.stream) for slot in pipeline._slots}
    assert len(streams) == 3
    for slot in pipeline._slots:
        assert slot.host_in["input"].is_pinned()
        assert slot.dev_in["input"].device.type == "cuda"
        assert slot.host_out["output"].is_pinned()
    cpu = started_model(artifacts, device="cpu")
    xs = [rows(n, n) for n in (1, 5, 9, 16)]
    with ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(lambda x: pipeline.run([{"input": x}])["output"], xs))
    for x, out in zip(xs, outs, strict=True):
        np.testing.assert_allclose(out, alone(cpu, x), rtol=1e-4, atol=1e-5)
    assert pipeline.stats.in_flight == 0 and pipeline.stats.extra_slots == 0


@pytest.mark.gpu
@gpu
def test_cuda_batcher_end_to_end(artifacts: Artifacts, caplog: pytest.LogCaptureFixture) -> None:
    model = started_model(artifacts, device="cuda")
    cpu = started_model(artifacts, device="cpu")
    b = batcher(model, artifacts.root, max_batch_size=16, max_concurrent_batches=3)
    inputs = [rows(1 + i % 5, i) for i in range(64)]

    async def scenario() -> list[np.ndarray]:
        await b.start()
        loop = asyncio.get_running_loop()
        try:
            got = await asyncio.gather(
                *(b.submit({"input": x}, deadline=loop.time() + 30) for x in inputs)
            )
        finally:
            await b.stop()
        return [g["output"] for g in got]

    with caplog.at_level(logging.INFO, logger="infercore.torch"):
        outs = asyncio.run(scenario())
    for x, out in zip(inputs, outs, strict=True):
        np.testing.assert_allclose(out, alone(cpu, x), rtol=1e-4, atol=1e-5)
    assert any("batches in flight on cuda" in r.getMessage() for r in caplog.records)
