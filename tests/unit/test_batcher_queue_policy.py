"""Per-level queue policies in the ``dynamic`` and ``adaptive`` batchers
(``priority_queue_policy``, Triton's ``ModelQueuePolicy`` by priority level).

- A level's ``max_queue_size`` bounds the requests waiting at that level, on top of the shared
  ``max_queue_size``: a full level answers 503 ``queue_full`` naming the level, without running
  the model, while the other levels are still admitted; requests that left the level (callers
  gone, timed out) stop counting.
- A level's ``queue_timeout_ms`` replaces the shared one for its requests, shorter or longer,
  and ``reject_expected_timeouts`` judges a request by its level's timeout.
- A level's ``timeout_action: delay`` (or the batcher's, for every level without its own, and
  for the whole queue without levels) does not refuse a request past its queue timeout: it runs
  after every request of its level and the levels above that has not timed out, and before
  those of the levels below (Triton's ``DELAY``). It is still bounded: it counts towards its
  level's and the shared ``max_queue_size``, and at its deadline it is answered 504. Where no
  level delays, the queue is the one without the option.
- The options are checked at config time: keys from 1 to ``priority_levels``, levels needed,
  positive sizes and timeouts, a level's bound at most the shared one, ``reject`` or ``delay``.

The model is gated (it blocks until the test opens it), so what is queued is exact: no test
here depends on how fast anything runs. Where a queue timeout must pass, :class:`Clock` moves
the loop's clock on instead of waiting for it.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

import msgspec
import pytest
from test_batcher_priority import ids_in_order, occupy, submit_queued
from test_batching import (
    BATCH_CTX,
    BATCHING,
    MakeBatcher,
    check_result,
    finish,
    later,
    make_dynamic,
    make_model,
    request,
    run,
    until,
)

from infercore.builtins.batchers import (
    DynamicBatcher,
    DynamicBatcherConfig,
    LevelQueuePolicy,
    _DelayingLevelQueue,
    _LevelQueue,
)
from infercore.errors import ConfigError, DeadlineExceeded, QueueFull, QueueTimeout
from infercore.testing import plugin_manager

LEVELS = {"priority_levels": 2, "default_priority_level": 2}


def policies(**by_level: dict[str, Any]) -> dict[int, LevelQueuePolicy]:
    """``priority_queue_policy`` as the batchers' configs hold it: ``policies(l2={...})``."""
    return {int(key[1:]): LevelQueuePolicy(**value) for key, value in by_level.items()}


# ----------------------------------------------------------------------------- bounds


@BATCHING
def test_a_full_level_is_refused_naming_it_while_other_levels_are_admitted(
    make: MakeBatcher,
) -> None:
    async def scenario() -> None:
        model = await make_model(gated=True)
        batcher = await make(
            model,
            max_batch_size=1,
            queue_timeout_ms=30_000,
            **LEVELS,
            priority_queue_policy=policies(l2={"max_queue_size": 2}),
        )
        blocker = await occupy(batcher, model)  # the model is busy: what follows queues
        # Level 2 is the default: a request naming no priority counts towards it too.
        queued = [await submit_queued(batcher, 1, None), await submit_queued(batcher, 2, 2)]
        assert not batcher.full  # the shared bound (512) is far: the body decides
        with pytest.raises(QueueFull) as info:
            await batcher.submit(request(3), deadline=later())
        error = info.value
        assert str(error.message).startswith(
            "queue of model 'm' is full at priority level 2: 2 requests wait at that level "
            "(priority_queue_policy.2.max_queue_size)"
        ), error.message
        # The shared full queue's answer: 503 queue_full with Retry-After.
        assert error.status_code == 503 and error.reason == "queue_full"
        assert error.headers == {"Retry-After": "1"}
        with pytest.raises(QueueFull, match="priority level 2"):
            await batcher.submit_with_priority(request(4), deadline=later(), priority=2)
        # Level 1 has no bound of its own: admitted.
        high = await submit_queued(batcher, 5, 1)
        assert batcher.queue_depth == 3
        # A caller that goes frees its place at the level.
        queued[0].cancel()
        await asyncio.gather(queued[0], return_exceptions=True)
        again = await submit_queued(batcher, 6, None)
        assert not again.done() and batcher.queue_depth == 3
        with pytest.raises(QueueFull, match="priority level 2"):
            await batcher.submit(request(7), deadline=later())
        assert model.gate is not None
        model.gate.set()
        results = await finish(blocker, queued[1], high, again)
        for rid, out in zip((0, 2, 5, 6), results, strict=True):
            check_result(request(rid), out)
        assert ids_in_order(model) == [0, 5, 2, 6]  # the refused ones never ran
        await batcher.stop()

    run(scenario())


@BATCHING
def test_the_shared_bound_still_holds_for_every_level(make: MakeBatcher) -> None:
    async def scenario() -> None:
        model = await make_model(gated=True)
        batcher = await make(
            model,
            max_batch_size=1,
            max_queue_size=3,
            **LEVELS,
            priority_queue_policy=policies(l1={"max_queue_size": 3}, l2={"max_queue_size": 2}),
        )
        blocker = await occupy(batcher, model)
        tasks = [await submit_queued(batcher, rid, p) for rid, p in ((1, 2), (2, 1), (3, 1))]
        assert batcher.full
        with pytest.raises(QueueFull) as info:  # level 1 has room, the queue has not
            await batcher.submit_with_priority(request(4), deadline=later(), priority=1)
        assert info.value.message == "queue of model 'm' is full"
        assert model.gate is not None
        model.gate.set()
        await finish(blocker, *tasks)
        assert 4 not in model.ids_seen()
        await batcher.stop()

    run(scenario())


# ----------------------------------------------------------------------------- timeouts


@BATCHING
def test_a_level_with_a_shorter_queue_timeout_times_out_alone(make: MakeBatcher) -> None:
    async def scenario() -> None:
        model = await make_model(gated=True)
        batcher = await make(
            model,
            max_batch_size=1,
            queue_timeout_ms=60_000,
            reject_expected_timeouts=False,
            priority_levels=2,
            default_priority_level=1,
            priority_queue_policy=policies(l2={"queue_timeout_ms": 30}),
        )
        blocker = await occupy(batcher, model, 120)
        default = await submit_queued(batcher, 1, None)  # level 1: the shared 60 s
        low = asyncio.create_task(
            batcher.submit_with_priority(request(2), deadline=later(120), priority=2)
        )
        await until(low.done)
        with pytest.raises(QueueTimeout) as info:
            low.result()
        assert info.value.message == (
            "waited over 30 ms in the queue at priority level 2 "
            "(priority_queue_policy.2.queue_timeout_ms)"
        )
        assert not default.done() and batcher.queue_depth == 1
        assert model.gate is not None
        model.gate.set()
        results = await finish(blocker, default)
        check_result(request(0), results[0])
        check_result(request(1), results[1])
        await batcher.stop()
        assert 2 not in model.ids_seen()  # timed out: never ran

    run(scenario())


@BATCHING
def test_a_level_with_a_longer_queue_timeout_outlasts_the_shared_one(make: MakeBatcher) -> None:
    async def scenario() -> None:
        model = await make_model(gated=True)
        batcher = await make(
            model,
            max_batch_size=1,
            queue_timeout_ms=30,
            reject_expected_timeouts=False,
            **LEVELS,
            priority_queue_policy=policies(l1={"queue_timeout_ms": 60_000}),
        )
        blocker = await occupy(batcher, model, 120)
        high = await submit_queued(batcher, 1, 1)
        default = asyncio.create_task(batcher.submit(request(2), deadline=later(120)))
        await until(default.done)
        with pytest.raises(QueueTimeout) as info:
            default.result()
        assert info.value.message == "waited over 30 ms in the queue"  # the shared timeout
        assert not high.done()
        assert model.gate is not None
        model.gate.set()
        results = await finish(blocker, high)
        check_result(request(1), results[1])
        await batcher.stop()
        assert ids_in_order(model) == [0, 1]

    run(scenario())


def fresh_drain_limit(batcher: DynamicBatcher, rows: int) -> None:
    """As measured under load: ``rows`` rows drain within the shared horizon (just now)."""
    batcher._drain.limit = rows
    batcher._drain._measured_at = time.perf_counter()


@BATCHING
def test_expected_timeouts_allow_a_level_with_a_longer_timeout_more_work_ahead(
    make: MakeBatcher,
) -> None:
    """With ``reject_expected_timeouts``, the work a request may have ahead of it scales with
    its level's queue timeout: a level that may wait 5 x longer is not refused by the shared
    horizon, and ``full`` (a refusal before the body says the level) judges by that level."""

    async def scenario() -> None:
        model = await make_model(gated=True)
        batcher = await make(
            model,
            max_batch_size=1,
            queue_timeout_ms=60_000,
            **LEVELS,
            priority_queue_policy=policies(l2={"queue_timeout_ms": 300_000}),
        )
        blocker = await occupy(batcher, model)
        tasks = [await submit_queued(batcher, rid, p) for rid, p in ((1, 1), (2, 1), (3, 2))]
        fresh_drain_limit(batcher, 2)
        # 3 rows ahead of even a level-1 request: over the shared limit (2), within 5 x it.
        assert not batcher.full
        tasks.append(await submit_queued(batcher, 4, None))  # level 2: 4 rows ahead, admitted
        assert not tasks[-1].done() and batcher.queue_depth == 4
        with pytest.raises(QueueFull) as info:  # level 1: the shared timeout, 3 rows ahead
            await batcher.submit_with_priority(request(5), deadline=later(), priority=1)
        message = info.value.message
        assert message.endswith("over 80% of queue_timeout_ms (60000)"), message
        assert model.gate is not None
        model.gate.set()
        await finish(blocker, *tasks)
        assert ids_in_order(model) == [0, 1, 2, 3, 4]
        await batcher.stop()

    run(scenario())


@BATCHING
def test_expected_timeouts_refuse_a_level_with_a_shorter_timeout_sooner(
    make: MakeBatcher,
) -> None:
    async def scenario() -> None:
        model = await make_model(gated=True)
        batcher = await make(
            model,
            max_batch_size=1,
            queue_timeout_ms=60_000,
            **LEVELS,
            priority_queue_policy=policies(l1={"queue_timeout_ms": 6_000}),
        )
        blocker = await occupy(batcher, model)
        fresh_drain_limit(batcher, 2)
        # Only the running row is ahead: within the shared limit, not within a tenth of it.
        with pytest.raises(QueueFull) as info:
            await batcher.submit_with_priority(request(1), deadline=later(), priority=1)
        message = info.value.message
        assert "over 80% of priority_queue_policy.1.queue_timeout_ms (6000)" in message, message
        default = await submit_queued(batcher, 2, None)  # level 2, the shared timeout
        assert not default.done() and batcher.queue_depth == 1
        assert model.gate is not None
        model.gate.set()
        await finish(blocker, default)
        assert ids_in_order(model) == [0, 2]
        await batcher.stop()

    run(scenario())


def test_without_policies_the_level_path_is_not_taken() -> None:
    """Levels without ``priority_queue_policy`` keep the shared bound and timeout alone, and a
    batcher without levels keeps its plain deque (both as before this option)."""

    async def scenario() -> None:
        model = await make_model()
        plain = DynamicBatcher(DynamicBatcherConfig(), BATCH_CTX, model)
        leveled = DynamicBatcher(DynamicBatcherConfig(**LEVELS), BATCH_CTX, model)
        assert plain._level_policies is None and leveled._level_policies is None
        with_policy = DynamicBatcher(
            DynamicBatcherConfig(
                **LEVELS, priority_queue_policy=policies(l1={"max_queue_size": 4})
            ),
            BATCH_CTX,
            model,
        )
        built = with_policy._level_policies
        assert built is not None and [p.max_queue_size for p in built] == [4, 0]
        assert [p.timeout_ms for p in built] == [1000, 1000]
        # No level delays: the queues are those without timeout_action (no delayed deques).
        assert type(plain._queue) is collections.deque
        assert type(leveled._queue) is _LevelQueue and type(with_policy._queue) is _LevelQueue
        assert not any(p.delay for p in built)
        every_level_rejects = DynamicBatcher(
            DynamicBatcherConfig(
                **LEVELS,
                timeout_action="delay",
                priority_queue_policy=policies(
                    l1={"timeout_action": "reject"}, l2={"timeout_action": "reject"}
                ),
            ),
            BATCH_CTX,
            model,
        )
        assert type(every_level_rejects._queue) is _LevelQueue

    run(scenario())


# ----------------------------------------------------------------------------- timeout_action


class Clock:
    """The running loop's clock, moved on at will: after :meth:`skip`, every timer due by
    then (a queue timeout, a deadline) fires at the loop's next turn, without a wait."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        real = loop.time
        self.offset = 0.0
        loop.time = lambda: real() + self.offset  # type: ignore[method-assign]

    def skip(self, seconds: float) -> None:
        self.offset += seconds


#: A level that delays past a queue timeout of 10 s: the tests skip the clock past it, and a
#: request queued after the skip has 10 s of real time to run before it would be delayed too.
DELAY = {"queue_timeout_ms": 10_000, "timeout_action": "delay"}


@BATCHING
def test_a_delayed_request_runs_after_the_untimed_out_ones_of_its_level_and_above(
    make: MakeBatcher,
) -> None:
    """Triton's order: level 1, level 1 delayed, level 2, level 2 delayed; none is refused."""

    async def scenario() -> None:
        clock = Clock()
        model = await make_model(gated=True)
        batcher = await make(
            model,
            max_batch_size=1,
            queue_timeout_ms=60_000,
            **LEVELS,
            priority_queue_policy=policies(l1=DELAY, l2=DELAY),
        )
        blocker = await occupy(batcher, model, 120)
        late = [await submit_queued(batcher, 1, 1), await submit_queued(batcher, 2, 2)]
        clock.skip(15)  # both pass their level's queue timeout (10 s)
        await until(lambda: batcher.delayed_requests == 2)
        assert not any(task.done() for task in late) and batcher.queue_depth == 2
        fresh = [await submit_queued(batcher, 3, 1), await submit_queued(batcher, 4, None)]
        assert batcher.queue_depth == 4  # the delayed ones still count
        assert model.gate is not None
        model.gate.set()
        results = await finish(blocker, *late, *fresh)
        for rid, out in zip((0, 1, 2, 3, 4), results, strict=True):
            check_result(request(rid), out)
        assert ids_in_order(model) == [0, 3, 1, 4, 2]
        await batcher.stop()

    run(scenario())


@BATCHING
def test_a_delayed_request_is_answered_504_at_its_deadline_and_never_runs(
    make: MakeBatcher,
) -> None:
    async def scenario() -> None:
        clock = Clock()
        model = await make_model(gated=True)
        batcher = await make(
            model, max_batch_size=1, **LEVELS, priority_queue_policy=policies(l2=DELAY)
        )
        blocker = await occupy(batcher, model, 120)
        delayed = asyncio.create_task(batcher.submit(request(1), deadline=later(20)))
        await asyncio.sleep(0)  # queued (see submit_queued)
        clock.skip(15)
        await until(lambda: batcher.delayed_requests == 1)
        assert not delayed.done() and batcher.queue_depth == 1
        clock.skip(10)  # past its deadline
        await until(delayed.done)
        with pytest.raises(DeadlineExceeded) as info:
            delayed.result()
        assert info.value.status_code == 504 and info.value.reason == "deadline_exceeded"
        assert batcher.queue_depth == 0
        assert model.gate is not None
        model.gate.set()
        await finish(blocker)
        await batcher.stop()
        assert ids_in_order(model) == [0]  # it never ran

    run(scenario())


@BATCHING
def test_delayed_requests_count_towards_the_level_bound(make: MakeBatcher) -> None:
    async def scenario() -> None:
        clock = Clock()
        model = await make_model(gated=True)
        batcher = await make(
            model,
            max_batch_size=1,
            queue_timeout_ms=60_000,
            **LEVELS,
            priority_queue_policy=policies(l2={**DELAY, "max_queue_size": 2}),
        )
        blocker = await occupy(batcher, model, 120)
        delayed = [await submit_queued(batcher, 1, None), await submit_queued(batcher, 2, 2)]
        clock.skip(15)
        await until(lambda: batcher.delayed_requests == 2)
        with pytest.raises(QueueFull, match=r"full at priority level 2: 2 requests wait"):
            await batcher.submit(request(3), deadline=later())
        high = await submit_queued(batcher, 4, 1)  # level 1 is not full
        assert model.gate is not None
        model.gate.set()
        await finish(blocker, *delayed, high)
        assert ids_in_order(model) == [0, 4, 1, 2]
        await batcher.stop()

    run(scenario())


@BATCHING
def test_the_batchers_timeout_action_delays_every_request_without_levels(
    make: MakeBatcher,
) -> None:
    """``timeout_action`` at the top (Triton's ``default_queue_policy``): without levels the
    whole queue is one level that delays, within the shared ``max_queue_size``."""

    async def scenario() -> None:
        clock = Clock()
        model = await make_model(gated=True)
        batcher = await make(
            model,
            max_batch_size=1,
            max_queue_size=3,
            queue_timeout_ms=10_000,
            timeout_action="delay",
        )
        blocker = await occupy(batcher, model, 120)
        delayed = await submit_queued(batcher, 1, None)
        clock.skip(15)  # past queue_timeout_ms
        await until(lambda: batcher.delayed_requests == 1)
        fresh = [await submit_queued(batcher, 2, None), await submit_queued(batcher, 3, None)]
        assert batcher.full and batcher.queue_depth == 3
        with pytest.raises(QueueFull):
            await batcher.submit(request(4), deadline=later())
        assert model.gate is not None
        model.gate.set()
        results = await finish(blocker, delayed, *fresh)
        check_result(request(1), results[1])
        assert ids_in_order(model) == [0, 2, 3, 1]
        await batcher.stop()

    run(scenario())


@BATCHING
def test_a_levels_own_timeout_action_overrides_the_batchers(make: MakeBatcher) -> None:
    async def scenario() -> None:
        clock = Clock()
        model = await make_model(gated=True)
        batcher = await make(
            model,
            max_batch_size=1,
            queue_timeout_ms=10_000,
            timeout_action="delay",
            **LEVELS,
            priority_queue_policy=policies(l1={"timeout_action": "reject"}),
        )
        blocker = await occupy(batcher, model, 120)
        rejected = await submit_queued(batcher, 1, 1)
        delayed = await submit_queued(batcher, 2, None)  # level 2: the batcher's delay
        clock.skip(15)
        await until(lambda: rejected.done() and batcher.delayed_requests == 1)
        with pytest.raises(QueueTimeout) as info:
            rejected.result()
        assert info.value.message == "waited over 10000 ms in the queue"
        assert not delayed.done() and batcher.queue_depth == 1
        assert model.gate is not None
        model.gate.set()
        results = await finish(blocker, delayed)
        check_result(request(2), results[1])
        assert ids_in_order(model) == [0, 2]
        await batcher.stop()

    run(scenario())


@BATCHING
def test_expected_timeouts_do_not_refuse_a_level_that_delays(make: MakeBatcher) -> None:
    """Waiting past a delaying level's queue timeout is no failure, so
    ``reject_expected_timeouts`` does not refuse its requests; a rejecting level's still are."""

    async def scenario() -> None:
        model = await make_model(gated=True)
        batcher = await make(
            model,
            max_batch_size=1,
            queue_timeout_ms=60_000,
            **LEVELS,
            priority_queue_policy=policies(l1={**DELAY, "queue_timeout_ms": 60_000}),
        )
        blocker = await occupy(batcher, model)
        tasks = [await submit_queued(batcher, rid, 1) for rid in (1, 2)]
        fresh_drain_limit(batcher, 1)
        # Level 2 rejects: 3 rows ahead of it, over the limit (1).
        with pytest.raises(QueueFull) as info:
            await batcher.submit(request(3), deadline=later())
        message = info.value.message
        assert message.endswith("over 80% of queue_timeout_ms (60000)"), message
        tasks.append(await submit_queued(batcher, 4, 1))  # level 1 delays: admitted
        assert not tasks[-1].done() and batcher.queue_depth == 3
        assert not batcher.full  # a request of the delaying level would be admitted
        assert model.gate is not None
        model.gate.set()
        await finish(blocker, *tasks)
        assert ids_in_order(model) == [0, 1, 2, 4]
        await batcher.stop()

    run(scenario())


def test_compacting_the_queue_keeps_delayed_requests_delayed() -> None:
    async def scenario() -> None:
        clock = Clock()
        model = await make_model(gated=True)
        batcher = await make_dynamic(
            model,
            max_batch_size=1,
            max_queue_size=2,
            **LEVELS,
            priority_queue_policy=policies(l2=DELAY),
        )
        blocker = await occupy(batcher, model, 120)
        delayed = await submit_queued(batcher, 1, None)
        clock.skip(15)
        await until(lambda: batcher.delayed_requests == 1)
        for rid in (2, 3, 4):  # callers that went stay in the queue until compacted
            gone = await submit_queued(batcher, rid, None)
            gone.cancel()
            await asyncio.gather(gone, return_exceptions=True)
        assert len(batcher._queue) == 4
        fresh = await submit_queued(batcher, 5, None)
        assert len(batcher._queue) == 2  # compacted before it joined
        assert model.gate is not None
        model.gate.set()
        await finish(blocker, delayed, fresh)
        assert ids_in_order(model) == [0, 5, 1]
        await batcher.stop()

    run(scenario())


def test_the_delaying_queue_serves_each_levels_delayed_requests_after_it() -> None:
    queue = _DelayingLevelQueue(2, 2)

    class It:
        __slots__ = ("level", "name", "rows", "state")

        def __init__(self, name: str, level: int | None) -> None:
            self.name = name
            self.rows = 1
            self.state = 0
            if level is not None:
                self.level = level

    items = {name: It(name, level) for name, level in (("a", 1), ("b", None), ("c", 1))}
    queue.extend(items.values())  # type: ignore[arg-type]
    queue.delay(items["a"])  # type: ignore[arg-type]
    queue.delay(items["b"])  # type: ignore[arg-type]
    queue.append(It("d", None))  # type: ignore[arg-type]
    assert [it.name for it in queue] == ["c", "a", "d", "b"]  # type: ignore[attr-defined]
    assert len(queue) == 4
    # Ahead of a new request: its level's requests not delayed, and everything above.
    assert queue.rows_ahead(1) == 1 and queue.rows_ahead(2) == 3 and queue.rows_ahead(0) == 3
    assert queue.full_at(2, 2) and not queue.full_at(2, 3) and queue.full_at(1, 2)


# ----------------------------------------------------------------------------- config


def build(kind: str, **options: Any) -> Any:
    plugins = plugin_manager()
    model = plugins.build("model_loader", {"kind": "fake"})
    return plugins.build("batcher", {"kind": kind, **options}, model)


def config_error(kind: str, **options: Any) -> str:
    with pytest.raises(ConfigError) as info:
        build(kind, **options)
    text = str(info.value)
    assert "\n" not in text and info.value.status_code < 500
    return text


@pytest.mark.parametrize("kind", ["dynamic", "adaptive"])
def test_queue_policies_are_checked_at_config_time(kind: str) -> None:
    text = config_error(kind, priority_queue_policy={1: {"max_queue_size": 4}})
    assert text.startswith("batching.priority_queue_policy: policies for levels [1] need "), text
    assert "set priority_levels and default_priority_level" in text
    for level in (0, 3, 300):
        text = config_error(kind, **LEVELS, priority_queue_policy={level: {"max_queue_size": 4}})
        assert text.startswith(
            f"batching.priority_queue_policy.{level}: {level} is not a level of "
            "priority_levels (2); key each policy by a level from 1 to 2"
        ), text
    for size in (0, -1):
        text = config_error(kind, **LEVELS, priority_queue_policy={2: {"max_queue_size": size}})
        assert "priority_queue_policy" in text and ".max_queue_size: expected `int` >= 1" in text
    for size in (1.5, "four"):
        text = config_error(kind, **LEVELS, priority_queue_policy={2: {"max_queue_size": size}})
        assert ".max_queue_size: expected int" in text, text
    for ms in (0, -5, 3_600_001):
        text = config_error(kind, **LEVELS, priority_queue_policy={2: {"queue_timeout_ms": ms}})
        assert ".queue_timeout_ms: expected `float`" in text, text
    text = config_error(
        kind, max_queue_size=8, **LEVELS, priority_queue_policy={2: {"max_queue_size": 9}}
    )
    assert text.startswith(
        "batching.priority_queue_policy.2.max_queue_size: 9 is above max_queue_size (8)"
    ), text
    text = config_error(kind, **LEVELS, priority_queue_policy={"2": {"timeout_action": "DELAY"}})
    assert text.startswith(
        "batching.priority_queue_policy.2.timeout_action: 'DELAY' is not one of: reject, delay"
    ), text
    # Keys as YAML gives them (ints) are keys too in the path, not list indexes.
    text = config_error(kind, **LEVELS, priority_queue_policy={2: {"timeout_action": "later"}})
    assert text.startswith(
        "batching.priority_queue_policy.2.timeout_action: 'later' is not one of: reject, delay"
    ), text
    text = config_error(kind, timeout_action="DELAY")
    assert text.startswith("batching.timeout_action: 'DELAY' is not one of: reject, delay"), text
    text = config_error(kind, **LEVELS, priority_queue_policy={2: {"timeout_ms": 5}})
    assert "valid keys here: max_queue_size, queue_timeout_ms, timeout_action" in text, text
    delaying = build(kind, **LEVELS, priority_queue_policy={"2": {"timeout_action": "delay"}})
    assert [p.delay for p in delaying._level_policies] == [False, True]
    assert [p.delay for p in build(kind, timeout_action="delay")._level_policies] == [True]
    text = config_error(kind, **LEVELS, priority_queue_policy={"low": {"max_queue_size": 4}})
    assert text.startswith("batching.priority_queue_policy: invalid key 'low'"), text
    # Keys as Hydra overrides give them (strings) are levels too; an empty map is no policy.
    ok = build(kind, **LEVELS, priority_queue_policy={"2": {"max_queue_size": 8}})
    assert ok._level_policies[1].max_queue_size == 8
    assert build(kind, priority_queue_policy={})._level_policies is None


def test_the_torch_gpu_batcher_checks_them_too() -> None:
    batcher = pytest.importorskip("infercore_torch.batcher")
    config = batcher.TorchGpuBatcher.Config
    with pytest.raises(msgspec.ValidationError, match="3 is not a level of priority_levels"):
        msgspec.convert({**LEVELS, "priority_queue_policy": {3: {}}}, config)
    with pytest.raises(msgspec.ValidationError, match="Invalid enum value 'DELAY'"):
        msgspec.convert(
            {**LEVELS, "priority_queue_policy": {2: {"timeout_action": "DELAY"}}}, config
        )
    with pytest.raises(msgspec.ValidationError, match=r"- at `\$.timeout_action`"):
        msgspec.convert({"timeout_action": "drop"}, config)
    converted = msgspec.convert(
        {
            **LEVELS,
            "timeout_action": "delay",
            "priority_queue_policy": {1: {"queue_timeout_ms": 50, "timeout_action": "reject"}},
        },
        config,
    )
    assert converted.priority_queue_policy[1].queue_timeout_ms == 50
    assert converted.priority_queue_policy[1].timeout_action == "reject"
    assert converted.timeout_action == "delay"
