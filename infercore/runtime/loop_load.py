"""How busy the event loop's thread is: the share of wall time it did not sleep.

A thread that is not sleeping in the selector is either running or waiting for a CPU; on
Linux the kernel counts both for each thread (``/proc/self/task/<tid>/schedstat``: time on a
CPU, time waiting on a run queue). Their sum over wall time is the loop's busy share: near 1
when requests keep it working (whatever else shares the core: model threads, other
processes, a CPU quota), near 0 when it waits for work. CPU time alone would miss the waiting
part, so a loop pinned to one core beside the model's threads would look idle when it is not.

Where ``schedstat`` cannot be read (not Linux), the thread's CPU time stands in for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

#: Shares are measured over windows of at least this long.
WINDOW_S = 0.05


def _schedstat_reader(tid: int) -> Callable[[], float] | None:
    path = f"/proc/self/task/{tid}/schedstat"

    def read() -> float:
        with open(path, "rb") as f:
            run_ns, wait_ns = f.read().split()[:2]
        return (int(run_ns) + int(wait_ns)) / 1e9

    try:
        read()
    except (OSError, ValueError):
        return None
    return read


def thread_busy_reader() -> Callable[[], float]:
    """Seconds the calling thread has spent running or waiting for a CPU, cumulative.

    The returned function must be called from the same thread.
    """
    return _schedstat_reader(threading.get_native_id()) or time.thread_time


class LoopLoad:
    """The loop thread's busy share over the last window of at least ``window_s`` seconds.

    Create it on the loop's thread. :meth:`share` starts a new window when the last one is at
    least ``window_s`` old and otherwise returns the last window's share: calling it often
    costs a clock read.
    """

    def __init__(
        self,
        window_s: float = WINDOW_S,
        *,
        busy: Callable[[], float] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._window_s = window_s
        self._busy = busy or thread_busy_reader()
        self._clock = clock
        self._t0 = clock()
        self._b0 = self._busy()
        self._share = 0.0

    def share(self) -> float:
        now = self._clock()
        elapsed = now - self._t0
        if elapsed >= self._window_s:
            busy = self._busy()
            self._share = min(1.0, max(0.0, (busy - self._b0) / elapsed))
            self._t0, self._b0 = now, busy
        return self._share
