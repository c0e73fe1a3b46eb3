"""Shadow copies in groups: one submission per group, outcomes and statistics per copy.

Copies are offered straight to a started runtime's :class:`ShadowRunner` without yielding to
the event loop in between, so that they are all waiting when a worker wakes up: the fake
shadow model's ``batches`` (rows of each call) then shows how they were grouped. Primary
outputs are handed in directly, so agreement is known row by row.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from infercore.runtime import shadow as shadow_module
from infercore.runtime.shadow import ShadowStats, compare_rows
from infercore.testing import metric_value, runtime_from_dict

Array = np.ndarray[Any, Any]


def shadow_runtime(
    *shadows: dict[str, Any], batching: dict[str, Any] | None = None, **routing: Any
) -> Any:
    versions: dict[str, Any] = {"1": {"loader": {"kind": "fake"}}}
    for i, loader in enumerate(shadows, start=2):
        versions[str(i)] = {"loader": {"kind": "fake", **loader}, "stage": "shadow"}
    model = {
        "versions": versions,
        "primary": "1",
        "routing": {"kind": "shadow", "workers": 1, **routing},
    }
    # A batcher that batches: behind ``none`` each copy is a model call of its own.
    batching = batching or {"kind": "dynamic", "max_batch_size": 64}
    return runtime_from_dict({"batching": batching, "models": {"m": model}})


def rows(first: float, n: int = 1, width: int = 4) -> Array:
    x = np.arange(n * width, dtype=np.float32).reshape(n, width)
    x[:, 0] = first
    return x


def primary_of(x: Array, shift: Array | None = None) -> dict[str, Array]:
    """Version 1's answer (``y = sum(x)``), with ``shift`` added to ``y`` row by row."""
    y = x.sum(axis=1, dtype=np.float32)
    return {"y": y if shift is None else y + shift.astype(np.float32), "echo": x}


async def settle(rt: Any, version: str, copies: int) -> dict[str, int]:
    runner = rt.models["m"].shadow
    for _ in range(500):
        stats = runner.stats.get(version)
        outcomes = dict(stats.outcomes) if stats is not None else {}
        if sum(outcomes.values()) >= copies:
            return outcomes
        await asyncio.sleep(0.01)
    raise AssertionError(f"copies never settled: {runner.stats}")


def run(rt: Any, scenario: Callable[[Any], Any]) -> Any:
    async def main() -> Any:
        await rt.start()
        try:
            return await scenario(rt)
        finally:
            await rt.stop()

    return asyncio.run(main())


def offer(rt: Any, versions: tuple[str, ...], x: Array, primary: dict[str, Array]) -> None:
    served = rt.models["m"]
    targets = tuple(served.versions[v] for v in versions)
    served.shadow.offer(targets, {"x": x}, {"x": x}, None, primary)


def test_copies_waiting_together_run_as_one_submission_and_invalid_ones_fail_alone() -> None:
    rt = shadow_runtime({})

    async def scenario(rt: Any) -> tuple[dict[str, int], list[int], ShadowStats]:
        for i in range(10):
            if i in (3, 7):
                bad = rows(float(i), width=3)  # the shadow wants 4 features: a 400 for it
                offer(rt, ("2",), bad, primary_of(bad))
            else:
                offer(rt, ("2",), rows(float(i)), primary_of(rows(float(i))))
        outcomes = await settle(rt, "2", 10)
        return outcomes, rt.models["m"].versions["2"].model.batches, rt.models["m"].shadow.stats

    outcomes, batches, stats = run(rt, scenario)
    assert outcomes == {"ok": 8, "error": 2, "timeout": 0, "dropped": 0}
    assert batches == [8]  # one model call for the eight valid copies
    assert stats["2"].rows == 8 and stats["2"].agreeing_rows == 8


def test_a_group_larger_than_the_batch_size_goes_in_several_submissions() -> None:
    rt = shadow_runtime({}, batching={"kind": "dynamic", "max_batch_size": 4})
    sizes = [1, 1, 3, 1, 1, 1, 1, 2, 1]

    async def scenario(rt: Any) -> tuple[dict[str, int], list[int], ShadowStats]:
        for i, n in enumerate(sizes):
            x = rows(float(i), n)
            offer(rt, ("2",), x, primary_of(x))
        outcomes = await settle(rt, "2", len(sizes))
        return outcomes, rt.models["m"].versions["2"].model.batches, rt.models["m"].shadow.stats

    outcomes, batches, stats = run(rt, scenario)
    assert outcomes["ok"] == len(sizes) and sum(outcomes.values()) == len(sizes)
    # A worker takes at most four copies (each has a row at least): 1, 1, 3, 1 rows go as
    # [1, 1] and [3, 1]; then 1, 1, 1, 2 as [1, 1, 1] and [2]; then the last copy.
    assert batches == [2, 4, 3, 2, 1]
    assert stats["2"].rows == sum(sizes) == stats["2"].agreeing_rows


def test_a_group_that_times_out_counts_a_timeout_per_copy() -> None:
    rt = shadow_runtime({"latency_s": 0.5}, timeout_ms=50)

    async def scenario(rt: Any) -> tuple[dict[str, int], list[int], str]:
        for i in range(5):
            offer(rt, ("2",), rows(float(i)), primary_of(rows(float(i))))
        outcomes = await settle(rt, "2", 5)
        return (
            outcomes,
            rt.models["m"].versions["2"].model.batches,
            rt.metrics.exposition().decode(),
        )

    outcomes, batches, text = run(rt, scenario)
    assert outcomes == {"ok": 0, "error": 0, "timeout": 5, "dropped": 0}
    assert batches == [5]
    assert metric_value(text, "infercore_shadow_requests_total", outcome="timeout") == 5
    # Each copy's time is in the route duration (role shadow); its outcome only in
    # shadow_requests_total: route errors count routed requests, as route requests do.
    duration = "infercore_route_duration_seconds_count"
    assert metric_value(text, duration, version="2", role="shadow") == 5
    assert metric_value(text, "infercore_route_errors_total", version="2") == 0


def test_a_poisoned_copy_fails_alone_when_its_group_fails() -> None:
    rt = shadow_runtime({"fail_on_value": 4.0})

    async def scenario(rt: Any) -> tuple[dict[str, int], list[int], ShadowStats]:
        for i in range(6):
            offer(rt, ("2",), rows(float(i)), primary_of(rows(float(i))))
        outcomes = await settle(rt, "2", 6)
        return outcomes, rt.models["m"].versions["2"].model.batches, rt.models["m"].shadow.stats

    outcomes, batches, stats = run(rt, scenario)
    assert outcomes == {"ok": 5, "error": 1, "timeout": 0, "dropped": 0}
    assert batches == [6, 1, 1, 1, 1, 1, 1]  # the group, then each copy alone
    assert stats["2"].rows == 5


@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_agreement_counts_equal_comparing_each_copy_alone(offset: float) -> None:
    rng = np.random.default_rng(7)
    rt = shadow_runtime({"offset": offset}, atol=0.1, rtol=0.0)
    copies = []
    for i in range(12):
        x = rows(float(i), int(rng.integers(1, 4)))
        # Some rows of the primary disagree with the shadow by more than atol, some less.
        shift = rng.choice([0.0, 0.05, 0.3, -0.7, 0.5, 0.52], size=x.shape[0])
        copies.append((x, primary_of(x, shift)))

    async def scenario(rt: Any) -> tuple[list[int], ShadowStats]:
        for x, primary in copies:
            offer(rt, ("2",), x, primary)
        await settle(rt, "2", len(copies))
        return rt.models["m"].versions["2"].model.batches, rt.models["m"].shadow.stats["2"]

    batches, stats = run(rt, scenario)
    assert batches == [sum(x.shape[0] for x, _ in copies)]
    expected = ShadowStats()
    for x, primary in copies:
        shadow = {"y": x.sum(axis=1, dtype=np.float32) + np.float32(offset), "echo": x}
        n, agree = compare_rows(primary, shadow, (), atol=0.1, rtol=0.0, stats=expected)
        expected.rows += n
        expected.agreeing_rows += agree
    assert 0 < expected.agreeing_rows < expected.rows
    assert (stats.rows, stats.agreeing_rows) == (expected.rows, expected.agreeing_rows)
    assert stats.abs_diff_rows == expected.abs_diff_rows
    for name, total in expected.abs_diff_sum.items():
        assert stats.abs_diff_sum[name] == pytest.approx(total)


def test_copies_for_two_shadows_are_grouped_per_version() -> None:
    rt = shadow_runtime({}, {"offset": 1.0})

    async def scenario(rt: Any) -> tuple[Any, ...]:
        for i in range(7):
            offer(rt, ("2", "3"), rows(float(i)), primary_of(rows(float(i))))
        two = await settle(rt, "2", 7)
        three = await settle(rt, "3", 7)
        versions = rt.models["m"].versions
        stats = rt.models["m"].shadow.stats
        return two, three, versions["2"].model.batches, versions["3"].model.batches, stats

    two, three, batches2, batches3, stats = run(rt, scenario)
    assert two["ok"] == three["ok"] == 7
    assert batches2 == [7] and batches3 == [7]
    assert stats["2"].agreeing_rows == 7 and stats["3"].agreeing_rows == 0


def count_checks(runner: Any) -> list[int]:
    """The rows of every input check the runner makes from now on (it still makes them)."""
    checked: list[int] = []
    real = runner._prepare

    def prepare(sv: Any, inputs: Any, fields: Any, declared: Any) -> Any:
        checked.append(len(inputs["x"]))
        return real(sv, inputs, fields, declared)

    runner._prepare = prepare
    return checked


def test_alike_copies_are_checked_once_as_one_stack() -> None:
    rt = shadow_runtime({})
    runner = rt.models["m"].shadow
    checked = count_checks(runner)

    async def scenario(rt: Any) -> tuple[dict[str, int], list[int], ShadowStats]:
        for i in range(8):
            offer(rt, ("2",), rows(float(i), 1 + i % 2), primary_of(rows(float(i), 1 + i % 2)))
        outcomes = await settle(rt, "2", 8)
        return outcomes, rt.models["m"].versions["2"].model.batches, runner.stats["2"]

    outcomes, batches, stats = run(rt, scenario)
    assert outcomes == {"ok": 8, "error": 0, "timeout": 0, "dropped": 0}
    assert checked == [12]  # one check of the 12-row stack, not one per copy
    assert batches == [12]
    assert (stats.rows, stats.agreeing_rows) == (12, 12)


def test_copies_with_different_tensors_are_checked_one_by_one() -> None:
    rt = shadow_runtime({})
    checked = count_checks(rt.models["m"].shadow)

    async def scenario(rt: Any) -> dict[str, int]:
        offer(rt, ("2",), rows(1.0), primary_of(rows(1.0)))
        wide = rows(2.0, 1, width=5)  # not the model's shape: this copy alone fails its check
        offer(rt, ("2",), wide, primary_of(wide))
        offer(rt, ("2",), rows(3.0), primary_of(rows(3.0)))
        return await settle(rt, "2", 3)

    assert run(rt, scenario) == {"ok": 2, "error": 1, "timeout": 0, "dropped": 0}
    assert checked == [1, 1, 1]


class FixedLoad:
    """Stands in for :class:`LoopLoad`: the loop's busy share is whatever the test sets."""

    busy = 0.0
    created = 0

    def __init__(self) -> None:
        FixedLoad.created += 1

    def share(self) -> float:
        return FixedLoad.busy


def test_copies_wait_while_the_loop_is_busy_and_a_full_queue_drops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(shadow_module, "LoopLoad", FixedLoad)
    monkeypatch.setattr(FixedLoad, "busy", 0.95)  # above the default limit, 0.8
    rt = shadow_runtime({}, queue_size=3)
    model = rt.models["m"].versions["2"].model

    async def scenario(rt: Any) -> tuple[list[int], int, dict[str, int], dict[str, int]]:
        for i in range(5):
            offer(rt, ("2",), rows(float(i)), primary_of(rows(float(i))))
        await asyncio.sleep(10 * shadow_module.HOLD_S)  # ten looks at a busy loop
        held = list(model.batches), rt.models["m"].shadow.depth
        during = dict(rt.models["m"].shadow.stats["2"].outcomes)
        FixedLoad.busy = 0.5
        return *held, during, await settle(rt, "2", 5)

    batches, depth, during, after = run(rt, scenario)
    assert (batches, depth) == ([], 3)  # nothing ran; the queue's three copies still wait
    assert during == {"ok": 0, "error": 0, "timeout": 0, "dropped": 2}
    assert after == {"ok": 3, "error": 0, "timeout": 0, "dropped": 2}
    assert model.batches == [3]  # once the load fell, the three went together


def test_max_loop_busy_1_runs_copies_whatever_the_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shadow_module, "LoopLoad", FixedLoad)
    monkeypatch.setattr(FixedLoad, "busy", 1.0)
    monkeypatch.setattr(FixedLoad, "created", 0)
    rt = shadow_runtime({}, max_loop_busy=1.0)

    async def scenario(rt: Any) -> dict[str, int]:
        for i in range(3):
            offer(rt, ("2",), rows(float(i)), primary_of(rows(float(i))))
        return await settle(rt, "2", 3)

    assert run(rt, scenario) == {"ok": 3, "error": 0, "timeout": 0, "dropped": 0}
    assert FixedLoad.created == 0  # the load is not even measured


@pytest.mark.parametrize(("delay_ms", "expected"), [(300.0, [3]), (0.0, [1, 1, 1])])
def test_copies_offered_apart_wait_for_each_other_up_to_the_batch_delay(
    delay_ms: float, expected: list[int]
) -> None:
    rt = shadow_runtime({}, batch_delay_ms=delay_ms)

    async def scenario(rt: Any) -> tuple[dict[str, int], list[int]]:
        for i in range(3):
            offer(rt, ("2",), rows(float(i)), primary_of(rows(float(i))))
            await asyncio.sleep(0.03)  # the worker is free: without the delay, it runs it now
        outcomes = await settle(rt, "2", 3)
        return outcomes, rt.models["m"].versions["2"].model.batches

    outcomes, batches = run(rt, scenario)
    assert outcomes["ok"] == 3
    assert batches == expected


def test_a_full_batch_of_copies_does_not_wait_for_the_delay() -> None:
    rt = shadow_runtime({}, batching={"kind": "dynamic", "max_batch_size": 4}, batch_delay_ms=1000)

    async def scenario(rt: Any) -> tuple[dict[str, int], list[int]]:
        for i in range(4):
            offer(rt, ("2",), rows(float(i)), primary_of(rows(float(i))))
        runner = rt.models["m"].shadow
        for _ in range(60):  # well under the 1 s delay
            stats = runner.stats.get("2")
            if stats is not None and stats.outcomes["ok"] == 4:
                break
            await asyncio.sleep(0.01)
        outcomes = dict(runner.stats["2"].outcomes) if "2" in runner.stats else {}
        return outcomes, rt.models["m"].versions["2"].model.batches

    outcomes, batches = run(rt, scenario)
    assert outcomes.get("ok") == 4 and batches == [4]


def test_with_two_shadows_a_batch_is_full_by_its_own_versions_copies() -> None:
    """Four copies waiting, two per version, are no full batch of four for either."""
    rt = shadow_runtime(
        {}, {}, batching={"kind": "dynamic", "max_batch_size": 4}, batch_delay_ms=1000
    )

    async def scenario(rt: Any) -> tuple[list[int], list[int]]:
        for i in range(2):
            offer(rt, ("2", "3"), rows(float(i)), primary_of(rows(float(i))))
        await asyncio.sleep(0.1)  # well inside the delay: nothing may have run yet
        early = list(rt.models["m"].versions["2"].model.batches)
        for i in range(2, 4):  # now four copies for each: full batches, at once
            offer(rt, ("2", "3"), rows(float(i)), primary_of(rows(float(i))))
        await settle(rt, "2", 4)
        await settle(rt, "3", 4)
        versions = rt.models["m"].versions
        return early, versions["2"].model.batches + versions["3"].model.batches

    early, batches = run(rt, scenario)
    assert early == []
    assert batches == [4, 4]


def test_the_batch_delay_is_bounded() -> None:
    from infercore.errors import ConfigError

    with pytest.raises(ConfigError, match="batch_delay_ms"):
        shadow_runtime({}, batch_delay_ms=5000)
