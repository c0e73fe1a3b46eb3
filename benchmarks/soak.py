"""Soak: a real server under steady load for a long while, memory and latency flat (RELIABILITY.md).

    uv run python benchmarks/soak.py                          # fraud, its core 40 % busy, 10 min
    uv run python benchmarks/soak.py iris --duration 3600     # an hour
    uv run python benchmarks/soak.py fraud --rate 1500 -- models.fraud.drift=null

1. Compiles the environment's bytecode (as ``bench.py`` does) and starts ``infercore serve
   +recipe=RECIPE`` on CPU 0 (a Feast recipe with a fresh registry and online store).
2. Measures its capacity: ``wrk`` at 64 connections for 5 s on CPU 1, after a 2 s warm-up.
3. Offers the rate that keeps the server's core ``--busy`` (0.4) busy, from one 10 s
   calibration window at a quarter of that capacity (open loop costs the server more per
   request than closed loop), or ``--rate`` requests a second, open loop for
   ``--duration`` seconds, in windows of ``--window`` seconds (:mod:`openloop`, in this
   process, on CPU 1; Poisson arrivals, a different seed each window, 64 keep-alive
   connections opened at the start of each window and closed at its end, more when all are
   busy). Requests are ``bench.py``'s for the recipe. After each window it records the
   server's RSS (its processes together), its CPU per request, the window's statuses,
   throughput and latency percentiles (from each request's scheduled send time), and what the
   machine did: the longest pause and the steal time a pause meter on the server's CPU saw
   (:mod:`pauses`), so that a window's errors can be matched with a stop of the machine.
4. The control: this machine's speed moves by 2x within minutes, so a server that got slower
   over the run cannot be told from a machine that did by the run alone. A fresh server of
   the same recipe starts beside the soaked one (warmed up as it was) and the two take
   ``--control-rounds`` windows each, in turns, at the same rate.
5. Checks, and exits 1 when one fails:
   - every request of the run answered 200 (no error, no connection error, no timeout);
   - the server counted exactly the requests answered (``infercore_requests_total``);
   - memory flat: the last window's RSS within 5 % + 4 MiB of the highest RSS of the first
     third of the run (the warm-up: caches, arenas and the first drift windows fill);
   - the soaked server's CPU per request at most 1.15x the fresh one's, and its p99 at most
     twice the fresh one's plus 1 ms (medians of the control windows);
   - the server ready and answering afterwards.
   It also reports the RSS slope over the second half (MiB per hour, least squares) and when
   RSS last rose over 0.5 MiB above every earlier window (a leak keeps doing so; a single
   step, which the slope also reads as growth, did so once, long before the end), the
   median window p99 of the run's first and last thirds, and whether the generator kept its
   schedule (send lag p99 under 50 ms in every window).

Writes ``soak.json``, ``soak.md``, ``soak.png`` (RSS, p50 and p99 against time) and
``pauses.jsonl`` (the meter's lines) to
``benchmarks/results/soak-RECIPE-<stamp>/``. Long runs are opt-in: nothing in CI runs this
script (``tests/unit/test_bench_tools.py`` checks its checks).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench
import openloop
import pauses

#: The last window's RSS may exceed the warm-up's highest by this share, plus ``RSS_SLACK_MB``.
RSS_GROWTH = 0.05
RSS_SLACK_MB = 4.0
#: A window's RSS sets a new high (reported, not checked) when it passes every earlier one by
#: more than this: RSS read from /proc moves by a few hundred KiB between windows.
NEW_HIGH_MB = 0.5
#: The soaked server's median window p99 may be this many times a fresh server's, plus
#: ``P99_SLACK_MS``, and its CPU per request ``CPU_GROWTH`` times (windows taken in turns).
P99_GROWTH = 2.0
P99_SLACK_MS = 1.0
CPU_GROWTH = 1.15
#: The calibration window's rate (share of the closed-loop capacity), and the highest rate
#: ``--busy`` may ask for.
CALIBRATE_SHARE = 0.25
MAX_SHARE = 0.9
#: A window whose send lag p99 passes this did not offer the rate asked.
LAG_LIMIT_MS = 50.0


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def rss_mb(server: bench.Server) -> float:
    """VmRSS of the server and its descendants, summed (MiB)."""
    if server.proc is None:
        return math.nan
    total = 0
    for pid in [server.proc.pid, *bench.descendants(server.proc.pid)]:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def requests_counted(port: int) -> float:
    """Inference requests the server has answered (``infercore_requests_total``, every label)."""
    return bench.metric_sum(port, "infercore_requests_total{")


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of ``(seconds, value)`` points, per hour (NaN under two points)."""
    if len(points) < 2:
        return math.nan
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return math.nan
    return 3600 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def last_high(points: list[tuple[float, float]], by: float = NEW_HIGH_MB) -> float:
    """When ``(seconds, value)`` points last rose more than ``by`` over every earlier point.

    A leak keeps setting new highs until the end; a step that then holds flat set its last one
    long before, though a least-squares slope over the same points reads both as growth. NaN
    for no points; the first point's time when none rose that far.
    """
    if not points:
        return math.nan
    when, high = points[0]
    for t, value in points[1:]:
        if value > high + by:
            when = t
        high = max(high, value)
    return when


def thirds(windows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The first and the last third of the windows (one each at least)."""
    n = max(1, len(windows) // 3)
    return windows[:n], windows[-n:]


def soak_checks(
    windows: list[dict[str, Any]],
    counted: float,
    after: tuple[int, int],
    control: list[dict[str, Any]],
) -> list[Check]:
    """RELIABILITY.md's soak: every request a 200 and counted, memory flat, the soaked server
    as fast as a fresh one (``control``: windows of both, taken in turns), still serving."""
    statuses: dict[str, int] = {}
    for w in windows:
        for status, n in w["status"].items():
            statuses[status] = statuses.get(status, 0) + n
    answered = sum(w["completed"] for w in windows)
    scheduled = sum(w["scheduled"] for w in windows)
    found = [
        Check(
            "every request answered 200",
            set(statuses) == {"200"} and answered == scheduled,
            f"{answered:,} of {scheduled:,} answered; statuses {statuses}"
            + "".join(f"; {failing_window(w)}" for w in windows if set(w["status"]) != {"200"}),
        ),
        Check(
            "the server counted every request",
            counted == answered,
            f"infercore_requests_total grew by {counted:,.0f}; {answered:,} answered",
        ),
    ]
    first, last = thirds(windows)
    warm = max(w["rss_mb"] for w in first)
    end = windows[-1]["rss_mb"]
    bound = warm * (1 + RSS_GROWTH) + RSS_SLACK_MB
    half = windows[len(windows) // 2 :]
    slope = slope_per_hour([(w["t_s"], w["rss_mb"]) for w in half])
    high = last_high([(w["t_s"], w["rss_mb"]) for w in windows])
    found.append(
        Check(
            "memory flat",
            end <= bound,
            f"RSS {warm:.1f} MiB at most in the first third, {end:.1f} MiB at the end "
            f"(bound {bound:.1f}); second half's slope {slope:+.1f} MiB/h; last new high "
            f"(by over {NEW_HIGH_MB:g} MiB) at {high:.0f} s of {windows[-1]['t_s']:.0f}",
        )
    )
    soaked = [w for w in control if w["server"] == "soaked"]
    fresh = [w for w in control if w["server"] == "fresh"]
    if soaked and fresh:
        cpu_s = statistics.median(w["cpu_us_per_request"] for w in soaked)
        cpu_f = statistics.median(w["cpu_us_per_request"] for w in fresh)
        found.append(
            Check(
                "CPU per request as a fresh server's",
                cpu_s <= CPU_GROWTH * cpu_f,
                f"soaked {cpu_s:.0f} µs, fresh {cpu_f:.0f} µs (medians of {len(soaked)} "
                f"windows each, in turns; at most {CPU_GROWTH:g}x)",
            )
        )
        p99_s = statistics.median(w["p99_ms"] for w in soaked)
        p99_f = statistics.median(w["p99_ms"] for w in fresh)
        found.append(
            Check(
                "latency as a fresh server's",
                p99_s <= P99_GROWTH * p99_f + P99_SLACK_MS,
                f"p99 soaked {p99_s:.1f} ms, fresh {p99_f:.1f} ms (p50 "
                f"{statistics.median(w['p50_ms'] for w in soaked):.2f} and "
                f"{statistics.median(w['p50_ms'] for w in fresh):.2f} ms); over the run, the "
                f"median window p99 went {statistics.median(w['p99_ms'] for w in first):.1f} -> "
                f"{statistics.median(w['p99_ms'] for w in last):.1f} ms",
            )
        )
    else:
        found.append(Check("compared with a fresh server", False, "no control windows"))
    ready, answer = after
    found.append(
        Check(
            "ready and answering afterwards",
            ready == 200 and answer == 200,
            f"GET ready {ready}, POST infer {answer}",
        )
    )
    return found


def failing_window(w: dict[str, Any]) -> str:
    """A window with answers other than 200, and what the machine did meanwhile."""
    bad = {s: n for s, n in w["status"].items() if s != "200"}
    said = f"window ending at {w['t_s']:.0f} s: {bad}"
    if "pause_max_ms" in w:
        said += (
            f" (the machine paused up to {w['pause_max_ms']:.0f} ms, {w['pauses']} pauses over "
            f"{pauses.OVER_MS:g} ms, steal {w['steal_ms']:.0f} ms)"
        )
    return said


def window(
    server: bench.Server,
    reqs: list[bytes],
    rate: float,
    seconds: float,
    seed: int,
    t0: float,
    meter: pauses.PauseMeter | None = None,
) -> dict[str, Any]:
    """One open-loop window against ``server``: its figures, RSS and CPU per request after,
    and with a ``meter`` the machine's pauses during it."""
    cpu0 = server.cpu_s()
    start = time.perf_counter()
    run = bench._asyncio_run(
        openloop.run("127.0.0.1", server.port, reqs, rate, seconds, timeout=10.0, seed=seed)
    )
    cpu1 = server.cpu_s()
    r: dict[str, Any] = run.summary()
    machine = {}
    if meter is not None:
        machine = meter.window(start, time.perf_counter()).__dict__
    return {
        "t_s": time.perf_counter() - t0,
        "scheduled": r["scheduled"],
        "completed": r["completed"],
        "status": r["status"],
        "rps": r["achieved_rps"],
        "p50_ms": r["p50_ms"],
        "p99_ms": r["p99_ms"],
        "max_ms": r["max_ms"],
        "send_lag_p99_ms": r["send_lag_p99_ms"],
        "rss_mb": rss_mb(server),
        "cpu_us_per_request": 1e6 * (cpu1 - cpu0) / max(1, r["completed"]),
        **machine,
    }


def show(w: dict[str, Any], label: str = "") -> None:
    print(
        f"  {label}{w['t_s']:6.0f} s  {w['rps']:7,.0f} req/s  p50 {w['p50_ms']:6.2f}  "
        f"p99 {w['p99_ms']:7.2f} ms  RSS {w['rss_mb']:6.1f} MiB  "
        f"{w['cpu_us_per_request']:5.0f} µs/req  {w['status']}",
        flush=True,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("recipe", nargs="?", default="fraud", choices=sorted(bench.RECIPES))
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (600)")
    p.add_argument("--window", type=float, default=10.0, help="seconds per window (10)")
    p.add_argument(
        "--busy", type=float, default=0.4, help="share of the server's core to load (0.4)"
    )
    p.add_argument("--rate", type=float, help="requests per second instead of --busy")
    p.add_argument(
        "--control-rounds", type=int, default=3, help="soaked / fresh windows in turns (3)"
    )
    p.add_argument("--out", type=Path, help="results folder (default: a new one under results/)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for the server, after --")
    args = p.parse_args(argv)
    if args.window <= 0 or args.duration < 3 * args.window:
        p.error("--duration must hold at least three --window's")
    if not 0 < args.busy <= 1:
        p.error(f"--busy {args.busy:g}: a share of one core, over 0 and at most 1")
    if args.rate is not None and args.rate <= 0:
        p.error(f"--rate {args.rate:g}: requests per second, over 0")
    if args.control_rounds < 1:
        p.error("--control-rounds must be at least 1 (the soaked server is judged against them)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    recipe = bench.RECIPES[args.recipe]
    for f in recipe.artifacts:
        if not (bench.REPO / f).is_file():
            raise bench.BenchError(f"{f} is missing; build it with: {recipe.build}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or bench.BENCH / "results" / f"soak-{args.recipe}-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    bytecode = bench.compile_bytecode(sys.executable, *bench.SOURCES)
    print(bytecode, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    port = bench.free_port()
    server = bench.infercore_server(
        "infercore",
        recipe.recipe or args.recipe,
        recipe,
        port,
        out / "server.log",
        args.overrides,
        tmp,
        0,
        Path(sys.executable).parent,
        recipe.ready_s,
    )
    server.cleanup.append(tmp)
    path = f"/v2/models/{recipe.model}/infer"
    bodies = recipe.bodies()
    affinity = os.sched_getaffinity(0)
    windows: list[dict[str, Any]] = []
    control: list[dict[str, Any]] = []
    fresh: bench.Server | None = None
    # On the server's CPU: what stopped the machine, window by window (pauses.py).
    meter = pauses.PauseMeter(out / "pauses.jsonl", 0)
    server.start()
    try:
        print(f"server ready in {server.startup_s:.1f} s", flush=True)
        script = bench.wrk_script(path, bodies, tmp / "load.lua")
        bench.run_wrk(port, path, script, 64, 2, 1)  # warm-up
        closed = bench.run_wrk(port, path, script, 64, 5, 1)
        if closed["errors"]:
            raise bench.BenchError(f"closed loop at 64 connections had errors: {closed}")
        reqs = [
            openloop.encode_post("127.0.0.1", port, path, b, "application/json") for b in bodies
        ]
        if 1 in affinity:
            os.sched_setaffinity(0, {1})
        rate = args.rate
        calibration: dict[str, float] = {}
        if rate is None:
            # Open loop costs more CPU per request than closed loop (smaller groups, a wake-up
            # each): size the rate by the share of the core it takes, measured.
            trial = CALIBRATE_SHARE * closed["rps"]
            t = time.perf_counter()
            cpu = server.cpu_s()
            window(server, reqs, trial, args.window, 1, t)
            busy = (server.cpu_s() - cpu) / (time.perf_counter() - t)
            rate = min(trial * args.busy / max(busy, 1e-3), MAX_SHARE * closed["rps"])
            calibration = {"trial_rps": trial, "trial_busy": busy}
            print(f"calibration: {trial:,.0f} req/s kept the server {busy:.0%} busy", flush=True)
        print(
            f"capacity {closed['rps']:,.0f} req/s (wrk, 64 connections); offering {rate:,.0f} "
            f"req/s open loop for {args.duration:g} s in {args.window:g} s windows",
            flush=True,
        )
        time.sleep(1.0)  # wrk's last requests are still being answered when it exits
        counted0 = requests_counted(port)
        t0 = time.perf_counter()
        for i in range(max(3, round(args.duration / args.window))):
            windows.append(window(server, reqs, rate, args.window, 1000 + i, t0, meter))
            show(windows[-1])
        time.sleep(0.5)
        counted = requests_counted(port) - counted0
        # The control: a fresh server beside the soaked one, the two loaded in turns.
        fresh = bench.infercore_server(
            "fresh",
            recipe.recipe or args.recipe,
            recipe,
            bench.free_port(),
            out / "fresh-server.log",
            args.overrides,
            tmp,
            0,
            Path(sys.executable).parent,
            recipe.ready_s,
        )
        os.sched_setaffinity(0, affinity)
        fresh.start()
        print(f"control: a fresh server, ready in {fresh.startup_s:.1f} s", flush=True)
        bench.run_wrk(fresh.port, path, script, 64, 2, 1)  # the same warm-up
        fresh_reqs = [
            openloop.encode_post("127.0.0.1", fresh.port, path, b, "application/json")
            for b in bodies
        ]
        if 1 in affinity:
            os.sched_setaffinity(0, {1})
        window(fresh, fresh_reqs, rate, args.window, 1, t0)  # its drift windows, caches
        for i in range(args.control_rounds):
            for who, srv, rq in (("soaked", server, reqs), ("fresh", fresh, fresh_reqs)):
                w = window(srv, rq, rate, args.window, 2000 + i, t0, meter)
                w["server"] = who
                control.append(w)
                show(w, f"{who:>6} ")
        os.sched_setaffinity(0, affinity)
        fresh.stop()
        ready = bench.http_status(port, "GET", "/v2/health/ready")[0]
        answer = bench.http_status(port, "POST", path, bodies[0])[0]
        peak = server.peak_rss_mb()
    finally:
        os.sched_setaffinity(0, affinity)
        meter.stop()
        server.stop()
        if fresh is not None:
            fresh.stop()
    found = soak_checks(windows, counted, (ready, answer), control)
    lagging = [i for i, w in enumerate(windows) if w["send_lag_p99_ms"] > LAG_LIMIT_MS]
    report = {
        "recipe": args.recipe,
        "machine": bench.machine(),
        "bytecode": bytecode,
        "overrides": args.overrides,
        "startup_s": server.startup_s,
        "capacity": closed,
        "offered_rps": rate,
        "calibration": calibration,
        "window_s": args.window,
        "windows": windows,
        "control": control,
        "peak_rss_mb": peak,
        "generator_lagging_windows": lagging,
        "checks": [c.__dict__ for c in found],
    }
    (out / "soak.json").write_text(json.dumps(bench._no_nan(report), indent=1))
    figure = plot(windows, out / "soak.png")
    total = sum(w["completed"] for w in windows)
    lines = [
        f"# Soak: {args.recipe} for {windows[-1]['t_s']:.0f} s ({stamp})",
        "",
        f"capacity {closed['rps']:,.0f} req/s (wrk, 64 connections); offered {rate:,.0f} req/s "
        f"open loop (Poisson) in {len(windows)} windows of {args.window:g} s; {total:,} requests; "
        f"start-up {server.startup_s:.1f} s; peak RSS {peak:.0f} MiB"
        + (
            f" (the rate for {args.busy:.0%} of the core: {calibration['trial_rps']:,.0f} req/s "
            f"had kept it {calibration['trial_busy']:.0%} busy)"
            if calibration
            else ""
        ),
        "",
        "| check | result | measured |",
        "|---|---|---|",
        *(f"| {c.name} | {'pass' if c.ok else 'FAIL'} | {c.detail} |" for c in found),
        "",
        "| window end | req/s | p50 ms | p99 ms | max ms | RSS MiB | server CPU µs/request "
        "| machine paused, longest ms | steal ms | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {w['t_s']:.0f} s | {w['rps']:,.0f} | {w['p50_ms']:.2f} | {w['p99_ms']:.1f} | "
            f"{w['max_ms']:.1f} | {w['rss_mb']:.1f} | {w['cpu_us_per_request']:.0f} | "
            f"{w.get('pause_max_ms', math.nan):.0f} | {w.get('steal_ms', math.nan):.0f} | "
            f"{sum(n for s, n in w['status'].items() if s != '200')} |"
            for w in windows
        ),
    ]
    if control:
        lines += [
            "",
            "Control, in turns: the soaked server and a fresh one at the same rate.",
            "",
            "| server | req/s | p50 ms | p99 ms | max ms | server CPU µs/request "
            "| machine paused, longest ms | steal ms |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            *(
                f"| {w['server']} | {w['rps']:,.0f} | {w['p50_ms']:.2f} | {w['p99_ms']:.1f} | "
                f"{w['max_ms']:.1f} | {w['cpu_us_per_request']:.0f} | "
                f"{w.get('pause_max_ms', math.nan):.0f} | {w.get('steal_ms', math.nan):.0f} |"
                for w in control
            ),
        ]
    if lagging:
        lines += [
            "",
            f"The generator lagged (send lag p99 over {LAG_LIMIT_MS:g} ms) in windows "
            f"{lagging}: those offered less than asked.",
        ]
    if figure:
        lines += ["", f"![RSS and latency against time]({figure})"]
    table = "\n".join(lines)
    (out / "soak.md").write_text(table + "\n")
    print(table)
    shown = out.relative_to(bench.REPO) if out.is_relative_to(bench.REPO) else out
    print(f"\nresults: {shown}")
    return 0 if all(c.ok for c in found) else 1


def plot(windows: list[dict[str, Any]], dest: Path) -> str | None:
    """RSS, p50 and p99 against time (PNG); ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    t = [w["t_s"] / 60 for w in windows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot(t, [w["rss_mb"] for w in windows], marker=".")
    top.set_ylabel("RSS (MiB)")
    top.set_ylim(bottom=0)
    bottom.plot(t, [w["p50_ms"] for w in windows], marker=".", label="p50")
    bottom.plot(t, [w["p99_ms"] for w in windows], marker=".", label="p99")
    bottom.set_ylabel("latency (ms)")
    bottom.set_xlabel("minutes")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(dest, dpi=90)
    plt.close(fig)
    return dest.name


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except bench.BenchError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
