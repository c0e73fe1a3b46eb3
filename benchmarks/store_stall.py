"""A feature store that stalls for a moment under steady load: what the fraud server answers.

    uv run python benchmarks/store_stall.py \\
        --variant 'count=.:++features.breaker_failing_s=0' --variant 'lasting=.' \\
        --rounds 3 --rate 970 --stall-ms 300

The fraud recipe against a real Redis (``env=prod``): a throw-away ``redis-server`` on
loopback (``tests/e2e/redis_server.py``) that every variant's server reads. Each variant is
one warm server (pinned to ``--server-cpu``; a variant is ``NAME=CHECKOUT[:OVERRIDE,...]``, as
in ``adaptive_ab.py``). In turns, each gets ``--duration`` seconds of open-loop traffic
(``openloop.py``, this process, on ``--load-cpu``) and, ``--stall-at`` seconds in, Redis is
frozen (SIGSTOP) for ``--stall-ms``, then resumed: a stand-in for a fork for a snapshot, a
network blip, a stalled disk. Reads time out (``timeout_ms``) while it is frozen, whatever the
breaker does; what the breaker adds is what follows. Per window: statuses and error reasons,
the server's Feast read failures by reason, and whether the breaker opened.

Writes every window to ``--out`` (JSON). Needs ``redis-server``, ``taskset``; listens on
127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))
import bench
import openloop
from adaptive_ab import add_variant_options
from redis_server import REDIS_SERVER, RedisServer

PATH = "/v2/models/fraud/infer"
FAILURES = "infercore_feature_fetch_failures_total"


def failures_by_reason(port: int) -> dict[str, float]:
    """The server's Feast read failures by reason, and its reads."""
    counts = {
        reason: bench.metric_sum(port, f'{FAILURES}{{model="fraud",reason="{reason}"}}')
        for reason in ("timeout", "error", "breaker_open")
    }
    counts["reads"] = bench.metric_sum(port, "infercore_feature_fetch_seconds_count")
    return counts


def one_window(
    server: bench.Server, redis: RedisServer, reqs: list[bytes], args: argparse.Namespace
) -> dict[str, Any]:
    before = failures_by_reason(server.port)
    opened = server.log_path.read_text(errors="replace").count("circuit breaker open")

    def stall() -> None:
        time.sleep(args.stall_at)
        os.kill(redis.process.pid, signal.SIGSTOP)
        stalled.append(time.perf_counter())
        try:
            time.sleep(args.stall_ms / 1000)
        finally:
            os.kill(redis.process.pid, signal.SIGCONT)
            stalled.append(time.perf_counter())

    stalled: list[float] = []
    staller = threading.Thread(target=stall)
    staller.start()
    try:
        res = bench._asyncio_run(
            openloop.run("127.0.0.1", server.port, reqs, args.rate, args.duration)
        )
    finally:
        staller.join()
    time.sleep(0.2)  # the server logs the breaker's opening after the answers
    after = failures_by_reason(server.port)
    summary = res.summary()
    return {
        "status": summary["status"],
        "reasons": summary["reasons"],
        "p99_ms": summary["p99_ms"],
        "stalled_ms": round((stalled[1] - stalled[0]) * 1000, 1),
        "fetch_failures": {r: after[r] - before[r] for r in after},
        "breaker_opened": server.log_path.read_text(errors="replace").count("circuit breaker open")
        - opened,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_variant_options(parser)
    parser.add_argument("--rounds", type=int, default=3, help="windows per variant (3)")
    parser.add_argument("--rate", type=float, default=970.0, help="requests/s, open loop (970)")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per window (15)")
    parser.add_argument(
        "--stall-at",
        type=float,
        default=8.0,
        help="seconds into a window (8: a server idle while the others had their windows "
        "starts with a cold cache, has read every card by then, and misses again only "
        "when those rows expire, cache_ttl_s (5 s) after)",
    )
    parser.add_argument("--stall-ms", type=float, default=300.0, help="Redis frozen for (300)")
    args = parser.parse_args(argv)
    if REDIS_SERVER is None:
        raise SystemExit("redis-server is not on PATH (apt-get install -y redis-server)")
    variants: list[tuple[str, Path, list[str]]] = args.variant
    os.sched_setaffinity(0, {args.load_cpu})  # the open-loop generator runs in this process
    reqs = [
        openloop.encode_post("127.0.0.1", None, PATH, b, "application/json")
        for b in bench.fraud_bodies(2000)
    ]
    windows: list[dict[str, Any]] = []
    servers: list[bench.Server] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        redis = RedisServer.start(tmp / "redis")
        os.environ["INFERCORE_REDIS_URL"] = redis.url
        try:
            for name, checkout, overrides in variants:
                port = bench.free_port()
                server = bench.infercore_server(
                    name,
                    "fraud",
                    bench.RECIPES["fraud"],
                    port,
                    tmp / f"{name}.log",
                    ["server.host=127.0.0.1", "env=prod", *overrides],
                    tmp,
                    args.server_cpu,
                    checkout / ".venv" / "bin",
                    120,
                )
                server.cwd = checkout
                server.start()  # one at a time: the first fills Redis, the others find it full
                servers.append(server)
                print(f"{name}: 127.0.0.1:{port} {' '.join(overrides)} ({checkout})", flush=True)
            for server in servers:  # warm-up: caches, connections
                bench._asyncio_run(openloop.run("127.0.0.1", server.port, reqs, args.rate, 3))
            for r in range(args.rounds):
                for server in servers[r % len(servers) :] + servers[: r % len(servers)]:
                    w = one_window(server, redis, reqs, args)
                    w.update(variant=server.name, round=r)
                    windows.append(w)
                    print(
                        f"r{r} {server.name:<10} {w['status']} {w['reasons'] or ''} "
                        f"read failures {w['fetch_failures']} breaker opened "
                        f"{w['breaker_opened']}",
                        flush=True,
                    )
        finally:
            for server in servers:
                server.stop()
            redis.stop()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(bench._no_nan(windows), indent=1) + "\n")
    print("\nper variant: errors per window (median, range); windows in which the breaker opened")
    for name, _, _ in variants:
        mine = [w for w in windows if w["variant"] == name]
        errors = sorted(sum(n for s, n in w["status"].items() if s != "200") for w in mine)
        opened = sum(1 for w in mine if w["breaker_opened"])
        print(
            f"{name:<10} {errors[len(errors) // 2]} ({errors[0]}-{errors[-1]}) errors, "
            f"breaker opened in {opened} of {len(mine)} windows"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
