"""Interleaved A/B of iris server variants: closed loop (wrk) and open loop, medians of rounds.

The machine this project is measured on is shared and noisy (the same run varies 2x from one
minute to the next), so one run after another is no evidence. Here every variant is started at
once (each ``infercore serve +recipe=iris`` pinned to the server CPU; an idle server costs
nothing), and short load windows alternate between them: for each round, each closed-loop
concurrency, then each open-loop rate, every variant gets one window, in an order rotated from
round to round. The figures are the median and range over rounds.

A variant is ``NAME=CHECKOUT[:OVERRIDE,OVERRIDE...]``: the server runs from that checkout's own
environment (``CHECKOUT/.venv/bin/infercore``, so a second worktree at another commit A/Bs
code), with Hydra overrides. Open loop: ``benchmarks/openloop.py`` at fixed Poisson rates; a
rate passes when every request is answered 200 with p99 under ``--p99-limit-ms``; a variant's
open-loop figure per round is the highest rate it passed.

    uv run python benchmarks/adaptive_ab.py \\
        --variant before=../adaptive-base --variant after=. \\
        --variant 'dyn0=.:batching=dynamic,batching.max_queue_delay_ms=0' \\
        --rounds 5 --window 3 --rates 2000,3000,4000,5000,6000,7000

Writes every window to ``--out`` (JSON). Needs ``wrk`` and ``taskset``; listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench
import openloop

PATH = "/v2/models/iris/infer"


def parse_variant(text: str) -> tuple[str, Path, list[str]]:
    name, _, rest = text.partition("=")
    checkout, _, overrides = rest.partition(":")
    if not name or not checkout:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=CHECKOUT[:OVERRIDE,...]")
    return name, Path(checkout).resolve(), [o for o in overrides.split(",") if o]


def add_variant_options(parser: argparse.ArgumentParser) -> None:
    """The options every interleaved A/B script takes: its variants, CPUs and results file."""
    parser.add_argument(
        "--variant",
        action="append",
        required=True,
        type=parse_variant,
        help="NAME=CHECKOUT[:OVERRIDE,...], once per variant",
    )
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="results file (JSON)")


def summary(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):8.0f} [{min(values):.0f}-{max(values):.0f}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_variant_options(parser)
    parser.add_argument("--concurrency", default="1,8,64")
    parser.add_argument("--window", type=float, default=3.0, help="seconds per wrk window")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rates", default="", help="open-loop rates (req/s), comma-separated")
    parser.add_argument("--openloop-duration", type=float, default=3.0)
    parser.add_argument("--p99-limit-ms", type=float, default=100.0)
    args = parser.parse_args(argv)
    variants: list[tuple[str, Path, list[str]]] = args.variant
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    rates = [float(r) for r in args.rates.split(",") if r]
    os.sched_setaffinity(0, {args.load_cpu})  # the open-loop generator runs in this process
    bodies = bench.iris_bodies(1000)
    reqs = [openloop.encode_post("127.0.0.1", None, PATH, b, "application/json") for b in bodies]
    servers: list[bench.Server] = []
    windows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        script = bench.wrk_script(PATH, bodies, Path(tmp) / "load.lua")
        try:
            for name, checkout, overrides in variants:
                port = bench.free_port()
                argv_ = [str(checkout / ".venv" / "bin" / "infercore"), "serve", "+recipe=iris"]
                argv_ += [f"server.port={port}", "server.host=127.0.0.1", *overrides]
                server = bench.Server(
                    name,
                    [*bench.pin(args.server_cpu), *argv_],
                    port,
                    "/v2/health/ready",
                    60,
                    Path(tmp) / f"{name}.log",
                    cwd=checkout,
                )
                server.start()
                servers.append(server)
                print(f"{name}: 127.0.0.1:{port} {' '.join(overrides)} ({checkout})", flush=True)
            for server in servers:  # warm-up, discarded
                bench.run_wrk(server.port, PATH, script, 64, 2, args.load_cpu)
            for r in range(args.rounds):
                order = servers[r % len(servers) :] + servers[: r % len(servers)]
                for c in concurrencies:
                    for server in order:
                        w = bench.run_wrk(server.port, PATH, script, c, args.window, args.load_cpu)
                        w.update(variant=server.name, round=r, kind="closed")
                        windows.append(w)
                        print(
                            f"r{r} c={c:<3} {server.name:<10} {w['rps']:7.0f} req/s "
                            f"p50 {w['p50_ms']:6.2f} p99 {w['p99_ms']:6.2f} err {w['errors']}",
                            flush=True,
                        )
                for rate in rates:
                    for server in order:
                        res = bench._asyncio_run(
                            openloop.run(
                                "127.0.0.1", server.port, reqs, rate, args.openloop_duration
                            )
                        )
                        ok = res.passes(args.p99_limit_ms)
                        windows.append(
                            {**res.summary(), "variant": server.name, "round": r, "kind": "open"}
                        )
                        windows[-1]["passed"] = ok
                        print(
                            f"r{r} rate={rate:<6.0f} {server.name:<10} p50 {res.p50_ms:7.2f} "
                            f"p99 {res.p99_ms:8.2f} err {res.errors} lag {res.send_lag_p99_ms:.1f}"
                            f" {'pass' if ok else 'FAIL'}",
                            flush=True,
                        )
                        time.sleep(0.5)  # let a backlog drain before the next window
        finally:
            for server in servers:
                server.stop()
    if args.out:
        args.out.write_text(json.dumps(bench._no_nan(windows), indent=1) + "\n")
    print("\nmedian [min-max] over rounds")
    for name, _, _ in variants:
        mine = [w for w in windows if w["variant"] == name]
        parts = []
        for c in concurrencies:
            cell = [w for w in mine if w["kind"] == "closed" and w["concurrency"] == c]
            p99 = statistics.median(w["p99_ms"] for w in cell) if cell else float("nan")
            parts.append(f"c={c}: {summary([w['rps'] for w in cell])} p99 {p99:.1f}")
        if rates:
            best = []
            for r in range(args.rounds):
                passed = [
                    w["rate"]
                    for w in mine
                    if w["kind"] == "open" and w["round"] == r and w["passed"]
                ]
                best.append(max(passed, default=0.0))
            parts.append(f"open max: {summary(best)}")
        print(f"{name:<10} " + " | ".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
