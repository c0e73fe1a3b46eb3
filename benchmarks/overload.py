"""Overload: a real server driven open loop at several times its capacity (RELIABILITY.md, P1).

    uv run python benchmarks/overload.py                       # 5x capacity for 10 s
    uv run python benchmarks/overload.py --factor 3 --duration 20 -- batching.max_queue_size=128
    uv run python benchmarks/overload.py --storm                # the cost of one rejection

1. Builds a model heavy enough for a Python open-loop generator to outrun one server core
   several times over: an MLP in ONNX (``--layers`` tanh layers of ``--width``, one shared
   seeded random weight matrix, so the file stays small), and a recipe that serves it with the
   ``dynamic`` batcher at its defaults (queue 512, queue timeout 1 s), in a temporary folder.
2. Starts ``infercore serve`` on CPU 0. Closed loop (wrk, 64 connections, on CPU 1) measures
   its capacity: 200s per second at saturation.
3. Drives it open loop (:mod:`openloop`, in this process, pinned to CPU 1) at ``--factor``
   times that capacity for ``--duration`` s, Poisson arrivals, sampling the server's RSS every
   100 ms; then checks that it is still ready and answers.

``--storm`` measures instead what one rejection costs the event loop: the same model behind a
queue of one, wrk at 64 connections for 5 s (nearly every answer a 503 ``queue_full``), the
server's event-loop thread CPU time divided by the answers; ``server.reject_before_body`` off
and on, interleaved, ``--rounds`` times.

The checks are RELIABILITY.md's overload scenario: only 200 and 503 ``queue_full``; every 503
carries ``Retry-After``; rejections answered fast (p99 < 5 ms); goodput at least 90 % of
capacity; memory flat (the last second's RSS within 10 % + 8 MiB of the first second's); the
server ready and answering afterwards. The generator's own lag is reported: when its p99 send
lag passes 50 ms the offered rate was not what was asked and the run says so. Results (JSON and
a Markdown table) go to ``benchmarks/results/overload-<stamp>/``; the exit code is 1 when a
check fails.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench
import openloop

MODEL = "heavy"
INPUT = "features"


def build_mlp(path: Path, *, inputs: int = 32, width: int = 1024, layers: int = 96) -> str:
    """Write an MLP (``inputs`` -> ``layers`` x tanh(``width``) -> softmax over 2) as ONNX.

    Every hidden layer multiplies by the same seeded matrix, so the file holds one of them
    whatever ``layers`` is. Returns the file's sha256.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def weights(rows: int, cols: int, name: str) -> onnx.TensorProto:
        w = (rng.standard_normal((rows, cols)) / math.sqrt(rows)).astype(np.float32)
        return numpy_helper.from_array(w, name)

    nodes = [
        helper.make_node("MatMul", [INPUT, "w_in"], ["m0"]),
        helper.make_node("Tanh", ["m0"], ["h0"]),
    ]
    for i in range(1, layers + 1):
        nodes.append(helper.make_node("MatMul", [f"h{i - 1}", "w"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"h{i}"]))
    nodes.append(helper.make_node("MatMul", [f"h{layers}", "w_out"], ["logits"]))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1))
    graph = helper.make_graph(
        nodes,
        "heavy_mlp",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", inputs])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2])],
        [weights(inputs, width, "w_in"), weights(width, width, "w"), weights(width, 2, "w_out")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = model.SerializeToString()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def write_recipe(folder: Path, **mlp: int) -> Path:
    """``folder/overload.yaml`` serving ``folder/heavy/model.onnx`` (built here); the folder
    is then a recipes folder (``INFERCORE_RECIPES_DIR``)."""
    digest = build_mlp(folder / MODEL / "model.onnx", **mlp)
    recipe = folder / "overload.yaml"
    recipe.write_text(
        "# @package _global_\n"
        "# Written by benchmarks/overload.py: an MLP heavy enough to overload one core.\n"
        "defaults:\n"
        "  - override /batching: dynamic\n"
        "description: Overload benchmark (benchmarks/overload.py).\n"
        "model_root: .\n"
        "models:\n"
        f"  {MODEL}:\n"
        '    primary: "1"\n'
        "    versions:\n"
        '      "1":\n'
        f"        loader: {{kind: onnx, path: {MODEL}/model.onnx, sha256: {digest}}}\n"
    )
    return recipe


def bodies(n: int, inputs: int = 32, seed: int = 8) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for row in rng.standard_normal((n, inputs)).astype(np.float32):
        data = [round(float(x), 4) for x in row]
        out.append(
            json.dumps(
                {
                    "inputs": [
                        {"name": INPUT, "shape": [1, inputs], "datatype": "FP32", "data": data}
                    ]
                }
            ).encode()
        )
    return out


def rss_mb(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return math.nan
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


class RssSampler(threading.Thread):
    """``(seconds since start, RSS MiB)`` of one process every ``every_s`` until stopped."""

    def __init__(self, pid: int, every_s: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.every_s = pid, every_s
        self.samples: list[tuple[float, float]] = []
        self._done = threading.Event()

    def run(self) -> None:
        t0 = time.perf_counter()
        while not self._done.wait(self.every_s):
            self.samples.append((time.perf_counter() - t0, rss_mb(self.pid)))

    def stop(self) -> list[tuple[float, float]]:
        self._done.set()
        self.join()
        return self.samples


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def checks(
    capacity: float,
    result: dict[str, Any],
    rss: list[tuple[float, float]],
    after: tuple[int, int],
) -> list[Check]:
    """RELIABILITY.md's overload scenario, judged on one run."""
    status = result["status"]
    rejected = status.get("503", 0)
    others = {k: v for k, v in status.items() if k not in ("200", "503")}
    reasons = result["reasons"]
    # Over the whole run, the queue's drain after the last scheduled send included: the 200s
    # of that drain divided by the schedule alone would overstate goodput.
    elapsed = result["completed"] / result["achieved_rps"] if result["achieved_rps"] else 1.0
    ok_rps = status.get("200", 0) / elapsed
    first = [m for t, m in rss if t <= 1.0]
    last = [m for t, m in rss if t >= rss[-1][0] - 1.0] if rss else []
    rss_first = max(first) if first else math.nan
    rss_last = max(last) if last else math.nan
    return [
        Check(
            "only 200 and 503 queue_full",
            not others and set(reasons) <= {"queue_full"},
            f"statuses {status}, reasons {reasons}",
        ),
        Check("overloaded (some 503 queue_full)", rejected > 0, f"{rejected} rejected"),
        Check(
            "every 503 has Retry-After",
            result["retry_after_missing"] == 0,
            f"{result['retry_after_missing']} without",
        ),
        Check(
            "reject p99 < 5 ms",
            result["rejected_p99_ms"] < 5.0,
            f"p50 {result['rejected_p50_ms']:.2f} ms, p99 {result['rejected_p99_ms']:.2f} ms",
        ),
        Check(
            "goodput >= 90 % of capacity",
            ok_rps >= 0.9 * capacity,
            f"{ok_rps:,.0f} 200s/s against {capacity:,.0f} ({ok_rps / capacity:.0%})",
        ),
        Check(
            "memory flat",
            rss_last <= 1.1 * rss_first + 8,
            f"RSS first second {rss_first:.0f} MiB, last second {rss_last:.0f} MiB",
        ),
        Check(
            "ready and answering afterwards",
            after == (200, 200),
            f"GET ready {after[0]}, POST infer {after[1]}",
        ),
    ]


def thread_cpu_s(pid: int, tid: int) -> float:
    """User + system CPU seconds of one thread of a process."""
    fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_run_s(pid: int) -> dict[int, float]:
    """Seconds each thread of a process has run (``schedstat``: nanoseconds, not ticks)."""
    out: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(task.name)] = int((task / "schedstat").read_text().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return out


def model_rows(port: int) -> float:
    """Rows the server's models have run (``infercore_batch_size_sum`` over every label)."""
    return bench.metric_sum(port, "infercore_batch_size_sum")


def steal_s(cpu: int) -> float:
    """Seconds the hypervisor ran other work while ``cpu`` wanted to run (``/proc/stat``)."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            fields = line.split()
            return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0
    return 0.0


class CoreShare:
    """Where the server's core went over a phase: the event loop's share, the other threads'
    (the model's), the rows the model ran per second of those threads' CPU, and the share of CPU 0
    the hypervisor gave to other guests (steal: this machine is a shared virtual machine)."""

    def __init__(self, pid: int, port: int) -> None:
        self.pid, self.port = pid, port
        self.t0, self.run0, self.rows0 = time.monotonic(), thread_run_s(pid), model_rows(port)
        self.steal0 = steal_s(0)

    def result(self) -> dict[str, float]:
        seconds = time.monotonic() - self.t0
        run = thread_run_s(self.pid)
        rows = model_rows(self.port) - self.rows0
        spent = {tid: s - self.run0.get(tid, 0.0) for tid, s in run.items()}
        loop = spent.pop(self.pid, 0.0)  # the main thread runs the event loop
        others = sum(spent.values())
        return {
            "seconds": seconds,
            "loop_share": loop / seconds,
            "other_threads_share": others / seconds,
            "rows_per_s": rows / seconds,
            "rows_per_other_cpu_s": rows / others if others else math.nan,
            "cpu0_steal_share": (steal_s(0) - self.steal0) / seconds,
        }


def overload_server(recipes: Path, log: Path, overrides: list[str]) -> tuple[int, bench.Server]:
    """``infercore serve +recipe=overload`` on CPU 0 and a free port (not started)."""
    port = bench.free_port()
    argv = [str(bench.REPO / ".venv" / "bin" / "infercore"), "serve", "+recipe=overload"]
    server = bench.Server(
        "infercore",
        [*bench.pin(0), *argv, f"server.port={port}", *overrides],
        port,
        "/v2/health/ready",
        120,
        log,
        env={**os.environ, "INFERCORE_RECIPES_DIR": str(recipes)},
    )
    return port, server


def storm(args: argparse.Namespace, out: Path, recipes: Path, stamp: str) -> int:
    """Event-loop CPU per rejection, ``reject_before_body`` off and on (see the docstring)."""
    path = f"/v2/models/{MODEL}/infer"
    script = bench.wrk_script(path, bodies(500), recipes / "bodies.lua")
    rows: list[dict[str, Any]] = []
    for rnd in range(args.rounds):
        for early in (False, True):
            overrides = [
                "batching.max_queue_size=1",
                f"server.reject_before_body={str(early).lower()}",
                *args.overrides,
            ]
            port, server = overload_server(recipes, out / "server.log", overrides)
            server.start()
            try:
                pid = server.proc.pid  # type: ignore[union-attr]
                bench.run_wrk(port, path, script, 64, 1, 1)  # warm-up
                cpu0 = thread_cpu_s(pid, pid)  # the main thread runs the event loop
                closed = bench.run_wrk(port, path, script, 64, args.capacity_s, 1)
                cpu = thread_cpu_s(pid, pid) - cpu0
            finally:
                server.stop()
            answers = closed["rps"] * args.capacity_s
            row = {
                "round": rnd + 1,
                "reject_before_body": early,
                "answers_per_s": closed["rps"],
                "loop_cpu_s": cpu,
                "loop_us_per_answer": 1e6 * cpu / answers if answers else math.nan,
                "p99_ms": closed["p99_ms"],
                "errors": closed["errors"],
            }
            rows.append(row)
            print(
                f"round {rnd + 1} reject_before_body={str(early).lower():5s} "
                f"{row['answers_per_s']:9,.0f} answers/s  event loop "
                f"{row['loop_us_per_answer']:5.1f} µs each  p99 {row['p99_ms']:.1f} ms",
                flush=True,
            )
    report = {"machine": bench.machine(), "overrides": args.overrides, "storm": rows}
    (out / "storm.json").write_text(json.dumps(bench._no_nan(report), indent=1))
    lines = [
        f"# Rejection storm ({stamp})",
        "",
        f"queue of 1, wrk at 64 connections for {args.capacity_s:g} s per run, server on CPU 0",
        "",
        "| round | reject_before_body | answers/s | event-loop CPU per answer | p99 |",
        "|---|---|---:|---:|---:|",
        *(
            f"| {r['round']} | {str(r['reject_before_body']).lower()} | "
            f"{r['answers_per_s']:,.0f} | {r['loop_us_per_answer']:.1f} µs | "
            f"{r['p99_ms']:.1f} ms |"
            for r in rows
        ),
    ]
    (out / "storm.md").write_text("\n".join(lines) + "\n")
    print(f"\nresults: {out.relative_to(bench.REPO) if out.is_relative_to(bench.REPO) else out}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--factor", type=float, default=5.0, help="offered load / capacity (5)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of overload (10)")
    p.add_argument("--capacity-s", type=float, default=5.0, help="seconds of closed loop (5)")
    p.add_argument("--layers", type=int, default=96, help="hidden layers of the MLP (96)")
    p.add_argument("--width", type=int, default=1024, help="their width (1024)")
    p.add_argument("--storm", action="store_true", help="measure one rejection's cost instead")
    p.add_argument("--rounds", type=int, default=2, help="storm rounds (2)")
    p.add_argument("--out", type=Path, help="results folder (default: a new one under results/)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for the server, after --")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    kind = "storm" if args.storm else "overload"
    out = args.out or bench.BENCH / "results" / f"{kind}-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    # The model (a few MiB, rebuilt in a second) stays out of the results folder.
    recipes = Path(tempfile.mkdtemp(prefix="infercore-overload-"))
    write_recipe(recipes, width=args.width, layers=args.layers)
    if args.storm:
        try:
            return storm(args, out, recipes, stamp)
        finally:
            shutil.rmtree(recipes, ignore_errors=True)
    port, server = overload_server(recipes, out / "server.log", args.overrides)
    server.cleanup = [recipes]
    path = f"/v2/models/{MODEL}/infer"
    sample = bodies(2000)
    server.start()
    try:
        print(f"server ready in {server.startup_s:.1f} s (pid {server.proc.pid}, CPU 0)")  # type: ignore[union-attr]
        script = bench.wrk_script(path, sample, recipes / "bodies.lua")
        bench.run_wrk(port, path, script, 64, 2, 1)  # warm-up
        pid = server.proc.pid  # type: ignore[union-attr]
        share = CoreShare(pid, port)
        closed = bench.run_wrk(port, path, script, 64, args.capacity_s, 1)
        core = {"capacity": share.result()}
        if closed["errors"]:
            raise bench.BenchError(f"closed loop at 64 connections had errors: {closed}")
        capacity = closed["rps"]
        rate = args.factor * capacity
        print(
            f"capacity (wrk, 64 connections, {args.capacity_s:g} s): {capacity:,.0f} req/s, "
            f"p99 {closed['p99_ms']:.1f} ms; offering {rate:,.0f} req/s open loop for "
            f"{args.duration:g} s"
        )
        time.sleep(1.0)
        reqs = [
            openloop.encode_post("127.0.0.1", port, path, b, "application/json") for b in sample
        ]
        sampler = RssSampler(server.proc.pid)  # type: ignore[union-attr]
        affinity = os.sched_getaffinity(0)
        if 1 in affinity:
            os.sched_setaffinity(0, {1})
        sampler.start()
        share = CoreShare(pid, port)
        try:
            run = bench._asyncio_run(
                openloop.run(
                    "127.0.0.1",
                    port,
                    reqs,
                    rate,
                    args.duration,
                    connections=256,
                    max_connections=2048,
                    timeout=10.0,
                )
            )
        finally:
            rss = sampler.stop()
            core["overload"] = share.result()
            os.sched_setaffinity(0, affinity)
        time.sleep(1.0)
        ready = bench.http_status(port, "GET", "/v2/health/ready")[0]
        answer = bench.http_status(port, "POST", path, sample[0])[0]
        result = run.summary()
        found = checks(capacity, result, rss, (ready, answer))
        lagging = result["send_lag_p99_ms"] > 50
    finally:
        server.stop()
    report = {
        "machine": bench.machine(),
        "model": {"layers": args.layers, "width": args.width, "inputs": 32},
        "overrides": args.overrides,
        "capacity": closed,
        "factor": args.factor,
        "offered_rps": rate,
        "open_loop": result,
        "rss_mb": rss,
        "core": core,
        "after": {"ready": ready, "infer": answer},
        "generator_lagging": lagging,
        "checks": [c.__dict__ for c in found],
    }
    (out / "overload.json").write_text(json.dumps(bench._no_nan(report), indent=1))
    lines = [
        f"# Overload at {args.factor:g}x capacity ({stamp})",
        "",
        f"capacity {capacity:,.0f} req/s (wrk, 64 connections); offered {rate:,.0f} req/s "
        f"open loop (Poisson) for {args.duration:g} s; answered {result['completed']:,} of "
        f"{result['scheduled']:,}; 200 p99 {result['ok_p99_ms']:.1f} ms; generator send lag "
        f"p99 {result['send_lag_p99_ms']:.1f} ms",
        "",
        "| check | result | measured |",
        "|---|---|---|",
        *(f"| {c.name} | {'pass' if c.ok else 'FAIL'} | {c.detail} |" for c in found),
        "",
        "Where the server's core went (run time of its threads, `/proc/<pid>/task/*/schedstat`):",
        "",
        "| phase | event loop | other threads (the model) | rows/s | rows per CPU second of those "
        "| CPU 0 stolen by the host |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            f"| {phase} | {c['loop_share']:.0%} | {c['other_threads_share']:.0%} | "
            f"{c['rows_per_s']:,.0f} | {c['rows_per_other_cpu_s']:,.0f} | "
            f"{c['cpu0_steal_share']:.0%} |"
            for phase, c in core.items()
        ),
    ]
    if lagging:
        lines += [
            "",
            "The generator lagged (send lag p99 over 50 ms): the offered rate was lower than "
            "asked; the figures describe what it could send.",
        ]
    table = "\n".join(lines)
    (out / "overload.md").write_text(table + "\n")
    print(table)
    print(f"\nresults: {out.relative_to(bench.REPO) if out.is_relative_to(bench.REPO) else out}")
    return 0 if all(c.ok for c in found) else 1


if __name__ == "__main__":
    raise SystemExit(main())
