"""The request deadlines of the inference path: one shared timer, ``asyncio.timeout_at``'s rules."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from infercore.server.app import _Deadlines

FOREVER = 3600.0


async def _watched(
    deadlines: _Deadlines, deadline: float, work: Any, log: list[tuple[str, str]], name: str
) -> None:
    """``work`` under a deadline, as the request path runs the runtime; logs how it ended."""
    loop = asyncio.get_running_loop()
    watch = deadlines.watch(loop, deadline)
    try:
        await work
    except BaseException as exc:
        if deadlines.release(watch) and type(exc) is asyncio.CancelledError:
            log.append((name, "timeout"))
            return
        log.append((name, type(exc).__name__))
        raise
    log.append((name, "timeout" if deadlines.release(watch) else "ok"))


def test_only_the_requests_past_their_deadline_are_cancelled() -> None:
    deadlines = _Deadlines()
    log: list[tuple[str, str]] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        tasks = []
        for i in range(40):
            # Every third one outlives its deadline; deadlines in arrival order.
            work = asyncio.sleep(FOREVER if i % 3 == 0 else 0.001)
            tasks.append(
                asyncio.create_task(_watched(deadlines, now + 0.05 + i * 0.001, work, log, str(i)))
            )
        async with asyncio.timeout(5):
            await asyncio.gather(*tasks)

    asyncio.run(scenario())
    ended = dict(log)
    assert len(ended) == 40
    for i in range(40):
        assert ended[str(i)] == ("timeout" if i % 3 == 0 else "ok"), i


def test_a_deadline_earlier_than_the_queued_ones_is_not_delayed_by_them() -> None:
    # A request that waited for its body arrives with a deadline before the last one queued:
    # it must expire at its own deadline, not when the long request ahead of it does.
    deadlines = _Deadlines()
    log: list[tuple[str, str]] = []

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        now = loop.time()
        long = asyncio.create_task(
            _watched(deadlines, now + 30, asyncio.sleep(FOREVER), log, "long")
        )
        await asyncio.sleep(0)
        t0 = loop.time()
        late = asyncio.create_task(
            _watched(deadlines, now + 0.05, asyncio.sleep(FOREVER), log, "late")
        )
        async with asyncio.timeout(5):
            await late
        took = loop.time() - t0
        long.cancel()
        with pytest.raises(asyncio.CancelledError):
            await long
        return took

    took = asyncio.run(scenario())
    assert took < 5
    assert log == [("late", "timeout"), ("long", "CancelledError")]


def test_a_deadline_earlier_than_the_armed_timer_is_not_delayed_by_it() -> None:
    # The timer stays set for a request already released; a request with its own shorter
    # timeout then comes with an earlier deadline and an empty queue: it must expire at its own
    # deadline, not at the one the timer was set for.
    deadlines = _Deadlines()
    log: list[tuple[str, str]] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        await _watched(deadlines, now + 30, asyncio.sleep(0), log, "done")  # arms for +30 s
        short = asyncio.create_task(
            _watched(deadlines, now + 0.05, asyncio.sleep(FOREVER), log, "short")
        )
        async with asyncio.timeout(5):
            await short

    asyncio.run(scenario())
    assert log == [("done", "ok"), ("short", "timeout")]


def test_a_cancellation_from_outside_is_not_a_timeout() -> None:
    deadlines = _Deadlines()
    log: list[tuple[str, str]] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(
            _watched(deadlines, loop.time() + 30, asyncio.sleep(FOREVER), log, "a")
        )
        await asyncio.sleep(0.01)
        task.cancel()  # the client went
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert log == [("a", "CancelledError")]


def test_a_cancellation_pending_beside_the_deadline_stays_a_cancellation() -> None:
    # As asyncio.Timeout: when the task was also cancelled by someone else, the request ends
    # cancelled, not timed out.
    deadlines = _Deadlines()
    log: list[tuple[str, str]] = []

    async def work() -> None:
        try:
            await asyncio.sleep(FOREVER)
        finally:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()  # a second cancellation, pending when the deadline's arrives
            await asyncio.sleep(0)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(_watched(deadlines, loop.time() + 0.02, work(), log, "a"))
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(5):
                await task

    asyncio.run(scenario())
    assert log == [("a", "CancelledError")]


def test_work_that_swallows_the_cancellation_ends_normally_and_uncancelled() -> None:
    deadlines = _Deadlines()
    log: list[tuple[str, str]] = []
    cancelling: list[int] = []

    async def stubborn() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(FOREVER)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()

        async def request() -> None:
            await _watched(deadlines, loop.time() + 0.02, stubborn(), log, "a")
            task = asyncio.current_task()
            assert task is not None
            cancelling.append(task.cancelling())

        async with asyncio.timeout(5):
            await asyncio.create_task(request())

    asyncio.run(scenario())
    assert log == [("a", "timeout")]  # release reports the expiry; the caller saw no error
    assert cancelling == [0]


def test_released_watches_do_not_pile_up_behind_a_long_request() -> None:
    deadlines = _Deadlines()
    log: list[tuple[str, str]] = []

    async def scenario() -> int:
        loop = asyncio.get_running_loop()
        long = asyncio.create_task(
            _watched(deadlines, loop.time() + 30, asyncio.sleep(FOREVER), log, "long")
        )
        await asyncio.sleep(0)
        for i in range(2000):
            await _watched(deadlines, loop.time() + 30, asyncio.sleep(0), log, str(i))
        queued = len(deadlines._queue)
        long.cancel()
        with pytest.raises(asyncio.CancelledError):
            await long
        return queued

    queued = asyncio.run(scenario())
    assert queued <= 2 + 64
    assert len(log) == 2001
    assert len(deadlines._queue) == 0


def test_a_new_event_loop_is_watched_too() -> None:
    # The same app may serve several loops one after the other (a test's clients).
    deadlines = _Deadlines()
    log: list[tuple[str, str]] = []

    async def scenario(name: str) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(5):
            await _watched(deadlines, loop.time() + 0.02, asyncio.sleep(FOREVER), log, name)
            await _watched(deadlines, loop.time() + 5, asyncio.sleep(0), log, name + "-ok")

    asyncio.run(scenario("first"))
    asyncio.run(scenario("second"))
    assert log == [
        ("first", "timeout"),
        ("first-ok", "ok"),
        ("second", "timeout"),
        ("second-ok", "ok"),
    ]


def test_a_watch_outside_a_task_is_refused() -> None:
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(RuntimeError):
            _Deadlines().watch(loop, loop.time() + 1)
    finally:
        loop.close()


def test_a_second_loop_meanwhile_leaves_the_first_loops_deadlines_alone() -> None:
    deadlines = _Deadlines()
    log: list[tuple[str, str]] = []

    def other_loop() -> None:
        async def scenario() -> None:
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(5):
                await _watched(deadlines, loop.time() + 0.02, asyncio.sleep(FOREVER), log, "b")

        asyncio.run(scenario())

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        first = asyncio.create_task(
            _watched(deadlines, loop.time() + 0.3, asyncio.sleep(FOREVER), log, "a")
        )
        await asyncio.sleep(0)
        await asyncio.to_thread(other_loop)
        async with asyncio.timeout(5):
            await first

    asyncio.run(scenario())
    assert log == [("b", "timeout"), ("a", "timeout")]
