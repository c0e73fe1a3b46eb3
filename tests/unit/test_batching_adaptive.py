"""The ``adaptive`` batcher's wait controller, driven with made-up times and latencies.

No assertion here depends on the wall clock: the controller takes the time as an argument,
and the batcher tests check the model's calls (what ran, in which batches), not elapsed time.
The guarantees the adaptive batcher shares with the dynamic one (separation, bounds,
timeouts, cancellation, failure isolation, stop) are tested in ``test_batching.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infercore.builtins.adaptive import AdaptiveBatcher, WaitController
from infercore.components import ComponentContext, Tensors
from infercore.errors import ConfigError
from infercore.metrics import Metrics
from infercore.testing import FakeModel, plugin_manager

MS = 1e-3
CTX = ComponentContext("batching", Path("."), model_name="m", version="1")


def controller(**kw: Any) -> WaitController:
    opts: dict[str, Any] = {"target_s": 20 * MS, "max_wait_s": 4 * MS, "max_rows": 32}
    opts.update(kw)
    return WaitController(**opts)


def busy(c: WaitController, now: float, rows_per_s: float = 10_000.0) -> None:
    """Arrivals at ``rows_per_s`` for a while before ``now``."""
    t = now - 0.5
    while t < now:
        c.observe_arrivals(8, t)
        t += 8 / rows_per_s


def feed(c: WaitController, latency_s: float, *, rows: int = 8, requests: int = 64) -> list[float]:
    """Answer ``requests`` requests in batches of 8; returns the wait after each batch."""
    waits = []
    for _ in range(requests // 8):
        c.observe_batch(rows, latency_s / 2, [latency_s] * 8)
        waits.append(c.wait_s)
    return waits


# ------------------------------------------------------------------------------ decisions


def test_a_lone_request_at_idle_is_not_delayed() -> None:
    c = controller()
    c.wait_s = c.max_wait_s  # even with the whole budget granted
    assert c.decide(now=100.0, rows=1, waited_s=0.0) == 0.0  # nothing ever arrived
    c.observe_arrivals(1, 100.0)
    # A second lone request after a quiet second: the rate has decayed, no company expected.
    assert c.decide(now=101.0, rows=1, waited_s=0.0) == 0.0


def test_under_load_a_partial_batch_waits_for_company() -> None:
    c = controller()
    c.wait_s = c.max_wait_s
    busy(c, 100.0)
    assert c.rate(100.0) > 5_000
    assert c.decide(now=100.0, rows=4, waited_s=0.0) == pytest.approx(c.max_wait_s)
    # The bound counts from the oldest request's arrival: only what is left of it.
    assert c.decide(now=100.0, rows=4, waited_s=3 * MS) == pytest.approx(1 * MS)
    assert c.decide(now=100.0, rows=4, waited_s=5 * MS) == 0.0
    # A full batch never waits.
    assert c.decide(now=100.0, rows=32, waited_s=0.0) == 0.0


def test_the_wait_leaves_room_for_the_model_call_within_the_target() -> None:
    c = controller(target_s=10 * MS, max_wait_s=8 * MS)
    c.wait_s = c.max_wait_s
    busy(c, 100.0)
    c.observe_batch(32, 7 * MS, [])  # a full batch costs 7 ms
    # 10 ms target - 1 ms already waited - 7 ms expected call = 2 ms of wait at most.
    assert c.decide(now=100.0, rows=4, waited_s=1 * MS) == pytest.approx(2 * MS)
    c.observe_batch(32, 20 * MS, [])
    c.observe_batch(32, 20 * MS, [])
    assert c.decide(now=100.0, rows=4, waited_s=0.0) == 0.0  # the model alone misses it


def test_the_cost_estimate_uses_the_nearest_measured_size() -> None:
    c = controller()
    assert c.cost(8) == 0.0  # nothing measured yet: no penalty assumed
    c.observe_batch(4, 2 * MS, [])
    assert c.cost(4) == pytest.approx(2 * MS)
    assert c.cost(32) == pytest.approx(16 * MS)  # scaled linearly from 4 rows


def test_waits_that_gather_nothing_stop_except_for_a_rare_probe() -> None:
    c = controller(probe_every=8)
    c.wait_s = c.max_wait_s
    busy(c, 100.0)
    assert c.decide(now=100.0, rows=4, waited_s=0.0) > 0.0  # hopeful at first
    for _ in range(4):
        c.observe_wait(0)  # closed-loop clients: everyone was already in the batch
    assert c.gain < 0.5
    decisions = [c.decide(now=100.0, rows=4, waited_s=0.0) for _ in range(16)]
    assert [d > 0 for d in decisions] == ([False] * 7 + [True]) * 2
    for _ in range(8):
        c.observe_wait(3)  # waits pay again
    assert c.decide(now=100.0, rows=4, waited_s=0.0) > 0.0


def test_a_wait_ends_after_a_few_quiet_gaps() -> None:
    c = controller(max_wait_s=50 * MS)
    assert c.quiet_s(100.0) == c.max_wait_s  # no rate measured: only the bound
    busy(c, 100.0, rows_per_s=10_000.0)
    assert c.quiet_s(100.0) == pytest.approx(3 / c.rate(100.0))
    assert c.quiet_s(100.0) < 1 * MS


# ------------------------------------------------------------------------------------ AIMD


def test_the_wait_grows_while_under_target_up_to_the_bound() -> None:
    c = controller()
    waits = feed(c, 2 * MS, requests=32 * 40)
    assert waits[0] == 0.0 < waits[-1]
    assert all(b >= a for a, b in itertools.pairwise(waits))  # never shrinks
    assert max(waits) == pytest.approx(c.max_wait_s)  # reaches the bound, never passes it
    assert c.wait_s <= c.max_wait_s


def test_the_wait_is_halved_when_the_p99_passes_the_target() -> None:
    c = controller()
    c.wait_s = c.max_wait_s
    assert feed(c, 30 * MS, requests=32) == [c.max_wait_s] * 3 + [c.max_wait_s / 2]
    feed(c, 30 * MS, requests=32)
    assert c.wait_s == pytest.approx(c.max_wait_s / 4)
    # Back under the target: it grows again, additively.
    feed(c, 2 * MS, requests=32)
    assert c.wait_s == pytest.approx(c.max_wait_s / 4 + c.step_s)


def test_one_slow_request_in_a_hundred_is_within_p99_but_two_are_not() -> None:
    c = controller(window=100, adjust_every=100)
    c.wait_s = 2 * MS
    assert c.observe_batch(8, MS, [2 * MS] * 99 + [50 * MS])
    assert c.wait_s == pytest.approx(2 * MS + c.step_s)  # p99 = 2 ms: under target, grown
    c = controller(window=100, adjust_every=100)
    c.wait_s = 2 * MS
    assert c.observe_batch(8, MS, [2 * MS] * 98 + [50 * MS] * 2)
    assert c.wait_s == pytest.approx(1 * MS)


def test_full_batches_do_not_grow_the_wait() -> None:
    c = controller()
    c.wait_s = 1 * MS
    for _ in range(8):
        c.observe_batch(32, MS, [2 * MS] * 32)  # full: waiting longer cannot fill them more
    assert c.wait_s == 1 * MS


def test_a_zero_bound_never_waits() -> None:
    c = controller(max_wait_s=0.0)
    busy(c, 100.0)
    feed(c, 1 * MS, requests=32 * 8)
    assert c.wait_s == 0.0
    assert c.decide(now=100.0, rows=1, waited_s=0.0) == 0.0


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.floats(0, 0.2),  # latency of the batch's requests (s)
            st.integers(1, 64),  # rows
            st.integers(0, 64),  # requests answered
            st.floats(0, 0.01),  # time since the previous batch (s)
            st.integers(1, 64),  # rows of the batch being formed
            st.floats(0, 0.02),  # how long its oldest request has waited (s)
        ),
        max_size=60,
    ),
    max_wait_ms=st.floats(0, 50),
    target_ms=st.floats(0.1, 100),
)
def test_property_decisions_stay_within_their_bounds(
    steps: list[tuple[float, int, int, float, int, float]], max_wait_ms: float, target_ms: float
) -> None:
    c = controller(max_wait_s=max_wait_ms * MS, target_s=target_ms * MS, adjust_every=8)
    now = 0.0
    for latency, rows, answered, gap, forming, waited in steps:
        now += gap
        c.observe_arrivals(rows, now)
        c.observe_batch(min(rows, 32), latency / 2, [latency] * answered)
        assert 0.0 <= c.wait_s <= c.max_wait_s
        wait = c.decide(now=now, rows=forming, waited_s=waited)
        assert 0.0 <= wait <= max(0.0, c.max_wait_s - waited) + 1e-12
        assert wait <= c.wait_s
        if forming >= c.max_rows:
            assert wait == 0.0


# ---------------------------------------------------------------------- the batcher itself


async def _batcher(**config: Any) -> tuple[FakeModel, AdaptiveBatcher]:
    model = FakeModel(FakeModel.Config(features=2), CTX)
    await model.start()
    batcher = AdaptiveBatcher(AdaptiveBatcher.Config(**config), CTX, model)
    await batcher.start()
    return model, batcher


def _req(value: float, n: int = 1) -> Tensors:
    return {"x": np.full((n, 2), value, np.float32)}


def test_a_lone_request_goes_at_once_even_with_an_hour_of_allowed_wait() -> None:
    async def scenario() -> None:
        model, batcher = await _batcher(
            max_batch_size=16,
            max_queue_delay_ms=3_600_000,
            queue_timeout_ms=3_600_000,
            target_p99_ms=7_200_000,
        )
        batcher.controller.wait_s = batcher.controller.max_wait_s  # the whole hour granted
        deadline = asyncio.get_running_loop().time() + 7200
        # Waiting for company would take an hour; the time limit fails the test instead.
        (out,) = await _answered(batcher, model, batcher.submit(_req(1.0, 3), deadline=deadline))
        assert out["y"].tolist() == [2.0, 2.0, 2.0]
        assert model.batches == [3]
        await batcher.stop()

    asyncio.run(scenario())


async def _keep_the_loop_busy(stop: asyncio.Event, step_s: float = 200e-6) -> None:
    """Other work on the event loop, as requests being read and decoded: steps of ``step_s``.

    Every turn of the loop then takes at least ``step_s``, far over ``idle_turn_s``, however
    fast or slow the machine: the loop is never seen idle.
    """
    while not stop.is_set():
        end = time.perf_counter() + step_s
        while time.perf_counter() < end:
            pass
        await asyncio.sleep(0)


async def _waiting_batcher() -> tuple[FakeModel, AdaptiveBatcher]:
    """An hour of wait granted, 10,000 rows/s arriving lately, no early end for quiet."""
    model, batcher = await _batcher(
        max_batch_size=8,
        max_queue_delay_ms=3_600_000,
        queue_timeout_ms=3_600_000,
        target_p99_ms=7_200_000,
    )
    batcher.controller.wait_s = batcher.controller.max_wait_s
    batcher.controller.quiet_gaps = 1e9
    busy(batcher.controller, asyncio.get_running_loop().time())
    return model, batcher


async def _answered(
    batcher: AdaptiveBatcher, model: FakeModel, *calls: Any, limit_s: float = 60.0
) -> list[Any]:
    """The results of ``calls`` (submits, or tasks of them) once all are answered.

    A batch that waits on when it should go would wait out its hour: the test fails after
    ``limit_s`` instead, naming what the batcher held. The limit is generous on purpose: a
    shared machine can pause the process for seconds, and a pause is not what is tested.
    """
    try:
        async with asyncio.timeout(limit_s):
            return list(await asyncio.gather(*calls))
    except TimeoutError:
        fill = batcher._filling
        left = None if fill is None else fill.until - asyncio.get_running_loop().time()
        pytest.fail(
            f"not answered within {limit_s:.0f}s: model batches {model.batches}, "
            f"queued {len(batcher._queue)}, waiting batch of "
            f"{None if fill is None else fill.rows} rows with {left} s left, "
            f"idle seen {batcher._idle}"
        )


def test_while_the_loop_is_busy_a_partial_batch_waits_for_company() -> None:
    # Until the idle check, this test waited with nothing else running on the loop; a wait
    # now goes on only while the loop has other work (the requests that will join it).
    async def scenario() -> None:
        model, batcher = await _waiting_batcher()
        deadline = asyncio.get_running_loop().time() + 7200
        stop = asyncio.Event()
        other_work = asyncio.create_task(_keep_the_loop_busy(stop))
        tasks = [asyncio.create_task(batcher.submit(_req(i, 2), deadline=deadline)) for i in (1, 2)]
        await asyncio.sleep(0.02)
        assert model.calls == 0 and not any(t.done() for t in tasks)  # waiting for company
        tasks += [
            asyncio.create_task(batcher.submit(_req(i, 2), deadline=deadline)) for i in (3, 4)
        ]
        results = await _answered(batcher, model, *tasks)
        assert model.batches == [8]  # full: it went without waiting out the hour
        assert [r["y"].tolist() for r in results] == [[2.0 * i] * 2 for i in (1, 2, 3, 4)]
        stop.set()
        await other_work
        await batcher.stop()

    asyncio.run(scenario())


def test_a_waiting_batch_goes_as_soon_as_the_loop_is_idle() -> None:
    async def scenario() -> None:
        model, batcher = await _waiting_batcher()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 7200
        # The controller grants the wait (busy arrivals, an hour allowed, no quiet limit) ...
        assert batcher.controller.decide(now=loop.time(), rows=4, waited_s=0.0) > 1.0
        tasks = [asyncio.create_task(batcher.submit(_req(i, 2), deadline=deadline)) for i in (1, 2)]
        # ... but nothing else runs on the loop: nobody can join, the batch goes at once
        # (waiting would take the hour; the time limit fails the test instead).
        first = await _answered(batcher, model, *tasks)
        assert model.batches == [4]
        assert [r["y"].tolist() for r in first] == [[2.0 * i] * 2 for i in (1, 2)]
        # The next wait is judged afresh: with the loop busy, it waits for company again, also
        # after a request with an earlier deadline has woken it up (not a sign of idleness).
        busy(batcher.controller, loop.time())
        stop = asyncio.Event()
        other_work = asyncio.create_task(_keep_the_loop_busy(stop))
        tasks = [asyncio.create_task(batcher.submit(_req(i, 2), deadline=deadline)) for i in (3, 4)]
        await asyncio.sleep(0.02)
        tasks.append(asyncio.create_task(batcher.submit(_req(5, 2), deadline=deadline - 3600)))
        await asyncio.sleep(0.02)
        assert model.batches == [4] and not any(t.done() for t in tasks)
        tasks.append(asyncio.create_task(batcher.submit(_req(6, 2), deadline=deadline)))
        await _answered(batcher, model, *tasks)
        assert model.batches == [4, 8]
        stop.set()
        await other_work
        await batcher.stop()

    asyncio.run(scenario())


def test_the_batcher_feeds_the_controller_and_shows_the_wait() -> None:
    async def scenario() -> None:
        metrics = Metrics()
        observer = metrics.version("m", "1")
        model = FakeModel(FakeModel.Config(features=2), CTX)
        await model.start()
        batcher = AdaptiveBatcher(
            AdaptiveBatcher.Config(max_batch_size=4, max_queue_delay_ms=8, target_p99_ms=60_000),
            CTX,
            model,
            observer,
        )
        await batcher.start()
        gauge = ("infercore_batch_wait_target_seconds", {"model": "m", "version": "1"})
        assert metrics.registry.get_sample_value(*gauge) == 0.0
        deadline = asyncio.get_running_loop().time() + 60
        for i in range(batcher.controller.adjust_every):  # one request at a time
            await batcher.submit(_req(i), deadline=deadline)
        # Far under the target, batches of one (not full): the wait grew by one step.
        assert batcher.controller.wait_s == pytest.approx(0.5 * MS)
        assert metrics.registry.get_sample_value(*gauge) == pytest.approx(0.5 * MS)
        assert batcher.controller.cost(1) > 0.0
        await batcher.stop()

    asyncio.run(scenario())


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("options", "start"),
    [
        ({"target_p99_ms": 0}, "batching.target_p99_ms: expected `float` > 0.0 (value 0)"),
        ({"target_p99_ms": "fast"}, "batching.target_p99_ms: expected float, got 'fast'"),
        (
            {"max_queue_delay_ms": -1},
            "batching.max_queue_delay_ms: expected `float` >= 0.0 (value -1)",
        ),
        ({"max_queue_size": 0}, "batching.max_queue_size: expected `int` >= 1 (value 0)"),
        ({"target_p99": 5}, "batching.target_p99: unknown key (value 5); valid keys here: "),
        ({"max_batch_size": 4, "preferred_batch_sizes": [8]}, "batching.preferred_batch_sizes:"),
    ],
)
def test_config_errors_name_the_path(options: dict[str, Any], start: str) -> None:
    plugins = plugin_manager()
    model = plugins.build("model_loader", {"kind": "fake"})
    with pytest.raises(ConfigError) as err:
        plugins.build("batcher", {"kind": "adaptive", **options}, model)
    text = str(err.value)
    assert text.startswith(start), text
    assert "\n" not in text


def test_defaults_are_finite() -> None:
    config = AdaptiveBatcher.Config()
    assert 0 < config.max_queue_delay_ms < config.target_p99_ms < config.queue_timeout_ms
    assert config.max_queue_size < 10_000 and config.max_batch_size < 10_000
    plugins = plugin_manager()
    assert plugins.kinds("batcher")["adaptive"] is AdaptiveBatcher
