"""Cold start under load: a fresh fraud server given open-loop traffic the moment it is ready.

A new replica (a pod scaled out, a rolling deploy) starts with an empty feature cache: every
request misses and needs a Feast read until the cache holds the hot cards. This starts a
fresh ``infercore serve +recipe=fraud`` per run (pinned to the server CPU, with its own
freshly materialized SQLite store, as ``bench.py`` does), optionally evicts that store from
the page cache once the server is ready (``--evict``, the default: a store on a volume the
node has not read yet), and at once sends ``benchmarks/openloop.py`` traffic at a fixed rate
for ``--duration`` seconds. Each run reports the errors by reason, the p99, the Feast read
failures (``infercore_feature_fetch_failures_total``) and how often the circuit breaker
opened (its log line).

Variants run in turns, as in ``adaptive_ab.py`` (``NAME=CHECKOUT[:OVERRIDE,...]``, the
server run from ``CHECKOUT/.venv/bin/infercore``), so two commits can be compared in one run:

    git worktree add ../base <rev>   # with a .venv of its own (or a wrapper script)
    uv run python benchmarks/cold_start.py --variant before=../base --variant after=. \\
        --runs 6 --rates 2500,4000 --out benchmarks/results/cold-start.json

Needs ``taskset``; listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench
import openloop
from adaptive_ab import add_variant_options

PATH = "/v2/models/fraud/infer"


def evict(path: Path) -> None:
    """Drop ``path``'s pages from the page cache (the next reads go to the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def one_run(
    name: str,
    checkout: Path,
    overrides: list[str],
    reqs: list[bytes],
    rate: float,
    args: argparse.Namespace,
    tmp: Path,
    n: int,
) -> dict[str, Any]:
    port = bench.free_port()
    server = bench.infercore_server(
        f"{name}-{n}",
        "fraud",
        bench.RECIPES["fraud"],
        port,
        tmp / f"{name}-{n}.log",
        ["server.host=127.0.0.1", *overrides],
        tmp,
        args.server_cpu,
        checkout / ".venv" / "bin",
        120,
    )
    server.cwd = checkout
    try:
        server.start()
        if args.evict:
            evict(server.cleanup[0] / "online_store.db")  # its fresh Feast folder
        res = bench._asyncio_run(openloop.run("127.0.0.1", port, reqs, rate, args.duration))
        failures = bench.metric_sum(port, "infercore_feature_fetch_failures_total")
    finally:
        server.stop()
    opens = server.log_path.read_text(errors="replace").count("circuit breaker open")
    return {
        **res.summary(),
        "variant": name,
        "fetch_failures": failures,
        "breaker_opens": opens,
        "startup_s": server.startup_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_variant_options(parser)
    parser.add_argument("--runs", type=int, default=6, help="fresh starts per variant and rate")
    parser.add_argument("--rates", default="2500", help="open-loop rates (req/s), comma-separated")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of load per start")
    parser.add_argument(
        "--evict", action=argparse.BooleanOptionalAction, default=True, help="(default: on)"
    )
    args = parser.parse_args(argv)
    variants: list[tuple[str, Path, list[str]]] = args.variant
    rates = [float(r) for r in args.rates.split(",") if r]
    os.sched_setaffinity(0, {args.load_cpu})  # the open-loop generator runs in this process
    reqs = [
        openloop.encode_post("127.0.0.1", None, PATH, b, "application/json")
        for b in bench.fraud_bodies(2000)
    ]
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(args.runs):
            order = variants[n % len(variants) :] + variants[: n % len(variants)]
            for rate in rates:
                for name, checkout, overrides in order:
                    r = one_run(name, checkout, overrides, reqs, rate, args, Path(tmp), n)
                    runs.append(r)
                    print(
                        f"run {n} rate={rate:<6.0f} {name:<10} errors {r['errors']:5d} "
                        f"{r['reasons'] or ''} p99 {r['p99_ms']:7.1f} ms  fetch failures "
                        f"{r['fetch_failures']:.0f}  breaker opened {r['breaker_opens']}",
                        flush=True,
                    )
    if args.out:
        args.out.write_text(json.dumps(bench._no_nan(runs), indent=1) + "\n")
    print("\nper variant and rate: starts with any error / starts; errors in all; p99 median")
    for rate in rates:
        for name, _, _ in variants:
            mine = [r for r in runs if r["variant"] == name and r["rate"] == rate]
            bad = sum(1 for r in mine if r["errors"])
            p99 = sorted(r["p99_ms"] for r in mine)[len(mine) // 2] if mine else float("nan")
            print(
                f"rate={rate:<6.0f} {name:<10} {bad}/{len(mine)} starts with errors, "
                f"{sum(r['errors'] for r in mine)} errors, "
                f"{sum(r['breaker_opens'] for r in mine)} breaker openings, p99 median {p99:.1f} ms"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
