"""CPU per request of a recipe's app, driven in process (no HTTP, no sockets).

Builds the recipe's app exactly as ``infercore serve`` does, runs its lifespan, and sends V2
requests straight into the ASGI callable from ``--concurrency`` coroutines on one uvloop loop.
It prints requests/s and the process's CPU time per request (every thread: the event loop, the
model's threads, Feast reads, drift), which is the figure that decides the throughput of a
server pinned to one core, minus what the HTTP runner adds to every app alike (about 55 µs
with uvicorn + httptools here, benchmarks/README.md). Use it to see what a change to the request
path costs, or under a profiler:

    uv run python benchmarks/inprocess.py iris
    uv run python benchmarks/inprocess.py fraud --requests 40000 -- models.fraud.drift=null
    ~/.local/bin/py-spy record -o fraud.svg -- .venv/bin/python benchmarks/inprocess.py fraud
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))


def _bodies(recipe: str, n: int) -> list[bytes]:
    import bench

    return bench.iris_bodies(n) if recipe == "iris" else bench.fraud_bodies(n)


async def _drive(
    app: Any, path: str, bodies: list[bytes], requests: int, concurrency: int
) -> dict[str, Any]:
    scope_base = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8080),
        "state": {},
    }
    statuses: dict[int, int] = {}
    counter = iter(range(requests))

    async def one(body: bytes) -> None:
        scope = dict(scope_base)
        scope["headers"] = [*scope_base["headers"], (b"content-length", str(len(body)).encode())]
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # a client that stays connected
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses[message["status"]] = statuses.get(message["status"], 0) + 1

        await app(scope, receive, send)

    async def client() -> None:
        for i in counter:
            await one(bodies[i % len(bodies)])

    gc_s = [0.0, 0.0]  # seconds in the collector, start of the current collection

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_s[1] = time.perf_counter()
        else:
            gc_s[0] += time.perf_counter() - gc_s[1]

    gc.callbacks.append(on_gc)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    try:
        await asyncio.gather(*(client() for _ in range(concurrency)))
    finally:
        gc.callbacks.remove(on_gc)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {"statuses": statuses, "cpu_s": cpu, "wall_s": wall, "gc_s": gc_s[0]}


async def _lifespan(
    app: Any, event: str, queue: asyncio.Queue[dict[str, Any]], done: asyncio.Queue[dict[str, Any]]
) -> None:
    await queue.put({"type": f"lifespan.{event}"})
    msg = await done.get()
    if not msg["type"].endswith(".complete"):
        raise SystemExit(f"lifespan {event} failed: {msg}")


async def main(args: argparse.Namespace) -> None:
    from infercore.cli import freeze_heap, set_gc_threshold, set_switch_interval
    from infercore.config.compose import compose
    from infercore.runtime import Runtime
    from infercore.server import create_app

    overrides = [f"+recipe={args.recipe}", *args.overrides]
    if args.recipe == "fraud":
        feast_dir = tempfile.mkdtemp(prefix="infercore-inprocess-")
        overrides += [
            f"++features.registry_path={feast_dir}/registry.db",
            f"++features.sqlite_path={feast_dir}/online_store.db",
        ]
    os.chdir(REPO / "recipes")
    cfg = compose(overrides)
    runtime = Runtime(cfg)
    set_switch_interval(runtime.config.server.gil_switch_interval_ms)  # as `infercore serve`
    set_gc_threshold(runtime.config.server.gc_gen0_threshold)
    app = create_app(runtime, fast_path=not args.no_fast_path)
    if args.floor:  # the bare Litestar endpoint of bench.py, on the same requests
        import floor_app

        app = floor_app.app
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    lifespan = asyncio.ensure_future(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, outbox.put)
    )
    await _lifespan(app, "startup", inbox, outbox)
    freeze_heap()  # as `infercore serve` once its models are ready
    path = f"/v2/models/{args.recipe}/infer"
    bodies = _bodies(args.recipe, 2000)
    await _drive(app, path, bodies, min(args.requests // 5, 5000), args.concurrency)  # warm up
    for _ in range(args.rounds):
        r = await _drive(app, path, bodies, args.requests, args.concurrency)
        n = sum(r["statuses"].values())
        print(
            f"{'floor' if args.floor else args.recipe}: {n} requests, "
            f"{n / r['wall_s']:,.0f} req/s, "
            f"{r['cpu_s'] / n * 1e6:.1f} µs CPU per request "
            f"({r['gc_s'] / n * 1e6:.1f} in the garbage collector), statuses {r['statuses']}",
            flush=True,
        )
    if args.threads:
        _print_thread_cpu()
        _print_model_calls(runtime)
    await _lifespan(app, "shutdown", inbox, outbox)
    await lifespan


def _print_model_calls(runtime: Any) -> None:
    """Model calls, rows per call and seconds per call of every version, from its metrics."""
    found: dict[tuple[str, str], dict[str, float]] = {}
    for family in runtime.metrics.registry.collect():
        if family.name not in ("infercore_batch_size", "infercore_inference_duration_seconds"):
            continue
        for sample in family.samples:
            if sample.name.endswith(("_count", "_sum")):
                key = (sample.labels.get("model", ""), sample.labels.get("version", ""))
                suffix = sample.name.rsplit("_", 1)[1]
                found.setdefault(key, {})[f"{family.name[10:]}_{suffix}"] = sample.value
    for (model, version), v in sorted(found.items()):
        calls = v.get("batch_size_count", 0)
        if calls:
            print(
                f"  {model}@{version}: {calls:,.0f} model calls, "
                f"{v.get('batch_size_sum', 0) / calls:.1f} rows per call, "
                f"{v.get('inference_duration_seconds_sum', 0) / calls * 1e6:.0f} µs per call"
            )


def _print_thread_cpu() -> None:
    """CPU seconds per thread of this process so far (Linux /proc), busiest first."""
    import threading

    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    rows = []
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            comm = (task / "comm").read_text().strip()
        except OSError:
            continue
        cpu = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        rows.append((cpu, names.get(int(task.name), comm)))
    for cpu, name in sorted(rows, reverse=True)[:12]:
        print(f"  {cpu:8.2f} s  {name}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("recipe", choices=["iris", "fraud"])
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", action="store_true", help="print CPU time per thread at the end")
    p.add_argument("--floor", action="store_true", help="drive benchmarks/floor_app.py instead")
    p.add_argument("--no-fast-path", action="store_true", help="route inference through Litestar")
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    args.overrides = argv[cut + 1 :]  # Hydra overrides
    return args


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(parse_args()))
