"""Through the app: a model plugin whose ``predict`` sleeps on the event loop is named in a
WARNING (plugin, module, line, ``SleepyModel.predict``), the stall's end is logged, and
``/metrics`` counts it; one that sleeps in a thread is never blamed;
``server.loop_block_warn_ms=0`` turns the watchdog off; apps leave no watchdog thread behind.
A plugin that blocks the loop while it starts is named too: only infercore's own start-up work
(``freeze_heap``, run through ``loopwatch.unwatched``) is excused.

Real server processes (several workers) are in ``tests/e2e/test_workers_loop_stalls.py``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from typing import Any

import msgspec
import pytest

from infercore import hookimpl
from infercore.components import Model, Tensors, TensorSpec
from infercore.testing import metric_value, recipe_client

BLOCK_S = 0.6
LOGGER = "infercore.server.loop"


class SleepyConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    #: Sleep in a worker thread (as a plugin should) instead of on the event loop.
    in_thread: bool = False
    #: Sleep on the event loop in ``start()`` (a model load that blocks).
    block_start: bool = False


class SleepyModel(Model):
    """Sums its rows; a batch whose first value is 1 sleeps first."""

    kind = "sleepy"
    Config = SleepyConfig
    config: SleepyConfig

    async def start(self) -> None:
        if self.config.block_start:
            time.sleep(BLOCK_S)  # a load that blocks the event loop
        self.inputs = [TensorSpec("x", "FP32", (-1, 4))]
        self.outputs = [TensorSpec("y", "FP32", (-1,))]

    async def predict(self, inputs: Tensors) -> Tensors:
        x = inputs["x"]
        if len(x) and x[0, 0] == 1:
            if self.config.in_thread:
                await asyncio.to_thread(self._sleep)
            else:
                time.sleep(BLOCK_S)  # blocks the event loop: every request waits
        return {"y": x.sum(axis=1)}

    def _sleep(self) -> None:
        time.sleep(BLOCK_S)  # in a worker thread: the loop serves on


class SleepyPlugin:
    @hookimpl
    def register_model_loaders(self) -> list[type[Model]]:
        return [SleepyModel]


def _line_of(fn: Any, text: str) -> int:
    """The line of ``fn`` whose source holds ``text``."""
    lines, first = inspect.getsourcelines(fn)
    return first + next(i for i, line in enumerate(lines) if text in line)


SLEEP_LINE = _line_of(SleepyModel.predict, "time.sleep(BLOCK_S)  # blocks")
CULPRIT = f"{__name__}:{SLEEP_LINE} SleepyModel.predict"
SLOW = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
FAST = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [2, 2, 3, 4]}]}


def _recipe(
    warn_ms: int | None, *, in_thread: bool = False, block_start: bool = False
) -> dict[str, Any]:
    server = {} if warn_ms is None else {"loop_block_warn_ms": warn_ms}
    loader = {"kind": "sleepy", "in_thread": in_thread, "block_start": block_start}
    return {"server": server, "models": {"m": {"versions": {"1": {"loader": loader}}}}}


def _watch_threads() -> set[threading.Thread]:
    """The watchdog threads alive (another test's may still be ending: compare sets)."""
    return {t for t in threading.enumerate() if t.name == "infercore-loopwatch"}


def _loop_lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


def test_a_predict_that_sleeps_on_the_loop_is_named_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = _watch_threads()
    with (
        caplog.at_level(logging.INFO, logger=LOGGER),
        recipe_client(_recipe(100), ("sleepy", SleepyPlugin())) as client,
    ):
        assert len(_watch_threads() - before) == 1  # started with the app
        response = client.post("/v2/models/m/infer", json=SLOW)
        assert response.status_code == 200
        # The end is logged by the watchdog's thread once the loop runs again: wait for it.
        deadline = time.monotonic() + 5
        while not any(CULPRIT in r for r in _loop_lines(caplog, logging.INFO)):
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.02)
        metrics = client.get("/metrics").text

    named = [line for line in _loop_lines(caplog, logging.WARNING) if CULPRIT in line]
    assert len(named) == 1, caplog.text
    assert named[0].startswith("event loop blocked for ")
    assert "(plugin 'sleepy')" in named[0]
    assert "await asyncio.to_thread(...)" in named[0]
    ended = [line for line in _loop_lines(caplog, logging.INFO) if CULPRIT in line]
    assert len(ended) == 1 and ended[0].startswith("event loop running again after "), ended
    assert metric_value(metrics, "infercore_event_loop_stalls_total") >= 1
    assert metric_value(metrics, "infercore_event_loop_stall_seconds_count") >= 1
    assert metric_value(metrics, "infercore_event_loop_stall_seconds_sum") >= BLOCK_S / 2
    assert _watch_threads() <= before  # stopped with the app


def test_a_predict_that_sleeps_in_a_thread_is_never_blamed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recipe = _recipe(100, in_thread=True)
    with (
        caplog.at_level(logging.DEBUG, logger=LOGGER),
        recipe_client(recipe, ("sleepy", SleepyPlugin())) as client,
    ):
        assert client.post("/v2/models/m/infer", json=SLOW).status_code == 200
        assert client.post("/v2/models/m/infer", json=FAST).status_code == 200
    assert not [r for r in caplog.records if r.name == LOGGER and "SleepyModel" in r.getMessage()]


def test_zero_turns_the_watchdog_off(caplog: pytest.LogCaptureFixture) -> None:
    before = _watch_threads()
    with (
        caplog.at_level(logging.DEBUG, logger=LOGGER),
        recipe_client(_recipe(0), ("sleepy", SleepyPlugin())) as client,
    ):
        assert _watch_threads() <= before
        assert client.post("/v2/models/m/infer", json=SLOW).status_code == 200
        time.sleep(0.1)
        metrics = client.get("/metrics").text
    assert not [r for r in caplog.records if r.name == LOGGER]
    assert metric_value(metrics, "infercore_event_loop_stalls_total") == 0
    assert "infercore_event_loop_stalls_total 0.0" in metrics  # exposed all the same


def test_apps_leave_no_watchdog_thread_behind() -> None:
    before = _watch_threads()
    for _ in range(5):
        with recipe_client(_recipe(None), ("sleepy", SleepyPlugin())) as client:
            assert client.post("/v2/models/m/infer", json=FAST).status_code == 200
            assert len(_watch_threads() - before) == 1  # the default is on
    assert _watch_threads() <= before


def test_a_plugin_that_blocks_the_loop_while_it_starts_is_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    culprit = f"{__name__}:{_line_of(SleepyModel.start, 'time.sleep')} SleepyModel.start"
    with (
        caplog.at_level(logging.INFO, logger=LOGGER),
        recipe_client(_recipe(100, block_start=True), ("sleepy", SleepyPlugin())) as client,
    ):
        deadline = time.monotonic() + 5
        while not any(culprit in r for r in _loop_lines(caplog, logging.INFO)):
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.02)
        metrics = client.get("/metrics").text
    named = [line for line in _loop_lines(caplog, logging.WARNING) if culprit in line]
    assert len(named) == 1 and "(plugin 'sleepy')" in named[0], caplog.text
    assert metric_value(metrics, "infercore_event_loop_stalls_total") >= 1
