"""A pause meter: when the machine itself stops running a CPU, and for how long.

    python benchmarks/pauses.py --cpu 0 --out pauses.jsonl     # until stopped

A tiny process, pinned to one CPU, sleeps 1 ms in a loop and writes a line whenever it woke
more than ``--over`` ms (10) later than asked, and once a second the CPU's steal time (the
hypervisor ran something else) when there was any. It takes almost no CPU. A long benchmark
runs it beside the server, on the server's CPU, so that an error that a pause of the whole
machine caused can be told from one the server caused: on this VM both vCPUs stop together
for 35-75 ms a few times in ten minutes, and a 50 ms read timeout can fall inside one.

Times are ``time.monotonic()``, the clock every process shares on Linux (``time.perf_counter``
reads the same one here), so a window measured by another process can be matched against them.
:class:`PauseMeter` starts and stops the process and sums a window's pauses.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

#: A wake-up this much later than asked is a pause (ms). A loaded but running CPU wakes a 1-ms
#: sleeper within a few ms (the scheduler's latency target); 10 ms means something stopped it.
OVER_MS = 10.0
#: USER_HZ: /proc/stat counts in these ticks a second.
TICKS = os.sysconf("SC_CLK_TCK")


def steal_ticks(cpu: int | None) -> int:
    """The steal column of /proc/stat, for one CPU (``cpuN``) or all (``cpu``)."""
    name = "cpu" if cpu is None else f"cpu{cpu}"
    with open("/proc/stat") as f:
        for line in f:
            parts = line.split()
            if parts and parts[0] == name:
                return int(parts[8]) if len(parts) > 8 else 0
    return 0


def meter(out: TextIO, cpu: int | None, over_ms: float) -> None:
    """Sleep 1 ms at a time for ever; write pauses and steal to ``out`` (JSON lines)."""
    over = over_ms / 1000
    prev = last = time.monotonic()
    stolen = steal_ticks(cpu)
    while True:
        time.sleep(0.001)
        now = time.monotonic()
        if now - prev > over + 0.001:
            out.write(json.dumps({"t": round(now, 4), "pause_ms": round((now - prev) * 1000, 1)}))
            out.write("\n")
        prev = now
        if now - last >= 1.0:
            s = steal_ticks(cpu)
            if s > stolen:
                ms = (s - stolen) * 1000 / TICKS
                out.write(json.dumps({"t": round(now, 4), "steal_ms": ms}) + "\n")
            stolen, last = s, now


@dataclass
class Window:
    """A window's pauses: the longest, how many passed ``over_ms``, and the CPU's steal."""

    pause_max_ms: float
    pauses: int
    steal_ms: float


def summarize(lines: list[dict[str, Any]], start: float, end: float) -> Window:
    """The pauses that ended, and the steal counted, in ``[start, end]`` (monotonic seconds).

    A pause that began before ``start`` and ended inside counts: it stopped the window too.
    Steal is read once a second, so a window's steal is that of the seconds ending in it.
    """
    pauses = [r["pause_ms"] for r in lines if "pause_ms" in r and start <= r["t"] <= end]
    steal = sum(r["steal_ms"] for r in lines if "steal_ms" in r and start <= r["t"] <= end)
    return Window(max(pauses, default=0.0), len(pauses), steal)


class PauseMeter:
    """:func:`meter` in its own process, pinned to ``cpu``, writing to ``path``."""

    def __init__(self, path: Path, cpu: int | None, over_ms: float = OVER_MS) -> None:
        self.path = path
        argv = [sys.executable, str(Path(__file__).resolve()), "--out", str(path)]
        argv += ["--over", str(over_ms)]
        if cpu is not None:
            argv = ["taskset", "-c", str(cpu), *argv, "--cpu", str(cpu)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)

    def window(self, start: float, end: float) -> Window:
        """:func:`summarize` of what the meter has written so far."""
        return summarize(read(self.path), start, end)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def read(path: Path) -> list[dict[str, Any]]:
    """The meter's lines (the last one may be half-written: skipped)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    found = []
    for line in text.splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:
            continue
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="JSON lines, appended")
    p.add_argument("--cpu", type=int, help="the CPU whose steal to read (all when not given)")
    p.add_argument("--over", type=float, default=OVER_MS, help=f"a pause, in ms ({OVER_MS:g})")
    args = p.parse_args(argv)
    with args.out.open("a", buffering=1) as out, contextlib.suppress(KeyboardInterrupt):
        meter(out, args.cpu, args.over)
    return 0


if __name__ == "__main__":
    sys.exit(main())
