"""Request priority levels in the ``dynamic`` and ``adaptive`` batchers (Triton's
``priority_levels``), and V2's ``parameters.priority``.

- Batches form from the highest level waiting (1 first), first come first served within a
  level; a request that names no priority (or 0) is at ``default_priority_level``.
- ``max_queue_size`` is one bound for every level; a low level starved past its queue timeout
  is answered 503 ``queue_timeout`` and never runs.
- ``priority_levels: 0`` (the default) keeps the plain deque: priorities are ignored.
- ``parameters.priority`` is an unsigned integer (else 400), above the levels a 400 naming them.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from test_batching import (
    BATCHING,
    MakeBatcher,
    check_result,
    finish,
    later,
    make_dynamic,
    make_model,
    make_none,
    request,
    run,
    until,
)
from tritonclient.http import _utils as triton_utils

from infercore.builtins.batchers import DynamicBatcher, _LevelQueue
from infercore.components import Batcher
from infercore.errors import ConfigError, InvalidInput, QueueFull, QueueTimeout
from infercore.protocol import v2
from infercore.testing import plugin_manager


def ids_in_order(model: Any) -> list[int]:
    """The request ids the model saw, in the order it ran them."""
    return [int(v) for batch in model.seen for v in batch[:, 1]]


async def occupy(
    batcher: DynamicBatcher, model: Any, deadline_s: float = 30.0
) -> asyncio.Task[Any]:
    """Submit request 0 and wait until the (gated) model runs it: the model is busy, so what
    is submitted next queues. Returns the request's task."""
    blocker = asyncio.create_task(batcher.submit(request(0), deadline=later(deadline_s)))
    await until(model.entered(1))
    return blocker


async def submit_queued(
    batcher: DynamicBatcher, rid: int, priority: int | None
) -> asyncio.Task[Any]:
    """Submit request ``rid`` (``None``: no priority, as a request that names none) and let
    it join the queue: ``submit`` does not suspend before it waits for its answer, so the
    task's first step queues it."""
    if priority is None:
        coro = batcher.submit(request(rid), deadline=later())
    else:
        coro = batcher.submit_with_priority(request(rid), deadline=later(), priority=priority)
    task = asyncio.create_task(coro)
    await asyncio.sleep(0)
    return task


# ----------------------------------------------------------------------------- ordering


@BATCHING
def test_batches_form_from_the_highest_level_first_come_first_served_within(
    make: MakeBatcher,
) -> None:
    async def scenario() -> None:
        model = await make_model(gated=True)
        batcher = await make(model, max_batch_size=1, priority_levels=3, default_priority_level=2)
        blocker = await occupy(batcher, model)  # the model is busy: what follows queues
        # (id, priority): None names no priority (the default, 2); 0 is the default too.
        arrivals = [(1, 3), (2, None), (3, 1), (4, 3), (5, 0), (6, 1), (7, 2)]
        tasks = [await submit_queued(batcher, rid, p) for rid, p in arrivals]
        assert model.gate is not None
        model.gate.set()
        results = await finish(blocker, *tasks)
        for rid, out in zip([0] + [rid for rid, _ in arrivals], results, strict=True):
            check_result(request(rid), out)
        assert ids_in_order(model) == [0, 3, 6, 2, 5, 7, 1, 4]
        await batcher.stop()

    run(scenario())


@BATCHING
def test_a_batch_takes_the_highest_levels_and_fills_from_the_next(make: MakeBatcher) -> None:
    async def scenario() -> None:
        model = await make_model(gated=True)
        batcher = await make(model, max_batch_size=3, priority_levels=2, default_priority_level=2)
        blocker = asyncio.create_task(batcher.submit(request(0, 3), deadline=later()))
        await until(model.entered(1))
        arrivals = [(1, 2), (2, 2), (3, 1), (4, None), (5, 1)]
        tasks = [await submit_queued(batcher, rid, p) for rid, p in arrivals]
        assert model.gate is not None
        model.gate.set()
        await finish(blocker, *tasks)
        batches = [[int(v) for v in batch[:, 1]] for batch in model.seen]
        assert batches == [[0, 0, 0], [3, 5, 1], [2, 4]]
        await batcher.stop()

    run(scenario())


@BATCHING
def test_without_levels_priorities_are_ignored_and_the_queue_is_a_deque(
    make: MakeBatcher,
) -> None:
    async def scenario() -> None:
        model = await make_model(gated=True)
        batcher = await make(model, max_batch_size=1)
        assert type(batcher._queue) is not _LevelQueue  # the unchanged path, chosen at build
        assert batcher.priority_levels == 0 and batcher.default_priority_level == 0
        blocker = await occupy(batcher, model)
        tasks = [await submit_queued(batcher, 1, None), await submit_queued(batcher, 2, None)]
        assert model.gate is not None
        model.gate.set()
        await finish(blocker, *tasks)
        assert ids_in_order(model) == [0, 1, 2]  # first come, first served
        with pytest.raises(ValueError, match="not a level"):
            await batcher.submit(request(3), deadline=later(), priority=1)
        await batcher.stop()

    run(scenario())


def test_a_batcher_without_levels_is_handed_no_priority() -> None:
    """The base class: third-party batchers written before priorities keep working."""

    class OldBatcher(Batcher):
        kind = "old"

        async def submit(self, inputs: Any, *, deadline: float) -> Any:
            return {"seen": inputs}

    async def scenario() -> None:
        model = await make_model()
        old = OldBatcher(None, model.context, model)
        assert old.priority_levels == 0 and old.default_priority_level == 0
        out = await old.submit_with_priority(request(1), deadline=later(), priority=1)
        assert out["seen"]["x"][0, 1] == 1
        none = await make_none(model)
        assert none.priority_levels == 0
        check_result(
            request(2), await none.submit_with_priority(request(2), deadline=later(), priority=5)
        )
        await none.stop()

    run(scenario())


# ----------------------------------------------------------------------------- bounds, timeouts


@BATCHING
def test_the_queue_bound_is_shared_by_every_level(make: MakeBatcher) -> None:
    async def scenario() -> None:
        model = await make_model(gated=True)
        batcher = await make(
            model,
            max_batch_size=1,
            max_queue_size=3,
            priority_levels=2,
            default_priority_level=2,
        )
        blocker = await occupy(batcher, model)
        tasks = [await submit_queued(batcher, rid, 2) for rid in (1, 2, 3)]
        assert batcher.full
        with pytest.raises(QueueFull):
            await batcher.submit_with_priority(request(4), deadline=later(), priority=1)
        with pytest.raises(QueueFull):
            await batcher.submit(request(5), deadline=later())
        assert model.gate is not None
        model.gate.set()
        await finish(blocker, *tasks)
        assert 4 not in model.ids_seen() and 5 not in model.ids_seen()
        await batcher.stop()

    run(scenario())


class StepModel:
    """Holds each call of ``model`` until :meth:`step` lets the oldest one through."""

    def __init__(self, model: Any) -> None:
        self.entered = 0
        self.held: list[asyncio.Future[None]] = []
        original = model.predict

        async def predict(inputs: Any) -> Any:
            self.entered += 1
            held = asyncio.get_running_loop().create_future()
            self.held.append(held)
            await held
            return await original(inputs)

        model.predict = predict

    def step(self) -> None:
        self.held.pop(0).set_result(None)


@BATCHING
def test_a_low_level_starved_past_its_queue_timeout_gets_queue_timeout(
    make: MakeBatcher,
) -> None:
    async def scenario() -> None:
        model = await make_model()
        stepper = StepModel(model)
        batcher = await make(
            model,
            max_batch_size=1,
            queue_timeout_ms=300,
            reject_expected_timeouts=False,
            priority_levels=2,
            default_priority_level=1,
        )
        high = [asyncio.create_task(batcher.submit(request(100), deadline=later()))]
        await until(lambda: stepper.entered == 1)  # the first call is running
        low = await submit_queued(batcher, 1, 2)
        rid = 101
        # Always one high-priority request queued while the model runs one call at a time:
        # the low one never reaches the head, and its queue timeout answers it.
        while not low.done():
            high.append(await submit_queued(batcher, rid, None))
            rid += 1
            entered = stepper.entered
            stepper.step()  # the running call ends; the collector takes the next in line
            await until(lambda n=entered: stepper.entered > n or low.done())
        with pytest.raises(QueueTimeout):
            low.result()
        assert len(high) > 2
        while not all(task.done() for task in high):
            await until(lambda: stepper.held != [] or all(task.done() for task in high))
            if stepper.held:
                stepper.step()
        for rid, task in enumerate(high, start=100):
            check_result(request(rid), task.result())
        assert 1 not in model.ids_seen()  # it never ran
        await batcher.stop()

    run(scenario())


@BATCHING
def test_expected_timeouts_count_only_the_rows_of_the_levels_ahead(make: MakeBatcher) -> None:
    """With ``reject_expected_timeouts``, a high level is not refused for the rows of the
    levels below it: they wait behind it."""

    async def scenario() -> None:
        model = await make_model(gated=True)
        batcher = await make(model, max_batch_size=1, priority_levels=2, default_priority_level=2)
        blocker = await occupy(batcher, model)
        tasks = [await submit_queued(batcher, rid, None) for rid in (1, 2, 3)]
        # As measured under load: 2 rows drain within the horizon (a fresh measurement).
        batcher._drain.limit = 2
        batcher._drain._measured_at = time.perf_counter()
        with pytest.raises(QueueFull, match="take about"):
            await batcher.submit(request(4), deadline=later())  # 4 rows ahead at its level
        assert not batcher.full  # a level-1 request has 1 row ahead: the body decides
        high = asyncio.create_task(
            batcher.submit_with_priority(request(5), deadline=later(), priority=1)
        )
        await until(lambda: batcher.queue_depth == 4)
        assert not high.done()  # admitted
        assert model.gate is not None
        model.gate.set()
        await finish(blocker, high, *tasks)
        assert ids_in_order(model)[:2] == [0, 5]
        await batcher.stop()

    run(scenario())


def test_compacting_the_queue_keeps_each_level_in_order() -> None:
    async def scenario() -> None:
        model = await make_model(gated=True)
        batcher = await make_dynamic(
            model,
            max_batch_size=1,
            max_queue_size=2,
            priority_levels=2,
            default_priority_level=2,
        )
        blocker = await occupy(batcher, model)
        # Requests whose callers went stay in the queue until compacted (at 2 x the bound).
        for rid, p in ((1, 2), (2, 1), (3, 2), (4, 1)):
            gone = await submit_queued(batcher, rid, p)
            gone.cancel()
            await asyncio.gather(gone, return_exceptions=True)
        assert len(batcher._queue) == 4
        kept = [await submit_queued(batcher, 5, 2), await submit_queued(batcher, 6, 1)]
        assert len(batcher._queue) == 2  # compacted before the first of these joined
        assert model.gate is not None
        model.gate.set()
        await finish(blocker, *kept)
        assert ids_in_order(model) == [0, 6, 5]
        await batcher.stop()

    run(scenario())


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("kind", ["dynamic", "adaptive"])
def test_priority_options_are_checked(kind: str) -> None:
    plugins = plugin_manager()

    def build(**options: Any) -> Any:
        model = plugins.build("model_loader", {"kind": "fake"})
        return plugins.build("batcher", {"kind": kind, **options}, model)

    with pytest.raises(ConfigError) as err:
        build(priority_levels=3)
    text = str(err.value)
    assert text.startswith("batching.default_priority_level: 0 is not a level"), text
    assert "from 1 to 3" in text and "\n" not in text
    with pytest.raises(ConfigError, match=r"^batching\.default_priority_level: 4 is not"):
        build(priority_levels=3, default_priority_level=4)
    with pytest.raises(ConfigError, match=r"^batching\.priority_levels: "):
        build(priority_levels=256, default_priority_level=1)
    with pytest.raises(ConfigError, match=r"^batching\.priority_levels: "):
        build(priority_levels=-1)
    with pytest.raises(ConfigError, match=r"^batching\.priority_levels: "):
        build(priority_levels="high")
    assert build(priority_levels=255, default_priority_level=255).priority_levels == 255
    # Without levels the default level is ignored (a recipe may turn levels off by override).
    off = build(priority_levels=0, default_priority_level=2)
    assert off.priority_levels == 0 and off.default_priority_level == 0


# ----------------------------------------------------------------------------- V2 parameter


def decode(raw: bytes, header_length: int | None = None) -> v2.DecodedV2:
    return v2.decode(raw, header_length, max_elements=max(len(raw), 1))


def body(**params: Any) -> bytes:
    import json

    doc = {
        "inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}],
        "parameters": params,
    }
    return json.dumps(doc).encode()


def test_the_priority_of_a_tritonclient_request_is_decoded() -> None:
    arr = np.ones((1, 2), np.float32)
    inp = triton.InferInput("x", [1, 2], "FP32")
    inp.set_data_from_numpy(arr, binary_data=True)
    raw, json_size = triton_utils._get_inference_request(
        inputs=[inp],
        request_id="",
        outputs=None,
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=3,
        timeout=None,
        custom_parameters=None,
    )
    assert decode(raw, json_size).priority == 3


def test_priority_zero_or_absent_is_the_default() -> None:
    assert decode(body()).priority == 0
    assert decode(body(priority=0)).priority == 0
    assert decode(body(priority=2**64 - 1)).priority == 2**64 - 1


@pytest.mark.parametrize("value", [-1, 1.5, 1.0, True, "1", None, 2**64, [1]])
def test_a_malformed_priority_is_a_400_naming_it(value: Any) -> None:
    if value is None:  # JSON null: as absent
        assert decode(body(priority=None)).priority == 0
        return
    with pytest.raises(InvalidInput) as info:
        decode(body(priority=value))
    message = str(info.value)
    assert message.startswith("parameters.priority: expected a priority level"), message
    assert info.value.status_code == 400


def test_priority_level_checks_against_the_batchers_levels() -> None:
    async def scenario() -> None:
        model = await make_model()
        off = await make_dynamic(model)
        on = await make_dynamic(model, priority_levels=3, default_priority_level=2)
        try:
            assert v2.priority_level(7, off) == 0  # no levels: ignored, as Triton does
            assert v2.priority_level(1, on) == 1
            assert v2.priority_level(3, on) == 3
            assert v2.priority_level(2, on) == 0  # the default level: the plain submit
            with pytest.raises(InvalidInput) as info:
                v2.priority_level(4, on)
            message = str(info.value)
            assert message.startswith("parameters.priority: 4 is not a priority level"), message
            assert "model 'm'" in message and "1 (the highest) to 3" in message
            assert "the default level, 2" in (info.value.hint or "")
            assert info.value.status_code == 400
        finally:
            await off.stop()
            await on.stop()

    run(scenario())


def test_the_level_queue_serves_levels_in_order() -> None:
    queue = _LevelQueue(3, 2)

    class It:
        __slots__ = ("level", "name", "rows", "state")

        def __init__(self, name: str, level: int | None) -> None:
            self.name = name
            self.rows = 1
            self.state = 0
            if level is not None:
                self.level = level

    items = [It("a", 3), It("b", None), It("c", 1), It("d", 2), It("e", 1)]
    queue.extend(items)  # type: ignore[arg-type]
    assert len(queue) == 5 and [it.name for it in queue] == ["c", "e", "b", "d", "a"]  # type: ignore[attr-defined]
    assert queue.rows_ahead(1) == 2 and queue.rows_ahead(0) == 4 and queue.rows_ahead(3) == 5
    assert queue[0].name == "c"  # type: ignore[attr-defined]
    assert [queue.popleft().name for _ in range(3)] == ["c", "e", "b"]  # type: ignore[attr-defined]
    queue.append(It("f", 1))  # type: ignore[arg-type]
    assert [it.name for it in queue] == ["f", "d", "a"]  # type: ignore[attr-defined]
    queue.clear()
    assert not queue and len(queue) == 0
    with pytest.raises(IndexError):
        queue.popleft()
