"""The event loop's watchdog (:mod:`infercore.server.loopwatch`): a loop blocked past the
threshold is named once per stall (module, line and function, no paths), its end is logged,
both are counted; ``0`` turns it off; the thread ends with :meth:`LoopWatch.stop`; infercore's
own start-up work run through :func:`unwatched` is no stall, and a block after it still is.

Thresholds are generous against the blocks (100 ms against 600 ms) and no test asserts a
duration beyond "longer than half the block".
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from infercore.config.schema import InfercoreConfig
from infercore.config.validation import convert
from infercore.errors import ConfigError
from infercore.metrics import Metrics
from infercore.server.loopwatch import LoopWatch, blocking_code, unwatched, watch_loop

THRESHOLD_S = 0.1
BLOCK_S = 0.6
HERE = Path(__file__).resolve().parent


def blocking_predict() -> None:
    """Synchronous work on the event loop, as a careless plugin's ``predict`` does it."""
    time.sleep(BLOCK_S)


def blocking_fetch() -> None:
    time.sleep(BLOCK_S)


def _line_of(fn: Callable[..., object], text: str) -> int:
    """The line of ``fn`` whose source holds ``text``."""
    lines, first = inspect.getsourcelines(fn)
    return first + next(i for i, line in enumerate(lines) if text in line)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self, level: int, text: str = "") -> list[str]:
        return [
            r.getMessage() for r in self.records if r.levelno == level and text in r.getMessage()
        ]


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    logger = logging.getLogger("tests.loopwatch")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def _watch(metrics: Metrics, repeat_s: float = 0.0) -> LoopWatch:
    return LoopWatch(
        THRESHOLD_S,
        stalls=metrics.loop_stalls,
        stall_seconds=metrics.loop_stall_seconds,
        repeat_s=repeat_s,
        logger=logging.getLogger("tests.loopwatch"),
    )


def _run(watch: LoopWatch, *blocks: Callable[[], None]) -> None:
    """Each block on the loop in turn, with the loop running free around each."""

    async def scenario() -> None:
        watch.start()
        try:
            await asyncio.sleep(0.05)
            for block in blocks:
                block()
                await asyncio.sleep(0.2)
        finally:
            watch.stop()

    asyncio.run(scenario())


def _sample(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name)
    assert value is not None, name
    return value


def _watch_threads() -> set[threading.Thread]:
    """The watchdog threads alive (another test's may still be ending: compare sets)."""
    return {t for t in threading.enumerate() if t.name == "infercore-loopwatch"}


def test_a_blocked_loop_is_named_once_per_stall_and_its_end_logged(records: Records) -> None:
    metrics = Metrics()
    watch = _watch(metrics)
    before = _watch_threads()
    _run(watch, blocking_predict, blocking_fetch)

    where = f"{__name__}:{_line_of(blocking_predict, 'time.sleep')} blocking_predict"
    named = records.lines(logging.WARNING, where)
    # One line for a stall of ~25 checks: not one per check.
    assert len(named) == 1, records.lines(logging.WARNING)
    assert named[0].startswith("event loop blocked for ")
    assert "so far" in named[0]
    assert "asyncio.to_thread" in named[0]  # the fix
    assert str(HERE) not in named[0]  # module names, never file paths (S6)
    # A second stall (another place) gets its own line.
    assert len(records.lines(logging.WARNING, "blocking_fetch")) == 1
    # Each end is logged once, with the total.
    ended = records.lines(logging.INFO, "event loop running again after")
    assert [line for line in ended if where in line] == ended[:1], ended
    assert len([line for line in ended if "blocking_fetch" in line]) == 1, ended

    stalls = _sample(metrics, "infercore_event_loop_stalls_total")
    assert stalls >= 2
    assert _sample(metrics, "infercore_event_loop_stall_seconds_count") == stalls
    assert _sample(metrics, "infercore_event_loop_stall_seconds_sum") >= 2 * BLOCK_S / 2
    assert _watch_threads() <= before  # stop() joined it


def test_repeats_of_one_place_go_to_debug_and_are_still_counted(records: Records) -> None:
    metrics = Metrics()
    _run(_watch(metrics, repeat_s=60.0), blocking_predict, blocking_predict)
    assert len(records.lines(logging.WARNING, "blocking_predict")) == 1
    assert len(records.lines(logging.DEBUG, "blocking_predict")) >= 2  # found, then ended
    assert _sample(metrics, "infercore_event_loop_stalls_total") >= 2


def test_a_stall_the_thread_could_not_see_is_logged_unnamed_and_counted(
    records: Records,
) -> None:
    # The heartbeat ran late before the thread got to look (blocking code that held the GIL
    # throughout): the lateness it recorded is all there is.
    metrics = Metrics()
    watch = _watch(metrics)
    watch._late.append(0.7)
    watch._take_late()
    lines = records.lines(logging.WARNING)
    assert lines == [
        "event loop was blocked for 0.70 s by code that could not be named (it held the GIL "
        "until it returned, or the process was not scheduled)"
    ]
    assert _sample(metrics, "infercore_event_loop_stalls_total") == 1
    assert _sample(metrics, "infercore_event_loop_stall_seconds_sum") == pytest.approx(0.7)


def test_zero_turns_it_off() -> None:
    async def scenario() -> LoopWatch | None:
        return watch_loop(0)

    before = _watch_threads()
    assert asyncio.run(scenario()) is None
    assert _watch_threads() <= before


def test_stop_ends_the_thread_of_a_loop_that_ran_free() -> None:
    before = _watch_threads()

    async def scenario() -> None:
        watch = watch_loop(100)
        assert watch is not None
        assert len(_watch_threads() - before) == 1
        await asyncio.sleep(0.05)
        watch.stop()

    asyncio.run(scenario())
    assert _watch_threads() <= before


# --- infercore's own start-up work ----------------------------------------------------------


def freeze_like() -> int:
    """Start-up work that holds the loop, as ``freeze_heap`` (a full collection) does."""
    time.sleep(BLOCK_S)
    return 7


def _loop_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "infercore.server.loop"]


def test_start_up_work_run_unwatched_is_no_stall_and_a_block_after_it_is(
    records: Records, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    watch = _watch(metrics)
    results: list[int] = []
    with caplog.at_level(logging.DEBUG, logger="infercore.server.loop"):
        _run(watch, lambda: results.append(unwatched(freeze_like)), blocking_predict)

    assert results == [7]
    # The start-up work is neither named nor counted: the only stall is the block after it.
    assert not [r for r in records.records if "freeze_like" in r.getMessage()], records.records
    assert len(records.lines(logging.WARNING, "blocking_predict")) == 1
    assert len(records.lines(logging.INFO, "blocking_predict")) == 1  # its end
    assert _sample(metrics, "infercore_event_loop_stalls_total") >= 1
    # How long it held the loop is said once, past the threshold at INFO, as no stall.
    said = [r for r in _loop_records(caplog) if "freeze_like" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.INFO], said
    assert said[0].getMessage().startswith("freeze_like held the event loop for ")
    assert "not counted as a stall" in said[0].getMessage()


def test_a_block_just_before_unwatched_work_is_still_counted(records: Records) -> None:
    # The loop was blocked past the threshold before the pause: that stall is no start-up
    # work's, and is counted (pause() records the late heartbeat as stop() does).
    metrics = Metrics()

    def block_then_freeze() -> None:
        blocking_predict()
        unwatched(freeze_like)

    _run(_watch(metrics), block_then_freeze)
    assert not [r for r in records.records if "freeze_like" in r.getMessage()], records.records
    assert _sample(metrics, "infercore_event_loop_stalls_total") >= 1
    assert _sample(metrics, "infercore_event_loop_stall_seconds_count") >= 1


def test_pauses_nest_and_the_heartbeat_starts_afresh_on_resume() -> None:
    async def scenario() -> None:
        watch = LoopWatch(THRESHOLD_S)
        watch.start()
        try:
            watch.pause()
            watch.pause()
            assert watch._handle is None  # no heartbeat to be late while paused
            watch.resume()
            assert watch._handle is None  # one pause still in force
            watch.resume()
            assert watch._handle is not None
            assert watch._due > time.monotonic()  # due from now: the pause was no stall
            with pytest.raises(RuntimeError, match="without pause"):
                watch.resume()
        finally:
            watch.stop()

    asyncio.run(scenario())


def test_the_thread_does_not_name_a_paused_loop() -> None:
    # The thread found the heartbeat late just as the loop paused: the frame it would take
    # is the excused work's, so it counts and names nothing.
    metrics = Metrics()
    watch = _watch(metrics)
    watch._paused = 1
    watch._begin(time.monotonic() - 1.0)
    assert watch._stall is None
    assert _sample(metrics, "infercore_event_loop_stalls_total") == 0


def test_unwatched_runs_synchronous_work_only_and_runs_it_without_a_loop() -> None:
    assert unwatched(lambda a, b=0: a + b, 2, b=3) == 5  # no running loop: just runs

    async def coroutine_work() -> None:
        return None

    with pytest.raises(TypeError, match="synchronous"):
        unwatched(coroutine_work)


def test_a_stopped_watch_is_not_restarted_by_resume() -> None:
    async def scenario() -> None:
        watch = LoopWatch(THRESHOLD_S)
        watch.start()
        watch.pause()
        watch.stop()
        watch.resume()
        assert watch._handle is None

    asyncio.run(scenario())


# --- which frame is named -------------------------------------------------------------------


def _module(name: str, source: str) -> types.ModuleType:
    """A module named ``name`` (a plugin's, infercore's …) made from ``source``."""
    module = types.ModuleType(name)
    exec(compile(source, f"<{name}>", "exec"), module.__dict__)
    return module


def _stack_of(target: Callable[[], None]) -> types.FrameType:
    """The current frame of a thread running ``target``, once it waits in
    ``threading.Condition.wait`` (a queue's ``get``)."""
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while True:
        frame = sys._current_frames().get(thread.ident or 0)
        if frame is not None and frame.f_code.co_qualname == "Condition.wait":
            return frame
        assert time.monotonic() < deadline, "the thread never waited"
        time.sleep(0.01)


_PLUGIN_SOURCE = """
def predict(q):
    return _inner(q)

def _inner(q):
    return q.get()
"""


@pytest.fixture
def waiting() -> Iterator[queue.Queue[None]]:
    q: queue.Queue[None] = queue.Queue()
    try:
        yield q
    finally:
        q.put(None)  # lets the thread end


def test_a_plugin_frame_is_preferred_and_the_innermost_stdlib_frame_shown(
    waiting: queue.Queue[None],
) -> None:
    plugin = _module("acme_models.model", _PLUGIN_SOURCE)

    def application() -> None:  # the application's own code calls the plugin
        plugin.predict(waiting)

    code = blocking_code(_stack_of(application), {"acme_models": "acme"})
    assert code is not None
    assert code.culprit == "acme_models.model:6 _inner"
    assert code.plugin == "acme"
    assert not code.ours
    shown = code.stack.split(" > ")
    assert shown[:2] == ["acme_models.model:3 predict", "acme_models.model:6 _inner"]
    assert shown[-1].startswith("threading:") and shown[-1].endswith(" Condition.wait")


def test_without_plugins_the_innermost_application_frame_is_named(
    waiting: queue.Queue[None],
) -> None:
    def application() -> None:
        waiting.get()

    code = blocking_code(_stack_of(application), {})
    assert code is not None
    line = _line_of(application, "waiting.get()")
    assert code.culprit == (
        f"{__name__}:{line} "
        "test_without_plugins_the_innermost_application_frame_is_named.<locals>.application"
    )
    assert code.plugin is None
    assert not code.ours


def test_infercore_blocking_itself_gets_no_advice_and_outer_frames_are_not_blamed(
    waiting: queue.Queue[None],
) -> None:
    # infercore's own coroutine, run by asyncio: the frames outside the loop's (this test's
    # function that called asyncio.run) are not the callback's, and never named.
    ours = _module("infercore.blocking_demo", "async def serve(q):\n    return q.get()\n")

    def application() -> None:
        asyncio.run(ours.serve(waiting))

    code = blocking_code(_stack_of(application), {})
    assert code is not None
    assert code.culprit == "infercore.blocking_demo:2 serve"
    assert code.ours
    assert "application" not in code.stack


# --- config ---------------------------------------------------------------------------------


def test_the_option_defaults_to_500_and_is_range_checked() -> None:
    from infercore.config.compose import compose

    assert InfercoreConfig().server.loop_block_warn_ms == 500
    assert compose(["+recipe=iris"]).config.server.loop_block_warn_ms == 500
    assert (
        compose(["+recipe=iris", "server.loop_block_warn_ms=0"]).config.server.loop_block_warn_ms
        == 0
    )
    with pytest.raises(ConfigError) as info:
        convert({"server": {"loop_block_warn_ms": -1}}, InfercoreConfig, path="")
    assert str(info.value).startswith("server.loop_block_warn_ms: expected `int` >= 0 (value -1)")
    with pytest.raises(ConfigError, match=r"server\.loop_block_warn_ms: expected `int` <= 600000"):
        convert({"server": {"loop_block_warn_ms": 10**9}}, InfercoreConfig, path="")
    with pytest.raises(ConfigError, match=r"server\.loop_block_warn_ms: expected int, got 'x'"):
        convert({"server": {"loop_block_warn_ms": "x"}}, InfercoreConfig, path="")
