"""The ``torch-gpu`` batcher checks each batch's outputs with the core's one output check
(``infercore.builtins.batchers.OutputCheck``), as ``none``, ``dynamic`` and ``adaptive`` do:
after the staging pipeline's own conversion (``to_numpy``), whatever reaches a response has
the declared datatype and shape."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch_test_support import CONFIG_PATH, Artifacts  # noqa: E402

from infercore.builtins.batchers import OutputCheck  # noqa: E402
from infercore.components import ComponentContext, Tensors  # noqa: E402
from infercore.errors import BackendError  # noqa: E402
from infercore_torch import TorchGpuBatcher, TorchModel  # noqa: E402


def started_model(artifacts: Artifacts) -> TorchModel:
    config = TorchModel.Config(
        path="mlp.pt2", trusted=True, sha256=artifacts.digest("mlp.pt2"), device="cpu"
    )
    model = TorchModel(config, ComponentContext(path=CONFIG_PATH, model_root=artifacts.root))
    asyncio.run(model.start())
    return model


def submit(batcher: TorchGpuBatcher, n: int, patch: Any = None) -> list[Any]:
    async def scenario() -> list[Any]:
        await batcher.start()
        if patch is not None:
            patch(batcher)
        loop = asyncio.get_running_loop()
        x = np.ones((n, 4), np.float32)
        try:
            return await asyncio.gather(
                *(batcher.submit({"input": x}, deadline=loop.time() + 10) for _ in range(3)),
                return_exceptions=True,
            )
        finally:
            await batcher.stop()

    return asyncio.run(scenario())


def gpu_batcher(model: TorchModel, root: Path) -> TorchGpuBatcher:
    config = msgspec.convert({"max_batch_size": 16}, TorchGpuBatcher.Config)
    return TorchGpuBatcher(config, ComponentContext(path="batching", model_root=root), model)


def test_the_torch_gpu_batcher_binds_the_core_check_at_start(artifacts: Artifacts) -> None:
    model = started_model(artifacts)
    batcher = gpu_batcher(model, artifacts.root)
    results = submit(batcher, 2)
    assert all(isinstance(r, dict) and r["output"].dtype == np.float32 for r in results), results
    bound = batcher._check
    assert bound is not None and isinstance(getattr(bound, "__self__", None), OutputCheck)


@pytest.mark.parametrize(
    ("returned", "tail"),
    [
        (lambda n: np.zeros((n, 3), np.float64), "is FP64 (float64), declared FP32 [-1, 3]"),
        (lambda n: np.zeros((n, 4), np.float32), "has shape [{n}, 4], declared FP32 [-1, 3]"),
        (lambda n: np.zeros((n, 3), object), "is BYTES (object), declared FP32 [-1, 3]"),
    ],
    ids=["float64", "wide", "object"],
)
def test_outputs_the_pipeline_hands_back_unlike_the_declaration_are_backend_errors(
    artifacts: Artifacts, returned: Any, tail: str
) -> None:
    model = started_model(artifacts)
    assert [(s.name, s.datatype, s.shape) for s in model.outputs] == [("output", "FP32", (-1, 3))]
    batcher = gpu_batcher(model, artifacts.root)

    def patch(b: TorchGpuBatcher) -> None:
        pipeline = b.pipeline
        assert pipeline is not None

        def run(parts: list[Tensors]) -> Tensors:
            n = sum(int(p["input"].shape[0]) for p in parts)
            return {"output": returned(n)}

        pipeline.run = run  # type: ignore[method-assign]

    results = submit(batcher, 2, patch)
    assert all(isinstance(r, BackendError) for r in results), results
    messages = {r.message for r in results}
    # Each request failed alone after its batch (2 rows each), or alone from the start.
    assert messages <= {
        f"{CONFIG_PATH}: model output 'output' {tail.format(n=n)}" for n in (2, 4, 6)
    }, messages
