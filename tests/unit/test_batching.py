"""The ``none``, ``dynamic`` and ``adaptive`` batchers: separation, bounds, timeouts,
cancellation, faults, preferred batch sizes."""

from __future__ import annotations

import asyncio
import gc
import math
import time
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infercore.builtins.adaptive import AdaptiveBatcher
from infercore.builtins.batchers import DynamicBatcher, NoBatcher, _Drain
from infercore.components import Batcher, ComponentContext, Tensors, TensorSpec
from infercore.errors import (
    BackendError,
    DeadlineExceeded,
    QueueFull,
    QueueTimeout,
    ShuttingDown,
)
from infercore.testing import FakeModel

FEATURES = 4
POISON = -1.0
MODEL_CTX = ComponentContext("models.m.versions.1.loader", Path("."), model_name="m", version="1")
BATCH_CTX = ComponentContext("models.m.versions.1.batching", Path("."), model_name="m", version="1")


class RecordingModel(FakeModel):
    """A FakeModel that keeps a copy of every batch it is called with, and its concurrency.

    Set ``gate`` to an unset event and calls block on it (a stuck model) until it is set:
    the tests then control exactly what is queued while the model is busy.
    """

    def __init__(self, config: Any, context: Any) -> None:
        super().__init__(config, context)
        self.seen: list[np.ndarray] = []
        self.active = 0
        self.max_active = 0
        self.gate: asyncio.Event | None = None

    async def predict(self, inputs: Tensors) -> Tensors:
        self.seen.append(inputs["x"].copy())
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.gate is not None:
                await self.gate.wait()
            return await super().predict(inputs)
        finally:
            self.active -= 1

    def entered(self, n: int) -> Callable[[], bool]:
        return lambda: len(self.seen) >= n

    def ids_seen(self) -> set[int]:
        return {int(v) for batch in self.seen for v in batch[:, 1]}


class VariableWidthModel(RecordingModel):
    """``x`` is [-1, -1]: requests of different widths have incompatible tensors."""

    async def start(self) -> None:
        await super().start()
        self.inputs = [TensorSpec("x", "FP32", (-1, -1))]
        self.outputs = [TensorSpec("y", "FP32", (-1,)), TensorSpec("echo", "FP32", (-1, -1))]


class ExtraOutputModel(RecordingModel):
    """Returns an undeclared output holding the whole batch."""

    async def predict(self, inputs: Tensors) -> Tensors:
        out = await super().predict(inputs)
        return {**out, "whole_batch": inputs["x"].copy()}


class Observer:
    def __init__(self) -> None:
        self.depths: list[int] = []
        self.batch_rows: list[int] = []

    def observe_batch(self, rows: int, inference_seconds: float) -> None:
        self.batch_rows.append(rows)

    def observe_queue_wait(self, seconds: float) -> None:
        assert seconds >= 0

    def set_queue_depth(self, depth: int) -> None:
        self.depths.append(depth)


async def make_model(
    cls: type[RecordingModel] = RecordingModel, *, gated: bool = False, **config: Any
) -> Any:
    model = cls(FakeModel.Config(features=FEATURES, **config), MODEL_CTX)
    await model.start()
    if gated:
        model.gate = asyncio.Event()
    return model


async def make_dynamic(
    model: FakeModel, observer: Observer | None = None, **config: Any
) -> DynamicBatcher:
    batcher = DynamicBatcher(DynamicBatcher.Config(**config), BATCH_CTX, model, observer)
    await batcher.start()
    return batcher


async def make_adaptive(
    model: FakeModel, observer: Observer | None = None, **config: Any
) -> AdaptiveBatcher:
    batcher = AdaptiveBatcher(AdaptiveBatcher.Config(**config), BATCH_CTX, model, observer)
    await batcher.start()
    return batcher


MakeBatcher = Callable[..., Awaitable[DynamicBatcher]]
#: The guarantees of the dynamic batcher hold for the adaptive one, which subclasses it.
BATCHING = pytest.mark.parametrize(
    "make", [make_dynamic, make_adaptive], ids=["dynamic", "adaptive"]
)


async def make_none(model: FakeModel, observer: Observer | None = None, **config: Any) -> NoBatcher:
    batcher = NoBatcher(NoBatcher.Config(**config), BATCH_CTX, model, observer)
    await batcher.start()
    return batcher


def request(rid: int, n: int = 1, *, poisoned: bool = False, width: int = FEATURES) -> Tensors:
    """Rows that say whose they are: column 1 is the request id, column 2 the row index."""
    x = np.zeros((n, width), np.float32)
    x[:, 0] = POISON if poisoned else 1.0
    if width > 1:
        x[:, 1] = rid
    if width > 2:
        x[:, 2] = np.arange(n)
    if width > 3:
        x[:, 3:] = (np.arange(n * (width - 3)).reshape(n, width - 3) * 7 + rid) % 13
    return {"x": x}


def check_result(inputs: Tensors, outputs: Tensors, offset: float = 0.0) -> None:
    x = inputs["x"]
    assert set(outputs) == {"y", "echo"}
    np.testing.assert_array_equal(outputs["echo"], x)
    np.testing.assert_array_equal(
        outputs["y"], x.sum(axis=1, dtype=np.float32) + np.float32(offset)
    )


def later(seconds: float = 30.0) -> float:
    return asyncio.get_running_loop().time() + seconds


async def until(condition: Callable[[], bool], limit: float = 10.0) -> None:
    """Wait (on the loop) until ``condition()`` holds; fail instead of hanging."""
    async with asyncio.timeout(limit):
        while not condition():
            await asyncio.sleep(0.001)


async def finish(*aws: Awaitable[Any], limit: float = 20.0) -> list[Any]:
    """Gather with exceptions, failing the test instead of hanging."""
    async with asyncio.timeout(limit):
        return await asyncio.gather(*aws, return_exceptions=True)


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- properties


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    arrivals=st.lists(
        st.tuples(st.integers(1, 5), st.sampled_from([0.0, 0.0, 0.0005, 0.002])),
        min_size=1,
        max_size=14,
    ),
    max_batch=st.integers(1, 8),
    delay_ms=st.sampled_from([0.0, 0.5, 3.0]),
    concurrent=st.integers(1, 2),
    latency=st.sampled_from([0.0, 0.002]),
    make=st.sampled_from([make_dynamic, make_adaptive]),
    preferred=st.lists(st.integers(1, 8), max_size=3),
    target_ms=st.sampled_from([1.0, 1000.0]),
)
def test_property_each_request_gets_exactly_its_own_rows(
    arrivals: list[tuple[int, float]],
    max_batch: int,
    delay_ms: float,
    concurrent: int,
    latency: float,
    make: MakeBatcher,
    preferred: list[int],
    target_ms: float,
) -> None:
    extra = {"target_p99_ms": target_ms} if make is make_adaptive else {}

    async def scenario() -> None:
        model = await make_model(offset=0.25, latency_s=latency)
        observer = Observer()
        batcher = await make(
            model,
            observer,
            max_batch_size=max_batch,
            max_queue_delay_ms=delay_ms,
            queue_timeout_ms=30_000,
            max_concurrent_batches=concurrent,
            max_queue_size=64,
            preferred_batch_sizes=[n for n in preferred if n <= max_batch],
            **extra,
        )
        reqs = [request(rid, n) for rid, (n, _) in enumerate(arrivals)]
        tasks = []
        for req, (_, gap) in zip(reqs, arrivals, strict=True):
            tasks.append(asyncio.create_task(batcher.submit(req, deadline=later())))
            await asyncio.sleep(gap)
        results = await finish(*tasks)
        await batcher.stop()
        for req, res in zip(reqs, results, strict=True):
            assert not isinstance(res, BaseException), res
            check_result(req, res, offset=0.25)
        # Every call: whole requests only, at most max_batch rows unless one big request.
        sizes = dict(enumerate(n for n, _ in arrivals))
        ran: list[int] = []
        for batch in model.seen:
            ids = list(dict.fromkeys(int(v) for v in batch[:, 1]))
            assert sum(sizes[i] for i in ids) == len(batch)
            for i in ids:
                rows = batch[batch[:, 1] == i]
                assert rows[:, 2].tolist() == list(range(sizes[i]))  # its rows, in order
            if len(batch) > max_batch:
                assert len(ids) == 1
            ran.extend(ids)
        assert sorted(ran) == list(range(len(arrivals)))  # each request ran exactly once
        assert model.batches == [len(b) for b in model.seen]
        assert sorted(observer.batch_rows) == sorted(model.batches)
        assert max(observer.depths) <= 64

    run(scenario())


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arrivals=st.lists(
        st.tuples(st.integers(1, 4), st.booleans(), st.sampled_from([0.0, 0.001])),
        min_size=1,
        max_size=10,
    ),
    max_batch=st.integers(1, 8),
    make=st.sampled_from([make_dynamic, make_adaptive]),
)
def test_property_invalid_requests_never_fail_their_batch_mates(
    arrivals: list[tuple[int, bool, float]],
    max_batch: int,
    make: MakeBatcher,
) -> None:
    async def scenario() -> None:
        model = await make_model(fail_on_value=POISON, latency_s=0.001)
        batcher = await make(model, max_batch_size=max_batch, queue_timeout_ms=30_000)
        reqs = [request(rid, n, poisoned=bad) for rid, (n, bad, _) in enumerate(arrivals)]
        tasks = []
        for req, (_, _, gap) in zip(reqs, arrivals, strict=True):
            tasks.append(asyncio.create_task(batcher.submit(req, deadline=later())))
            await asyncio.sleep(gap)
        results = await finish(*tasks)
        await batcher.stop()
        for req, (_, bad, _), res in zip(reqs, arrivals, results, strict=True):
            if bad:
                assert isinstance(res, BackendError), res
            else:
                assert not isinstance(res, BaseException), res
                check_result(req, res)
        assert all(len(b) <= max_batch or len({*b[:, 1].tolist()}) == 1 for b in model.seen)

    run(scenario())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    bound=st.integers(1, 5),
    arrivals=st.lists(st.integers(1, 3), min_size=1, max_size=12),
    max_batch=st.integers(1, 4),
    make=st.sampled_from([make_dynamic, make_adaptive]),
)
def test_property_queue_bound_holds_and_rejected_requests_never_run(
    bound: int, arrivals: list[int], max_batch: int, make: MakeBatcher
) -> None:
    async def scenario() -> None:
        model = await make_model(gated=True)
        observer = Observer()
        batcher = await make(
            model, observer, max_batch_size=max_batch, max_queue_size=bound, queue_timeout_ms=30_000
        )
        running = asyncio.create_task(batcher.submit(request(0), deadline=later()))
        await until(model.entered(1))  # the model is stuck: everything else must queue
        reqs = {rid: request(rid, n) for rid, n in enumerate(arrivals, 1)}
        tasks = {}
        rejected = []
        for rid, req in reqs.items():
            task = asyncio.create_task(batcher.submit(req, deadline=later()))
            depth = len(tasks) + 1
            await until(lambda t=task, d=depth: t.done() or batcher.queue_depth == d)
            if task.done():
                assert isinstance(task.exception(), QueueFull)
                rejected.append(rid)
            else:
                tasks[rid] = task
        accepted = sorted(tasks)
        assert accepted == list(range(1, min(bound, len(arrivals)) + 1))
        assert rejected == list(range(bound + 1, len(arrivals) + 1))
        model.gate.set()
        results = await finish(running, *tasks.values())
        for rid, res in zip([0, *accepted], results, strict=True):
            check_result(request(0) if rid == 0 else reqs[rid], res)
        await batcher.stop()
        assert model.ids_seen() == {0, *accepted}  # rejected requests never ran
        assert max(observer.depths) <= bound
        assert all(len(b) <= max_batch or len({*b[:, 1].tolist()}) == 1 for b in model.seen)

    run(scenario())


# ------------------------------------------------------------------------ dynamic batcher


@BATCHING
def test_batches_form_under_concurrency(make: MakeBatcher) -> None:
    async def scenario() -> None:
        model = await make_model(latency_s=0.02)
        batcher = await make(model, max_batch_size=8)
        reqs = [request(i) for i in range(24)]
        results = await finish(*(batcher.submit(r, deadline=later()) for r in reqs))
        await batcher.stop()
        for req, res in zip(reqs, results, strict=True):
            check_result(req, res)
        assert model.calls < len(reqs)
        assert max(model.batches) > 1
        assert max(model.batches) <= 8
        assert sum(model.batches) == len(reqs)

    run(scenario())


def test_lone_request_without_delay_runs() -> None:
    async def scenario() -> None:
        model = await make_model()
        batcher = await make_dynamic(model, max_queue_delay_ms=0)
        req = request(1, 3)
        check_result(req, await batcher.submit(req, deadline=later()))
        assert model.batches == [3]
        await batcher.stop()

    run(scenario())


def test_lone_request_with_a_delay_runs_after_the_delay() -> None:
    async def scenario() -> None:
        model = await make_model()
        batcher = await make_dynamic(model, max_batch_size=8, max_queue_delay_ms=5)
        req = request(1, 2)
        check_result(req, await asyncio.wait_for(batcher.submit(req, deadline=later()), 10))
        assert model.batches == [2]
        await batcher.stop()

    run(scenario())


def test_a_full_batch_is_not_held_for_the_delay() -> None:
    async def scenario() -> None:
        model = await make_model()
        # An hour of delay: finishing at all proves the full batch went at once.
        batcher = await make_dynamic(
            model, max_batch_size=4, max_queue_delay_ms=3_600_000, queue_timeout_ms=3_600_000
        )
        reqs = [request(1, 1), request(2, 3)]
        results = await finish(*(batcher.submit(r, deadline=later(7200)) for r in reqs), limit=15)
        for req, res in zip(reqs, results, strict=True):
            check_result(req, res)
        assert model.batches == [4]
        big = request(3, 4)  # a batch on its own
        check_result(big, await asyncio.wait_for(batcher.submit(big, deadline=later()), 15))
        assert model.batches == [4, 4]
        await batcher.stop()

    run(scenario())


def test_delay_gathers_requests_into_one_batch() -> None:
    async def scenario() -> None:
        model = await make_model()
        batcher = await make_dynamic(
            model, max_batch_size=16, max_queue_delay_ms=3_600_000, queue_timeout_ms=3_600_000
        )
        tasks = [
            asyncio.create_task(batcher.submit(request(i, 2), deadline=later(7200)))
            for i in range(7)
        ]
        await asyncio.sleep(0.02)
        assert model.calls == 0 and not any(t.done() for t in tasks)  # waiting for company
        last = request(7, 2)  # rows 14 -> 16: the batch is full and goes
        results = await finish(*tasks, batcher.submit(last, deadline=later()), limit=15)
        assert model.batches == [16]
        check_result(last, results[-1])
        await batcher.stop()

    run(scenario())


@BATCHING
def test_full_queue_rejects_at_once_without_running_the_model(make: MakeBatcher) -> None:
    async def scenario() -> None:
        model = await make_model(gated=True)
        observer = Observer()
        batcher = await make(
            model, observer, max_batch_size=1, max_queue_size=3, queue_timeout_ms=30_000
        )
        running = asyncio.create_task(batcher.submit(request(0), deadline=later()))
        await until(model.entered(1))
        queued = [
            asyncio.create_task(batcher.submit(request(i), deadline=later())) for i in (1, 2, 3)
        ]
        await until(lambda: batcher.queue_depth == 3)
        coro = batcher.submit(request(9), deadline=later())
        with pytest.raises(QueueFull):
            coro.send(None)  # rejected on the first step: it never waits
        more = await finish(*(batcher.submit(request(10 + i), deadline=later()) for i in range(5)))
        assert all(isinstance(r, QueueFull) for r in more)
        assert len(model.seen) == 1
        model.gate.set()
        results = await finish(running, *queued)
        assert not any(isinstance(r, BaseException) for r in results)
        assert model.calls == 4
        assert 9 not in model.ids_seen() and not model.ids_seen() & set(range(10, 15))
        assert max(observer.depths) == 3
        assert observer.depths[-1] == 0
        await batcher.stop()

    run(scenario())


@BATCHING
def test_queue_timeout_answers_and_never_runs(make: MakeBatcher) -> None:
    async def scenario() -> None:
        model = await make_model(gated=True)
        batcher = await make(model, max_batch_size=1, queue_timeout_ms=40)
        tasks = [
            asyncio.create_task(batcher.submit(request(i), deadline=later())) for i in range(6)
        ]
        waited = await finish(*tasks[1:])
        assert all(isinstance(r, QueueTimeout) for r in waited), waited
        assert batcher.queue_depth == 0
        model.gate.set()
        check_result(request(0), await tasks[0])
        await batcher.stop()  # a wrongly surviving request would run before this returns
        assert model.calls == 1  # = the number of successes (P2)
        assert model.ids_seen() == {0}

    run(scenario())


@BATCHING
def test_deadline_before_queue_timeout_is_deadline_exceeded(make: MakeBatcher) -> None:
    async def scenario() -> None:
        model = await make_model(gated=True)
        batcher = await make(model, max_batch_size=1, queue_timeout_ms=30_000)
        first = asyncio.create_task(batcher.submit(request(0), deadline=later()))
        await until(model.entered(1))
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(request(1), deadline=later(0.03))
        model.gate.set()
        check_result(request(0), await first)
        await batcher.stop()
        assert model.calls == 1 and model.ids_seen() == {0}

    run(scenario())


@BATCHING
def test_a_deadline_already_passed_never_runs(make: MakeBatcher) -> None:
    async def scenario() -> None:
        model = await make_model(gated=True)
        batcher = await make(model, max_batch_size=1)
        first = asyncio.create_task(batcher.submit(request(0), deadline=later()))
        await until(model.entered(1))
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(request(1), deadline=later(-1))
        model.gate.set()
        await first
        await batcher.stop()
        assert model.ids_seen() == {0}

    run(scenario())


@BATCHING
def test_cancelled_while_queued_is_never_run(make: MakeBatcher) -> None:
    async def scenario() -> None:
        model = await make_model(gated=True)
        batcher = await make(model, max_batch_size=4)
        first = asyncio.create_task(batcher.submit(request(0), deadline=later()))
        await until(model.entered(1))
        gone = asyncio.create_task(batcher.submit(request(1), deadline=later()))
        kept = asyncio.create_task(batcher.submit(request(2), deadline=later()))
        await until(lambda: batcher.queue_depth == 2)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert batcher.queue_depth == 1
        model.gate.set()
        results = await finish(first, kept)
        check_result(request(0), results[0])
        check_result(request(2), results[1])
        assert model.ids_seen() == {0, 2}
        assert model.batches == [1, 1]
        await batcher.stop()

    run(scenario())


@BATCHING
def test_poisoned_request_fails_alone(make: MakeBatcher) -> None:
    async def scenario() -> None:
        model = await make_model(gated=True, fail_on_value=POISON)
        batcher = await make(model, max_batch_size=8)
        first = asyncio.create_task(batcher.submit(request(0), deadline=later()))
        await until(model.entered(1))
        mates = [request(1, 2), request(2, 1, poisoned=True), request(3, 3)]
        tasks = [asyncio.create_task(batcher.submit(r, deadline=later())) for r in mates]
        await until(lambda: batcher.queue_depth == 3)
        model.gate.set()
        results = await finish(first, *tasks)
        check_result(request(0), results[0])
        check_result(mates[0], results[1])
        assert isinstance(results[2], BackendError)
        assert "poisoned" not in str(results[2])  # the model's own message is not passed on
        check_result(mates[2], results[3])
        # They were batched together first (P13: the batch failed, each then ran alone).
        assert {1, 2, 3} <= {int(v) for v in model.seen[1][:, 1]}
        await batcher.stop()

    run(scenario())


@BATCHING
def test_malformed_output_is_a_backend_error_and_the_batcher_keeps_serving(
    make: MakeBatcher,
) -> None:
    async def scenario() -> None:
        model = await make_model(malformed=True, latency_s=0.02)
        batcher = await make(model, max_batch_size=8)
        results = await finish(*(batcher.submit(request(i, 2), deadline=later()) for i in range(4)))
        assert all(isinstance(r, BackendError) for r in results), results
        # The server's log line says whose output it was: the model's config path.
        assert all(str(r).startswith(f"{MODEL_CTX.path}: ") for r in results), results
        model.config = FakeModel.Config(features=FEATURES)  # the model recovers
        req = request(9, 2)
        check_result(req, await asyncio.wait_for(batcher.submit(req, deadline=later()), 10))
        await batcher.stop()

    run(scenario())


@BATCHING
def test_undeclared_outputs_never_carry_batch_mates_rows(make: MakeBatcher) -> None:
    async def scenario() -> None:
        model = await make_model(ExtraOutputModel, gated=True)
        batcher = await make(model, max_batch_size=8)
        first = asyncio.create_task(batcher.submit(request(0), deadline=later()))
        await until(model.entered(1))
        reqs = [request(i, 2) for i in (1, 2, 3)]
        tasks = [asyncio.create_task(batcher.submit(r, deadline=later())) for r in reqs]
        await until(lambda: batcher.queue_depth == 3)
        model.gate.set()
        results = await finish(first, *tasks)
        assert model.batches == [1, 6]
        for req, res in zip(reqs, results[1:], strict=True):
            check_result(req, res)  # exactly y and echo: no "whole_batch"
        await batcher.stop()

    run(scenario())


@BATCHING
def test_incompatible_requests_are_not_stacked(make: MakeBatcher) -> None:
    async def scenario() -> None:
        model = await make_model(VariableWidthModel, gated=True)
        batcher = await make(model, max_batch_size=16)
        first = asyncio.create_task(batcher.submit(request(0, width=2), deadline=later()))
        await until(model.entered(1))
        reqs = [
            request(1, width=2),
            request(2, width=2),
            request(3, width=3),
            request(4, width=3),
            request(5, width=2),
        ]
        tasks = []
        for n, r in enumerate(reqs, 1):
            tasks.append(asyncio.create_task(batcher.submit(r, deadline=later())))
            await until(lambda n=n: batcher.queue_depth == n)  # queued in this order
        model.gate.set()
        results = await finish(first, *tasks)
        for req, res in zip([request(0, width=2), *reqs], results, strict=True):
            check_result(req, res)
        # [0] [1 2] [3 4] [5]: FIFO, one width per call, and no failed stacking (no retries).
        assert [b.shape for b in model.seen] == [(1, 2), (2, 2), (2, 3), (1, 2)]
        await batcher.stop()

    run(scenario())


@BATCHING
def test_timed_out_requests_do_not_pile_up_in_memory(make: MakeBatcher) -> None:
    async def scenario() -> None:
        model = await make_model(gated=True)
        batcher = await make(model, max_batch_size=1, max_queue_size=2, queue_timeout_ms=1)
        first = asyncio.create_task(batcher.submit(request(0), deadline=later()))
        await until(model.entered(1))
        refs = []
        for i in range(1, 30):
            req = request(i)
            refs.append(weakref.ref(req["x"]))
            with pytest.raises(QueueTimeout):
                await batcher.submit(req, deadline=later())
            del req
        gc.collect()
        alive = sum(r() is not None for r in refs)
        assert alive <= 2 * 2  # bounded by the queue size, not by the arrivals
        model.gate.set()
        await first
        await batcher.stop()
        assert model.ids_seen() == {0}

    run(scenario())


# ------------------------------------------------------------------ preferred batch sizes


def test_a_preferred_size_goes_at_once() -> None:
    async def scenario() -> None:
        model = await make_model()
        # An hour of delay: finishing at all proves the batch did not wait for company.
        batcher = await make_dynamic(
            model,
            max_batch_size=16,
            max_queue_delay_ms=3_600_000,
            queue_timeout_ms=3_600_000,
            preferred_batch_sizes=[4, 8],
        )
        req = request(1, 4)
        check_result(req, await asyncio.wait_for(batcher.submit(req, deadline=later(7200)), 10))
        assert model.batches == [4]
        await batcher.stop()

    run(scenario())


@BATCHING
def test_the_batch_stops_at_the_largest_preferred_size_the_queue_reaches(
    make: MakeBatcher,
) -> None:
    async def scenario() -> None:
        model = await make_model(gated=True)
        batcher = await make(
            model,
            max_batch_size=16,
            max_queue_delay_ms=3_600_000,
            queue_timeout_ms=3_600_000,
            preferred_batch_sizes=[2, 4],
        )
        first = asyncio.create_task(batcher.submit(request(0, 16), deadline=later(7200)))
        await until(model.entered(1))
        # Queued while the model is busy: 1, 2, 1, 3 rows -> prefix sums 1, 3, 4, 7.
        reqs = [request(1, 1), request(2, 2), request(3, 1), request(4, 3)]
        tasks = []
        for n, r in enumerate(reqs, 1):
            tasks.append(asyncio.create_task(batcher.submit(r, deadline=later(7200))))
            await until(lambda n=n: batcher.queue_depth == n)
        model.gate.set()
        # 16 rows, then the largest preferred prefix (4 rows: requests 1-3) at once; request 4
        # (3 rows, not preferred) waits for company until stop() flushes it; the adaptive
        # batcher, which has seen too few arrivals to expect company, sends it at once.
        await until(lambda: model.batches[:2] == [16, 4])
        if make is make_dynamic:
            await asyncio.sleep(0.02)
            assert not tasks[3].done() and len(model.batches) == 2
        await asyncio.wait_for(batcher.stop(), 10)
        results = await finish(first, *tasks)
        for req, res in zip([request(0, 16), *reqs], results, strict=True):
            check_result(req, res)
        assert model.batches == [16, 4, 3]

    run(scenario())


async def _filling(batcher: DynamicBatcher, first: Tensors) -> asyncio.Task[Tensors]:
    """Submit ``first`` and return once its batch waits for company."""
    task = asyncio.create_task(batcher.submit(first, deadline=later(7200)))
    await until(lambda: batcher._filling is not None)
    return task


def test_arrivals_join_a_filling_batch_that_goes_once_full() -> None:
    async def scenario() -> None:
        model = await make_model()
        batcher = await make_dynamic(
            model, max_batch_size=4, max_queue_delay_ms=3_600_000, queue_timeout_ms=3_600_000
        )
        reqs = [request(i) for i in range(4)]
        tasks = [await _filling(batcher, reqs[0])]
        for r in reqs[1:]:
            tasks.append(asyncio.create_task(batcher.submit(r, deadline=later(7200))))
        for req, res in zip(reqs, await finish(*tasks, limit=10), strict=True):
            check_result(req, res)
        assert model.batches == [4]
        await batcher.stop()

    run(scenario())


def test_a_request_that_leaves_a_filling_batch_no_longer_counts_towards_it() -> None:
    async def scenario() -> None:
        model = await make_model()
        batcher = await make_dynamic(
            model,
            max_batch_size=8,
            max_queue_delay_ms=3_600_000,
            queue_timeout_ms=3_600_000,
            preferred_batch_sizes=[3],
        )
        first = await _filling(batcher, request(0))
        gone = asyncio.create_task(batcher.submit(request(1), deadline=later(7200)))
        await until(lambda: batcher.queue_depth == 1)
        gone.cancel()
        await until(lambda: batcher.queue_depth == 0)
        # 1 + 2 rows: the preferred size, so the batch goes at once (counting the request that
        # left, it would be 4 rows and wait an hour).
        last = asyncio.create_task(batcher.submit(request(2, 2), deadline=later(7200)))
        results = await finish(first, last, limit=10)
        check_result(request(0), results[0])
        check_result(request(2, 2), results[1])
        assert model.batches == [3]
        await batcher.stop()

    run(scenario())


def test_an_arrival_with_an_earlier_deadline_shortens_the_wait_of_a_filling_batch() -> None:
    async def scenario() -> None:
        model = await make_model()
        batcher = await make_dynamic(
            model, max_batch_size=8, max_queue_delay_ms=3_600_000, queue_timeout_ms=3_600_000
        )
        first = await _filling(batcher, request(0))
        soon = asyncio.create_task(batcher.submit(request(1), deadline=later(0.05)))
        results = await finish(first, soon, limit=10)
        check_result(request(0), results[0])
        check_result(request(1), results[1])
        assert model.batches == [2]  # it went at the deadline, with both
        await batcher.stop()

    run(scenario())


def test_preferred_sizes_are_checked_against_max_batch_size() -> None:
    from infercore.errors import ConfigError
    from infercore.testing import plugin_manager

    plugins = plugin_manager()
    for kind in ("dynamic", "adaptive"):
        node = {"kind": kind, "max_batch_size": 8, "preferred_batch_sizes": [4, 16]}
        with pytest.raises(ConfigError) as err:
            plugins.build("batcher", node, plugins.build("model_loader", {"kind": "fake"}))
        text = str(err.value)
        assert text.startswith("batching.preferred_batch_sizes: 16 is above max_batch_size (8)")
        assert "\n" not in text
        with pytest.raises(ConfigError, match=r"^batching\.preferred_batch_sizes\[0\]: "):
            node = {"kind": kind, "preferred_batch_sizes": [0]}
            plugins.build("batcher", node, plugins.build("model_loader", {"kind": "fake"}))


# ----------------------------------------------------------------------------- stopping


@BATCHING
def test_stop_answers_queued_requests(make: MakeBatcher) -> None:
    async def scenario() -> None:
        model = await make_model(latency_s=0.03)
        batcher = await make(model, max_batch_size=1, queue_timeout_ms=30_000)
        reqs = [request(i) for i in range(5)]
        tasks = [asyncio.create_task(batcher.submit(r, deadline=later())) for r in reqs]
        await until(lambda: model.calls == 1)
        await asyncio.wait_for(batcher.stop(), 10)
        assert all(t.done() for t in tasks)
        for req, task in zip(reqs, tasks, strict=True):
            check_result(req, task.result())  # queued work finished, not dropped
        with pytest.raises(ShuttingDown):
            await batcher.submit(request(9), deadline=later())
        assert 9 not in model.ids_seen()

    run(scenario())


def test_stop_while_a_batch_waits_to_fill() -> None:
    async def scenario() -> None:
        model = await make_model()
        batcher = await make_dynamic(
            model, max_batch_size=8, max_queue_delay_ms=3_600_000, queue_timeout_ms=3_600_000
        )
        req = request(1, 2)
        task = asyncio.create_task(batcher.submit(req, deadline=later(7200)))
        await asyncio.sleep(0.02)
        # The collector has taken it and holds it, waiting for more rows.
        assert batcher.queue_depth == 0 and model.calls == 0 and not task.done()
        await asyncio.wait_for(batcher.stop(), 10)
        assert task.done()
        check_result(req, task.result())

    run(scenario())


async def serves_the_next_and_stops(batcher: Batcher) -> None:
    """The batcher still answers requests 2 and 3 correctly, then stops."""
    for rid in (2, 3):
        check_result(
            request(rid),
            await asyncio.wait_for(batcher.submit(request(rid), deadline=later()), 10),
        )
    await asyncio.wait_for(batcher.stop(), 10)


class CancellingModel(RecordingModel):
    """Lets a CancelledError of its own out of ``predict`` for the rows of request 1."""

    async def predict(self, inputs: Tensors) -> Tensors:
        if 1 in inputs["x"][:, 1]:
            raise asyncio.CancelledError
        return await super().predict(inputs)


@pytest.mark.parametrize("make", [make_dynamic, make_adaptive, make_none])
@pytest.mark.parametrize("slots", [1, 2])
def test_a_model_that_lets_a_cancellation_out_fails_that_request_only(
    make: Callable[..., Awaitable[Batcher]], slots: int
) -> None:
    """A CancelledError out of the model is that call's failure (500), not the end of the
    batcher: the request is answered and the next ones are served."""

    async def scenario() -> None:
        model = await make_model(CancellingModel)
        size = (
            {"max_concurrency": slots} if make is make_none else {"max_concurrent_batches": slots}
        )
        batcher: Any = await make(model, queue_timeout_ms=30_000, **size)
        with pytest.raises(BackendError):
            await asyncio.wait_for(batcher.submit(request(1), deadline=later()), 10)
        await serves_the_next_and_stops(batcher)

    run(scenario())


@pytest.mark.parametrize("slots", [1, 2])
def test_a_bug_after_the_model_call_does_not_stop_the_batcher(slots: int) -> None:
    """A hook that raises after a batch (here ``_completed``, once) is logged; the batch's
    requests are answered and the batcher goes on serving."""

    class BuggyHook(DynamicBatcher):
        raised = 0

        def _completed(self, live: list[Any], rows: int, seconds: float, now: float) -> None:
            if not BuggyHook.raised:
                BuggyHook.raised += 1
                raise RuntimeError("a bug in a hook")

    async def scenario() -> None:
        model = await make_model()
        batcher = BuggyHook(
            BuggyHook.Config(max_concurrent_batches=slots), BATCH_CTX, model, Observer()
        )
        await batcher.start()
        check_result(
            request(1), await asyncio.wait_for(batcher.submit(request(1), deadline=later()), 10)
        )
        assert BuggyHook.raised == 1
        await serves_the_next_and_stops(batcher)

    run(scenario())


@BATCHING
@pytest.mark.parametrize("slots", [1, 2], ids=["collector-runs-the-batch", "batch-tasks"])
def test_cancelled_stop_still_answers_everything(make: MakeBatcher, slots: int) -> None:
    """Stopping, cancelled while the model is stuck: the queued request is refused at once,
    the calls already running finish and are answered."""

    async def scenario() -> None:
        model = await make_model(gated=True)
        batcher = await make(
            model, max_batch_size=1, queue_timeout_ms=30_000, max_concurrent_batches=slots
        )
        running = [
            asyncio.create_task(batcher.submit(request(i), deadline=later())) for i in range(slots)
        ]
        await until(model.entered(slots))
        queued = asyncio.create_task(batcher.submit(request(slots), deadline=later()))
        await until(lambda: batcher.queue_depth == 1)
        stopping = asyncio.create_task(batcher.stop())
        await asyncio.sleep(0.02)
        assert not stopping.done()  # it waits for the stuck model
        stopping.cancel()
        results = await finish(queued, stopping, limit=10)
        assert isinstance(results[0], ShuttingDown)
        assert isinstance(results[1], asyncio.CancelledError)
        model.gate.set()
        for i, task in enumerate(running):
            check_result(request(i), await asyncio.wait_for(task, 10))
        await asyncio.sleep(0.02)
        assert model.ids_seen() == set(range(slots))

    run(scenario())


@BATCHING
@pytest.mark.parametrize("slots", [1, 2])
def test_with_one_slot_the_collector_runs_the_batch_itself(make: MakeBatcher, slots: int) -> None:
    """One batch at a time: the collector calls the model itself (no task per batch, the cost
    a lone request paid; benchmarks/batching_micro.py measures it). With more slots each
    batch gets a task of its own, so the collector forms the next meanwhile."""

    class TaskRecordingModel(RecordingModel):
        tasks: list[asyncio.Task[Any] | None] = []

        async def predict(self, inputs: Tensors) -> Tensors:
            self.tasks.append(asyncio.current_task())
            return await super().predict(inputs)

    async def scenario() -> None:
        model = await make_model(TaskRecordingModel)
        batcher: Any = await make(model, max_concurrent_batches=slots)
        for i in range(3):
            check_result(
                request(i), await asyncio.wait_for(batcher.submit(request(i), deadline=later()), 10)
            )
        collector = batcher._task
        assert len(model.tasks) == 3
        if slots == 1:
            assert all(t is collector for t in model.tasks)
        else:
            assert all(t is not collector for t in model.tasks)
        await batcher.stop()

    run(scenario())


def test_stop_before_start_and_twice() -> None:
    async def scenario() -> None:
        model = await make_model()
        batcher = DynamicBatcher(DynamicBatcher.Config(), BATCH_CTX, model)
        await batcher.stop()
        await batcher.start()
        check_result(request(1), await batcher.submit(request(1), deadline=later()))
        await batcher.stop()
        await batcher.stop()

    run(scenario())


# ---------------------------------------------------------------------------- none batcher


def test_none_batcher_bounds_concurrency() -> None:
    async def scenario() -> None:
        model = await make_model(latency_s=0.02)
        batcher = await make_none(model, max_concurrency=2, queue_timeout_ms=30_000)
        reqs = [request(i, 1 + i % 3) for i in range(10)]
        results = await finish(*(batcher.submit(r, deadline=later()) for r in reqs))
        for req, res in zip(reqs, results, strict=True):
            check_result(req, res)
        assert model.max_active == 2
        assert model.batches == [1 + i % 3 for i in range(10)]  # one call per request

    run(scenario())


def test_none_batcher_full_queue_rejects_at_once() -> None:
    async def scenario() -> None:
        model = await make_model(gated=True)
        observer = Observer()
        batcher = await make_none(
            model, observer, max_concurrency=1, max_queue_size=2, queue_timeout_ms=30_000
        )
        running = asyncio.create_task(batcher.submit(request(0), deadline=later()))
        await until(model.entered(1))
        queued = [asyncio.create_task(batcher.submit(request(i), deadline=later())) for i in (1, 2)]
        await until(lambda: batcher.queue_depth == 2)
        coro = batcher.submit(request(9), deadline=later())
        with pytest.raises(QueueFull):
            coro.send(None)
        assert len(model.seen) == 1
        model.gate.set()
        results = await finish(running, *queued)
        assert not any(isinstance(r, BaseException) for r in results)
        assert model.calls == 3 and 9 not in model.ids_seen()
        assert max(observer.depths) == 2 and observer.depths[-1] == 0

    run(scenario())


def test_none_batcher_queue_timeout_never_runs() -> None:
    async def scenario() -> None:
        model = await make_model(gated=True)
        batcher = await make_none(model, max_concurrency=1, queue_timeout_ms=40)
        tasks = [
            asyncio.create_task(batcher.submit(request(i), deadline=later())) for i in range(5)
        ]
        waited = await finish(*tasks[1:])
        assert all(isinstance(r, QueueTimeout) for r in waited), waited
        assert batcher.queue_depth == 0
        model.gate.set()
        check_result(request(0), await tasks[0])
        await asyncio.sleep(0.02)
        assert model.calls == 1 and model.ids_seen() == {0}

    run(scenario())


# ------------------------------------------------------------ expected queue timeouts


def test_drain_limit_is_the_backlogged_rate_times_the_horizon() -> None:
    drain = _Drain(0.5, window=4, min_samples=2)
    drain.took(8, 10.0, backlog_left=True)  # the first take: no interval yet
    drain.took(8, 10.1, backlog_left=True)  # 8 rows in 0.1 s
    assert drain.limit == math.inf  # one interval, two needed
    drain.took(8, 10.2, backlog_left=False)  # 16 rows in 0.2 s: 80/s, 40 rows in 0.5 s
    assert drain.limit == pytest.approx(40)
    drain.took(8, 14.0, backlog_left=True)  # the queue was empty before: no interval
    assert drain.limit == pytest.approx(40)  # 3.8 s since the last interval: under 10 x 0.5 s
    for t in (14.2, 14.4, 14.6):  # 4 rows every 0.2 s; the window keeps the last four
        drain.took(4, t, backlog_left=True)
    assert drain.limit == pytest.approx(20 / 0.7 * 0.5)  # (8, .1), (4, .2) x 3
    assert drain.wait_ms(10) == pytest.approx(1000 * 10 * 0.7 / 20)


def test_drain_forgets_a_rate_measured_long_ago() -> None:
    drain = _Drain(0.5, window=4, min_samples=1)
    for t in (10.0, 10.5, 11.0):  # a slow spell: 2 rows every 0.5 s, 2 rows in 0.5 s
        drain.took(2, t, backlog_left=True)
    drain.took(2, 11.5, backlog_left=False)
    assert drain.limit == pytest.approx(2)
    drain.took(1, 16.4, backlog_left=False)  # 4.9 s after the last interval: kept
    assert drain.limit == pytest.approx(2)
    drain.took(1, 21.6, backlog_left=True)  # 10.1 s: over 10 horizons, forgotten
    assert drain.limit == math.inf and math.isnan(drain.wait_ms(5))
    drain.took(8, 21.7, backlog_left=True)  # the new backlog measures its own rate
    assert drain.limit == pytest.approx(8 / 0.1 * 0.5)


def measure(drain: _Drain, limit: float) -> None:
    """Give ``drain`` a rate measured just now, at which ``limit`` units fill its horizon."""
    assert drain.horizon_s is not None
    now = time.perf_counter()  # the drain's clock
    drain.took(0, now - drain.horizon_s / limit, backlog_left=True)
    drain.took(1, now, backlog_left=False)  # the backlog ended: the next take measures nothing
    assert drain.limit == pytest.approx(limit)


def test_drain_forgets_a_stale_rate_before_it_refuses() -> None:
    """A refusal checks the rate's age itself: the next take may be a loop turn away."""

    async def scenario() -> None:
        drain = _Drain(0.5, window=4)  # forgets after 10 horizons: 5 s
        now = time.perf_counter()  # the drain's clock
        drain.took(0, now - 5.3, backlog_left=True)
        drain.took(2, now - 5.1, backlog_left=True)  # 2 rows in 0.2 s, measured 5.1 s ago
        assert drain.limit == pytest.approx(5) and not drain.over(4)  # fits: kept
        assert drain.limit == pytest.approx(5)
        assert not drain.over(6) and drain.limit == math.inf  # would refuse: forgotten first
        fresh = _Drain(0.5)
        measure(fresh, limit=3)
        assert fresh.over(4) and fresh.limit == pytest.approx(3)  # measured just now: refused

    run(scenario())


@pytest.mark.parametrize(
    "make", [make_none, make_dynamic, make_adaptive], ids=["none", "dynamic", "adaptive"]
)
def test_a_burst_after_a_quiet_spell_is_not_judged_by_the_old_rate(
    make: Callable[..., Awaitable[Batcher]],
) -> None:
    """Requests that arrive in one loop turn, before the batcher takes any, after ten
    horizons without a backlog, are queued: the old rate is forgotten, not used to refuse."""

    async def scenario() -> None:
        model = await make_model()
        size = {"max_concurrency": 1} if make is make_none else {"max_batch_size": 4}
        batcher: Any = await make(model, queue_timeout_ms=100, **size)
        drain = batcher._drain
        now = time.perf_counter()  # the drain's clock
        drain.took(0, now - 1.3, backlog_left=True)  # 1 row in 0.3 s, 1.0 s (12.5 horizons) ago
        drain.took(1, now - 1.0, backlog_left=True)
        assert drain.limit == pytest.approx(1 / 0.3 * 0.08)
        burst = [request(i) for i in range(10)]
        results = await asyncio.gather(*(batcher.submit(r, deadline=later()) for r in burst))
        for req, res in zip(burst, results, strict=True):
            check_result(req, res)
        await batcher.stop()

    run(scenario())


def test_drain_without_a_horizon_never_limits() -> None:
    drain = _Drain(None)
    for i in range(20):
        drain.took(3, i * 0.01, backlog_left=True)
    assert drain.limit == math.inf and math.isnan(drain.wait_ms(5))


@pytest.mark.parametrize("on", [True, False], ids=["on", "off"])
@pytest.mark.parametrize(
    "make", [make_none, make_dynamic, make_adaptive], ids=["none", "dynamic", "adaptive"]
)
def test_a_request_that_would_time_out_is_rejected_at_once(
    make: Callable[..., Awaitable[Batcher]], on: bool
) -> None:
    """Behind more work than the model runs in queue_timeout_ms, 503 queue_full at once."""

    async def scenario() -> None:
        model = await make_model(latency_s=0.02)  # 20 ms a call: 50 calls a second
        size = {"max_concurrency": 1} if make is make_none else {"max_batch_size": 2}
        batcher = await make(
            model,
            queue_timeout_ms=300,  # 80 % of it: none 12 requests, dynamic 24 rows
            max_queue_size=1000,
            reject_expected_timeouts=on,
            **size,
        )
        # A backlog the model clears well within the timeout: the batcher measures its rate.
        warm = await finish(*(batcher.submit(request(i), deadline=later()) for i in range(12)))
        assert not any(isinstance(r, BaseException) for r in warm), warm
        assert not batcher.full
        model.gate = asyncio.Event()  # held while the burst arrives: the queue cannot drain
        burst = [
            asyncio.create_task(batcher.submit(request(100 + i), deadline=later()))
            for i in range(120)
        ]
        await until(model.entered(13 if make is make_none else 7))
        for _ in range(3):
            await asyncio.sleep(0)
        at_once = [t for t in burst if t.done()]  # answered before anything ran
        if on:
            # `full` (what reject_before_body asks) says whether the next one is refused.
            while not batcher.full:  # the collector took a batch off the queue: room for it
                burst.append(
                    asyncio.create_task(batcher.submit(request(100 + len(burst)), deadline=later()))
                )
                await asyncio.sleep(0)
                assert len(burst) < 125
            coro = batcher.submit(request(999), deadline=later())
            with pytest.raises(QueueFull, match="queue_timeout_ms"):
                coro.send(None)  # rejected on its first step: it never waits
        else:
            assert not batcher.full
        model.gate.set()
        results = await finish(*burst)
        full = [i for i, r in enumerate(results) if isinstance(r, QueueFull)]
        timed_out = sum(isinstance(r, QueueTimeout) for r in results)
        if on:
            assert len(full) >= 80, results
            assert len(at_once) == len(full)  # every rejection came before any model call
            assert timed_out <= 5  # only near the estimate's edge
            assert "over 80% of queue_timeout_ms (300)" in str(results[full[0]])
            assert not model.ids_seen() & {100 + i for i in full}
        else:
            assert not full and not at_once
            assert timed_out >= 80
        assert model.calls <= 12 + 120 - len(full) - timed_out  # nothing else ran
        await batcher.stop()

    run(scenario())


@pytest.mark.parametrize("make", [make_none, make_dynamic], ids=["none", "dynamic"])
def test_a_request_that_would_start_at_once_is_never_refused_as_late(
    make: Callable[..., Awaitable[Batcher]],
) -> None:
    """Work running over the limit does not delay a request a free model slot takes at once;
    once no slot is free, it does."""

    async def scenario() -> None:
        model = await make_model(gated=True)
        if make is make_none:  # its units are requests: two calls running, a third slot free
            size: dict[str, Any] = {"max_concurrency": 3}
            over = [request(1), request(2)]
        else:  # rows: one batch of three running, a second slot free
            size = {"max_concurrent_batches": 2, "max_batch_size": 2}
            over = [request(1, 3)]
        batcher: Any = await make(model, queue_timeout_ms=30_000, **size)
        measure(batcher._drain, limit=1.5)  # 1.5 requests (rows) run within the limit
        running = [asyncio.create_task(batcher.submit(r, deadline=later())) for r in over]
        await until(model.entered(len(over)))
        assert not batcher.full  # over the limit, but a new request would start at once
        last = request(9)
        running.append(asyncio.create_task(batcher.submit(last, deadline=later())))
        await until(model.entered(len(over) + 1))  # and it did, in the free slot
        assert batcher.full  # no slot free now, and more than 1.5 ahead
        with pytest.raises(QueueFull, match="queue_timeout_ms"):
            batcher.submit(request(10), deadline=later()).send(None)
        model.gate.set()
        for req, res in zip([*over, last], await finish(*running), strict=True):
            check_result(req, res)
        await batcher.stop()

    run(scenario())


def test_none_batcher_deadline_and_cancel() -> None:
    async def scenario() -> None:
        model = await make_model(gated=True)
        batcher = await make_none(model, max_concurrency=1, queue_timeout_ms=30_000)
        first = asyncio.create_task(batcher.submit(request(0), deadline=later()))
        await until(model.entered(1))
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(request(1), deadline=later(0.02))
        gone = asyncio.create_task(batcher.submit(request(2), deadline=later()))
        await until(lambda: batcher.queue_depth == 1)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert batcher.queue_depth == 0
        model.gate.set()
        check_result(request(0), await first)
        check_result(request(3), await batcher.submit(request(3), deadline=later()))
        assert model.ids_seen() == {0, 3}

    run(scenario())


@pytest.mark.parametrize("make", [make_none, make_dynamic])
def test_a_caller_that_gives_up_keeps_its_slot_until_the_model_returns(
    make: Callable[..., Awaitable[Batcher]],
) -> None:
    async def scenario() -> None:
        model = await make_model(gated=True)
        one_slot = {"max_concurrency": 1} if make is make_none else {"max_batch_size": 1}
        batcher = await make(model, queue_timeout_ms=30_000, **one_slot)
        first = asyncio.create_task(batcher.submit(request(0), deadline=later()))
        await until(model.entered(1))
        queued = asyncio.create_task(batcher.submit(request(1), deadline=later()))
        await until(lambda: batcher.queue_depth == 1)
        first.cancel()  # the caller goes (disconnect, deadline); its model call goes on
        with pytest.raises(asyncio.CancelledError):
            await first
        await asyncio.sleep(0.02)
        assert len(model.seen) == 1 and not queued.done()  # the slot is still taken
        model.gate.set()
        check_result(request(1), await asyncio.wait_for(queued, 10))
        assert model.max_active == 1
        await batcher.stop()

    run(scenario())


def test_none_batcher_stop_waits_for_running_and_queued_requests() -> None:
    async def scenario() -> None:
        model = await make_model(gated=True)
        batcher = await make_none(model, max_concurrency=1, queue_timeout_ms=30_000)
        first = asyncio.create_task(batcher.submit(request(0), deadline=later()))
        await until(model.entered(1))
        queued = asyncio.create_task(batcher.submit(request(1), deadline=later()))
        await until(lambda: batcher.queue_depth == 1)
        stopping = asyncio.create_task(batcher.stop())
        await asyncio.sleep(0.02)
        assert not stopping.done()  # the model is still busy with accepted work
        with pytest.raises(ShuttingDown):
            await batcher.submit(request(9), deadline=later())
        model.gate.set()
        await asyncio.wait_for(stopping, 10)
        assert first.done() and queued.done()
        check_result(request(0), first.result())
        check_result(request(1), queued.result())
        assert model.ids_seen() == {0, 1}

    run(scenario())


@pytest.mark.parametrize("make", [make_none, make_dynamic])
def test_model_failures_are_backend_errors(make: Callable[..., Awaitable[Batcher]]) -> None:
    async def scenario() -> None:
        model = await make_model(malformed=True)
        batcher = await make(model)
        with pytest.raises(BackendError):
            await batcher.submit(request(1, 3), deadline=later())
        model.config = FakeModel.Config(features=FEATURES, fail_on_value=POISON)
        with pytest.raises(BackendError):
            await batcher.submit(request(2, poisoned=True), deadline=later())
        check_result(request(3), await batcher.submit(request(3), deadline=later()))
        await batcher.stop()

    run(scenario())
