"""The event loop's busy share (:mod:`infercore.runtime.loop_load`)."""

from __future__ import annotations

import sys
import threading
import time

import msgspec
import pytest

from infercore.builtins.routers import ShadowRouterConfig
from infercore.runtime import loop_load
from infercore.runtime.loop_load import LoopLoad, thread_busy_reader


class Clocks:
    def __init__(self) -> None:
        self.now = 0.0
        self.busy = 0.0

    def advance(self, seconds: float, busy: float) -> None:
        self.now += seconds
        self.busy += busy


def test_share_is_busy_time_over_each_window_and_kept_between_windows() -> None:
    c = Clocks()
    load = LoopLoad(0.05, busy=lambda: c.busy, clock=lambda: c.now)
    assert load.share() == 0.0  # no window has ended yet
    c.advance(0.05, 0.04)
    assert load.share() == pytest.approx(0.8)
    c.advance(0.03, 0.0)  # not a whole window: the last share stands
    assert load.share() == pytest.approx(0.8)
    c.advance(0.03, 0.003)  # the window ends: 3 ms busy of 60 ms
    assert load.share() == pytest.approx(0.05)
    c.advance(1.0, 1.2)  # run-queue wait counted on top of CPU time: never above 1
    assert load.share() == 1.0


@pytest.mark.skipif(sys.platform != "linux", reason="reads the kernel's per-thread schedstat")
def test_a_spinning_thread_is_busy_and_a_sleeping_one_is_not() -> None:
    # Running and waiting for a CPU both count, so a spinning thread is near 1 however busy
    # the machine is; a sleeping thread accrues almost nothing.
    shares: dict[str, float] = {}

    def measure() -> None:
        load = LoopLoad(0.2)
        end = time.perf_counter() + 0.25
        while time.perf_counter() < end:
            pass
        shares["spin"] = load.share()
        time.sleep(0.25)
        shares["sleep"] = load.share()

    t = threading.Thread(target=measure)
    t.start()
    t.join()
    assert shares["spin"] > 0.5, shares
    assert shares["sleep"] < 0.5, shares


def test_without_schedstat_the_thread_cpu_time_stands_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop_load.threading, "get_native_id", lambda: -1)  # no such task
    assert thread_busy_reader() is time.thread_time


@pytest.mark.parametrize("value", [0, -0.1, 1.5])
def test_max_loop_busy_is_a_share_above_zero_up_to_one(value: float) -> None:
    with pytest.raises(msgspec.ValidationError, match="max_loop_busy"):
        msgspec.convert({"max_loop_busy": value}, ShadowRouterConfig)
