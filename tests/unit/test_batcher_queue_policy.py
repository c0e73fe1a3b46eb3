"""Per-level queue policies in the ``dynamic`` and ``adaptive`` batchers
(``priority_queue_policy``, Triton's ``ModelQueuePolicy`` by priority level).

- A level's ``max_queue_size`` bounds the requests waiting at that level, on top of the shared
  ``max_queue_size``: a full level answers 503 ``queue_full`` naming the level, without running
  the model, while the other levels are still admitted; requests that left the level (callers
  gone, timed out) stop counting.
- A level's ``queue_timeout_ms`` replaces the shared one for its requests, shorter or longer,
  and ``reject_expected_timeouts`` judges a request by its level's timeout.
- The options are checked at config time: keys from 1 to ``priority_levels``, levels needed,
  positive sizes and timeouts, a level's bound at most the shared one.

The model is gated (it blocks until the test opens it), so what is queued is exact: no test
here depends on how fast anything runs.
"""

from __future__ import annotations

import asyncio
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
    make_model,
    request,
    run,
    until,
)

from infercore.builtins.batchers import DynamicBatcher, DynamicBatcherConfig, LevelQueuePolicy
from infercore.errors import ConfigError, QueueFull, QueueTimeout
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

    run(scenario())


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
    text = config_error(kind, **LEVELS, priority_queue_policy={2: {"timeout_action": "DELAY"}})
    assert "unknown key" in text and "valid keys here: max_queue_size, queue_timeout_ms" in text
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
    converted = msgspec.convert(
        {**LEVELS, "priority_queue_policy": {1: {"queue_timeout_ms": 50}}}, config
    )
    assert converted.priority_queue_policy[1].queue_timeout_ms == 50
