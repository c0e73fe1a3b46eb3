"""A Redis emptied under traffic: does the fraud server's drift monitor see drift that is not there?

    uv run python plugins/feast/benchmarks/flush_drift.py \\
        --variant before=/path/to/old/checkout --variant after=. --rounds 3

QA's case: the fraud recipe on a real Redis (``env=prod``), every request sampled for drift in
500-row windows (``models.fraud.drift.sample_rate=1``, ``window_size=500``, ``cooldown_s=0``
so that every event runs the ``log`` action and is counted), open-loop traffic that does not
drift (the replay part of the held-out days, as ``benchmarks/fraud_drift_loop.py`` sends it
for its calm windows: real transactions of known and new cards, one per V1 request; the
synthetic ``bench.fraud_bodies`` drift against the recipe's reference), and ``FLUSHALL``
``--flush-at`` seconds into a window. Rows served with defaults as if their cards were new,
without the degraded mark, go into the drift windows; the drift README promises a store
outage cannot look like drift.

Each variant is a checkout (its ``infercore`` and ``plugins/feast/src`` put first on the
server's ``PYTHONPATH``; the interpreter is this one's). Variants take turns, one server at a
time on one throw-away ``redis-server`` (a ``FLUSHALL`` would hit every server sharing it). Per
round and variant: a control window without a flush (the detectors' false alarms on this
traffic), then a window with one. Per window: drift events (``infercore_drift_actions_total
{action="log"}``), drift windows tested, answers by status, feature values served as defaults
(``infercore_feature_defaults_total``, of unknown entities: new cards, and a lost store's cards
before it is found), and read failures of reason ``empty``. Between windows the store is
materialized again by the server (its markers back) before the next starts.

Needs ``redis-server``; listens on 127.0.0.1 only; writes ``--out`` (JSON) when given.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests" / "e2e"))
import bench  # noqa: E402
import openloop  # noqa: E402
from fraud_drift_loop import transactions  # noqa: E402
from redis_server import REDIS_SERVER, RedisServer  # noqa: E402

PATH = "/v1/models/fraud:predict"
OVERRIDES = [
    "server.host=127.0.0.1",
    "env=prod",
    "models.fraud.drift.sample_rate=1.0",
    "models.fraud.drift.window_size=500",
    "models.fraud.drift.cooldown_s=0",
]


def counters(port: int) -> dict[str, float]:
    m = bench.metric_sum
    return {
        "drift_events": m(port, 'infercore_drift_actions_total{action="log",model="fraud"'),
        "drift_windows": m(port, "infercore_drift_windows_total{"),
        "defaults": m(port, "infercore_feature_defaults_total{"),
        **{
            f"{reason}_failures": m(
                port, f'infercore_feature_fetch_failures_total{{model="fraud",reason="{reason}"}}'
            )
            for reason in ("empty", "timeout", "error", "breaker_open")
        },
        "store_empty": m(port, "infercore_feature_store_empty{"),
    }


def flush(redis: RedisServer) -> None:
    import redis as redis_client

    client = redis_client.Redis.from_url(redis.url)
    try:
        client.flushall()
    finally:
        client.close()


def one_window(
    server: bench.Server,
    redis: RedisServer,
    reqs: list[bytes],
    args: argparse.Namespace,
    *,
    flushing: bool,
) -> dict[str, Any]:
    before = counters(server.port)
    flushed: list[float] = []

    def flusher() -> None:
        time.sleep(args.flush_at)
        flush(redis)
        flushed.append(time.time())

    thread = threading.Thread(target=flusher) if flushing else None
    if thread is not None:
        thread.start()
    try:
        res = bench._asyncio_run(
            openloop.run("127.0.0.1", server.port, reqs, args.rate, args.duration)
        )
    finally:
        if thread is not None:
            thread.join()
    time.sleep(1.0)  # the last windows are tested
    after = counters(server.port)
    if flushing:  # the server materializes again; wait until its markers are back
        deadline = time.monotonic() + 120
        while counters(server.port)["store_empty"] and time.monotonic() < deadline:
            time.sleep(0.5)
    summary = res.summary()
    return {
        "flush": flushing,
        "status": summary["status"],
        "reasons": summary["reasons"],
        **{k: after[k] - before[k] for k in after if k != "store_empty"},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--variant",
        action="append",
        required=True,
        help="NAME=CHECKOUT (repeatable): the checkout whose infercore and feast plugin serve",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=500.0, help="requests/s (500)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per window (20)")
    parser.add_argument("--flush-at", type=float, default=8.0, help="FLUSHALL at (8 s)")
    parser.add_argument(
        "--unknown",
        type=float,
        default=0.0,
        help="share of requests naming a card the store never had (0): a stream of new "
        "entities, whose reads find none of their keys whether or not the store is whole",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if REDIS_SERVER is None:
        raise SystemExit("redis-server is not on PATH")
    variants = []
    for item in args.variant:
        name, _, checkout = item.partition("=")
        variants.append((name, Path(checkout).resolve()))
    rng = random.Random(8)
    rows = transactions(REPO / "recipes", 0.0, seed=8)
    for row in rows:
        if rng.random() < args.unknown:
            row["card_id"] = f"c_new_{rng.randrange(10**8):08d}"
    reqs = [
        openloop.encode_post(
            "127.0.0.1",
            None,
            PATH,
            json.dumps({"instances": [row]}, separators=(",", ":")).encode(),
            "application/json",
        )
        for row in rows
    ]
    windows: list[dict[str, Any]] = []
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        redis = RedisServer.start(tmp / "redis")
        os.environ["INFERCORE_REDIS_URL"] = redis.url
        try:
            for r in range(args.rounds):
                for name, checkout in variants[r % len(variants) :] + variants[: r % len(variants)]:
                    port = bench.free_port()
                    server = bench.infercore_server(
                        f"{name}-{r}",
                        "fraud",
                        bench.RECIPES["fraud"],
                        port,
                        tmp / f"{name}-{r}.log",
                        OVERRIDES,
                        tmp,
                        None,
                        bin_dir,
                        180,
                    )
                    env = dict(server.env or os.environ)
                    env["PYTHONPATH"] = f"{checkout}:{checkout / 'plugins' / 'feast' / 'src'}"
                    server.env, server.cwd = env, checkout
                    server.start()
                    try:
                        bench._asyncio_run(  # warm-up: caches, connections
                            openloop.run("127.0.0.1", port, reqs, args.rate, 3)
                        )
                        for flushing in (False, True):
                            w = one_window(server, redis, reqs, args, flushing=flushing)
                            w.update(variant=name, round=r)
                            windows.append(w)
                            print(
                                f"r{r} {name:<8} {'flush' if flushing else 'control'}: "
                                f"{w['drift_events']:.0f} drift events in "
                                f"{w['drift_windows']:.0f} detector windows, "
                                f"{w['defaults']:.0f} default values, "
                                f"{w['empty_failures']:.0f} empty failures, {w['status']} "
                                f"{w['reasons'] or ''} (other read failures: timeout "
                                f"{w['timeout_failures']:.0f}, error {w['error_failures']:.0f}, "
                                f"breaker_open {w['breaker_open_failures']:.0f})",
                                flush=True,
                            )
                    finally:
                        server.stop()
        finally:
            redis.stop()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(windows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
