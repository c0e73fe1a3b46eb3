"""``stop_now()`` of the built-in batchers: a forced shutdown runs nothing more through the model.

A second stop signal must not drain the queue through the model (``stop()`` does, for the
graceful stop): every queued request and every request whose model call is running is answered
503 ``shutting_down`` at once, the running calls are cancelled, and ``stop()`` then returns
without another model call.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from infercore.builtins.adaptive import AdaptiveBatcher
from infercore.builtins.batchers import DynamicBatcher, NoBatcher
from infercore.components import Batcher, ComponentContext, Tensors
from infercore.errors import ShuttingDown
from infercore.testing import FakeModel

MODEL_CTX = ComponentContext("models.m.versions.1.loader", Path("."), model_name="m", version="1")
BATCH_CTX = ComponentContext("models.m.versions.1.batching", Path("."), model_name="m", version="1")


class StuckModel(FakeModel):
    """Every call waits for ``gate``; counts the calls that began and those cancelled."""

    def __init__(self, config: Any, context: Any) -> None:
        super().__init__(config, context)
        self.gate = asyncio.Event()
        self.entered = 0
        self.cancelled = 0

    async def predict(self, inputs: Tensors) -> Tensors:
        self.entered += 1
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return await super().predict(inputs)


def one_row(i: int) -> Tensors:
    return {"x": np.full((1, 4), float(i), np.float32)}


async def make(kind: str, model: FakeModel, **options: Any) -> Batcher:
    kinds: dict[str, Any] = {
        "none": NoBatcher,
        "dynamic": DynamicBatcher,
        "adaptive": AdaptiveBatcher,
    }
    cls = kinds[kind]
    batcher: Batcher = cls(cls.Config(queue_timeout_ms=60_000, **options), BATCH_CTX, model)
    await batcher.start()
    return batcher


CASES = [
    ("none", {"max_concurrency": 1}),
    ("none", {"max_concurrency": 2}),
    ("dynamic", {"max_batch_size": 1}),  # the collector runs the batch itself
    ("dynamic", {"max_batch_size": 2, "max_concurrent_batches": 2}),  # batches in tasks
    ("adaptive", {"max_batch_size": 1}),
]


@pytest.mark.parametrize(("kind", "options"), CASES, ids=[f"{k}-{o}" for k, o in CASES])
def test_stop_now_answers_queued_and_running_requests_and_runs_nothing_more(
    kind: str, options: dict[str, Any]
) -> None:
    async def scenario() -> None:
        model = StuckModel(FakeModel.Config(features=4), MODEL_CTX)
        await model.start()
        batcher = await make(kind, model, **options)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        callers = [
            asyncio.create_task(batcher.submit(one_row(i), deadline=deadline)) for i in range(8)
        ]
        async with asyncio.timeout(10):
            while model.entered == 0 or batcher.queue_depth == 0:
                await asyncio.sleep(0.001)
        running = model.entered
        assert 1 <= running < 8

        cut = batcher.stop_now()  # type: ignore[attr-defined]

        assert cut == 8  # every caller: the queued ones and those of the running calls
        # Answered at once (the loop's next turns), without the model being let go.
        async with asyncio.timeout(1):
            results = await asyncio.gather(*callers, return_exceptions=True)
        assert all(isinstance(r, ShuttingDown) for r in results), results
        assert all(r.status_code == 503 for r in results)  # type: ignore[union-attr]
        async with asyncio.timeout(2):
            await batcher.stop()  # nothing left to drain
        model.gate.set()
        await asyncio.sleep(0.05)
        assert model.entered == running  # no queued request ran
        assert model.cancelled == running  # the running calls were cancelled
        assert batcher.queue_depth == 0
        with pytest.raises(ShuttingDown):
            await batcher.submit(one_row(99), deadline=deadline)

    asyncio.run(scenario())


@pytest.mark.parametrize("kind", ["none", "dynamic"])
def test_stop_now_on_an_idle_batcher_cuts_nothing_short(kind: str) -> None:
    async def scenario() -> None:
        model = StuckModel(FakeModel.Config(features=4), MODEL_CTX)
        model.gate.set()
        await model.start()
        batcher = await make(kind, model)
        deadline = asyncio.get_running_loop().time() + 60
        out = await batcher.submit(one_row(1), deadline=deadline)
        assert out["y"].tolist() == [4.0]
        assert batcher.stop_now() == 0  # type: ignore[attr-defined]
        async with asyncio.timeout(2):
            await batcher.stop()

    asyncio.run(scenario())


def test_a_graceful_stop_still_drains_the_queue_through_the_model() -> None:
    """The contrast: ``stop()`` alone runs what was queued (each still runs or times out)."""

    async def scenario() -> None:
        model = StuckModel(FakeModel.Config(features=4), MODEL_CTX)
        await model.start()
        batcher = await make("none", model, max_concurrency=1)
        deadline = asyncio.get_running_loop().time() + 60
        callers = [
            asyncio.create_task(batcher.submit(one_row(i), deadline=deadline)) for i in range(3)
        ]
        async with asyncio.timeout(10):
            while model.entered == 0:
                await asyncio.sleep(0.001)
        stopping = asyncio.create_task(batcher.stop())
        model.gate.set()
        async with asyncio.timeout(5):
            await stopping
            results = await asyncio.gather(*callers)
        assert len(results) == 3 and model.entered == 3

    asyncio.run(scenario())
