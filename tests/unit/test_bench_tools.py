"""The pure parts of the benchmark tools: open-loop scheduling and accounting, percentiles, tables.

The open-loop generator runs against a tiny asyncio HTTP server on loopback. Assertions are on
counts, and on latencies only as lower bounds the server's behaviour forces (a request cannot be
answered before the server answers it), never on how fast anything ran.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import adaptive_ab
import bench
import cold_start
import openloop
import pauses
import soak
import store_stall

#: handler(request number, body) -> status, or (status, extra header lines, body); None hangs up.
Handler = Callable[[int, bytes], Awaitable[int | tuple[int, bytes, bytes] | None]]


async def _serve(handler: Handler) -> tuple[asyncio.Server, int]:
    """HTTP/1.1 keep-alive server: handler(request number, body) -> status (None: hang up)."""
    count = 0

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                n, count = count, count + 1
                status = await handler(n, body)
                if status is None:
                    writer.close()
                    return
                extra, payload = b"", b'{"ok":true}'
                if isinstance(status, tuple):
                    status, extra, payload = status
                writer.write(
                    b"HTTP/1.1 %d X\r\n%sContent-Length: %d\r\n\r\n%s"
                    % (status, extra, len(payload), payload)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _reqs(port: int, bodies: list[bytes]) -> list[bytes]:
    return [
        openloop.encode_post("127.0.0.1", port, "/infer", b, "application/json") for b in bodies
    ]


def test_percentile_is_nearest_rank() -> None:
    values = list(range(100, 0, -1))  # 1..100, unsorted
    assert openloop.percentile(values, 50) == 50
    assert openloop.percentile(values, 99) == 99
    assert openloop.percentile(values, 100) == 100
    assert openloop.percentile([7.0], 99) == 7.0
    assert math.isnan(openloop.percentile([], 50))


def test_schedule_uniform_and_poisson() -> None:
    uniform = openloop.schedule(100, 1.0, "uniform")
    assert len(uniform) == 100
    assert uniform[1] - uniform[0] == pytest.approx(0.01)
    poisson = openloop.schedule(1000, 2.0, "poisson", seed=3)
    assert poisson == sorted(poisson)
    assert all(0 < t < 2.0 for t in poisson)
    assert 1700 < len(poisson) < 2300  # 2000 expected; a fixed seed, so this is deterministic
    assert poisson == openloop.schedule(1000, 2.0, "poisson", seed=3)
    with pytest.raises(ValueError):
        openloop.schedule(10, 1.0, "bursty")


def test_counts_statuses_and_errors() -> None:
    async def handler(n: int, body: bytes) -> int:
        return 500 if b"bad" in body else 200

    async def go() -> openloop.OpenLoopResult:
        server, port = await _serve(handler)
        async with server:
            reqs = _reqs(port, [b'{"x":"good"}', b'{"x":"bad"}'])
            return await openloop.run("127.0.0.1", port, reqs, 200, 0.1, arrival="uniform")

    r = asyncio.run(go())
    assert r.scheduled == 20
    assert r.completed == 20
    assert r.status == {"200": 10, "500": 10}
    assert r.errors == 10
    assert not r.passes(1000.0)
    assert len(r.latencies_ms) == 20 and all(x > 0 for x in r.latencies_ms)


def test_error_answers_are_counted_by_reason_and_503s_without_retry_after() -> None:
    full = b'{"error":"queue is full","reason":"queue_full"}'

    async def handler(n: int, body: bytes) -> tuple[int, bytes, bytes]:
        if n % 4 == 1:
            return 503, b"Retry-After: 1\r\n", full
        if n % 4 == 2:
            return 503, b"", full  # no Retry-After
        if n % 4 == 3:
            return 400, b"", b"not json"
        return 200, b"", b'{"outputs":[]}'

    async def go() -> openloop.OpenLoopResult:
        server, port = await _serve(handler)
        async with server:
            reqs = _reqs(port, [b"{}"])
            return await openloop.run(
                "127.0.0.1", port, reqs, 200, 0.04, arrival="uniform", connections=1
            )

    r = asyncio.run(go())
    assert r.status == {"200": 2, "503": 4, "400": 2}
    assert r.reasons == {"queue_full": 4, "?": 2}
    assert r.retry_after_missing == 2
    assert r.rejected_p99_ms > 0 and r.ok_p99_ms > 0


def test_latency_is_measured_from_the_scheduled_time() -> None:
    """One connection, a server that takes 50 ms per request, five requests due within 4 ms:
    the last one cannot be answered before 5 x 50 ms, so its latency from its scheduled time is
    at least ~246 ms although it spends only 50 ms on the wire after being sent."""

    async def handler(n: int, body: bytes) -> int:
        await asyncio.sleep(0.05)
        return 200

    async def go() -> openloop.OpenLoopResult:
        server, port = await _serve(handler)
        async with server:
            return await openloop.run(
                "127.0.0.1",
                port,
                _reqs(port, [b"{}"]),
                1000,
                0.005,
                arrival="uniform",
                connections=1,
                max_connections=1,
            )

    r = asyncio.run(go())
    assert r.scheduled == r.completed == 5
    assert r.waited == 4  # every request after the first found the only connection busy
    assert r.connections_added == 0
    assert r.max_ms >= 5 * 50 - 5
    assert r.send_lag_p99_ms >= 4 * 50 - 5  # the generator reports how late it sent
    assert r.errors == 0


def test_busy_connections_grow_the_pool_and_hang_ups_are_errors() -> None:
    arrived = 0
    release = asyncio.Event()

    async def handler(n: int, body: bytes) -> int | None:
        nonlocal arrived
        arrived += 1
        if arrived == 6:
            release.set()
        await release.wait()  # every answer waits until all six requests are in
        return None if n == 5 else 200

    async def go() -> openloop.OpenLoopResult:
        server, port = await _serve(handler)
        async with server:
            return await openloop.run(
                "127.0.0.1",
                port,
                _reqs(port, [b"{}"]),
                100,
                0.06,
                arrival="uniform",
                connections=2,
            )

    r = asyncio.run(go())
    assert r.scheduled == 6
    assert r.connections_added == 4  # six requests in flight at once on two pre-opened ones
    assert r.waited == 0
    assert r.status == {"200": 5, "connection_error": 1}
    assert r.errors == 1
    # The first request, scheduled first, was held until the sixth was sent 50 ms later.
    assert r.max_ms >= 50 - 5


def test_unanswered_requests_time_out_as_errors() -> None:
    async def handler(n: int, body: bytes) -> int:
        await asyncio.sleep(30)
        return 200

    async def go() -> openloop.OpenLoopResult:
        server, port = await _serve(handler)
        async with server:
            reqs = _reqs(port, [b"{}"])
            return await openloop.run("127.0.0.1", port, reqs, 100, 0.03, timeout=0.2)

    r = asyncio.run(go())
    assert r.completed == 0
    assert r.errors == r.scheduled == r.status["timeout"]


def _results(floor_rps: float, mls_rps: float, infercore_p99: float) -> dict[str, object]:
    def closed(rps: float, p99: float) -> list[dict[str, float]]:
        return [
            {"concurrency": 1, "rps": rps / 4, "p50_ms": 1.0, "p99_ms": 2.0, "errors": 0,
             "gen_cpu_pct": 5.0},
            {"concurrency": 64, "rps": rps, "p50_ms": 10.0, "p99_ms": p99, "errors": 0,
             "gen_cpu_pct": 9.0},
        ]  # fmt: skip

    return {
        "recipe": "iris",
        "date": "20261201",
        "command": "bench.py iris",
        "machine": {"cpu": "x", "cpus": 2, "loadavg": "0"},
        "server_cpu": 0,
        "load_cpu": 1,
        "duration_s": 10,
        "openloop_duration_s": 5,
        "p99_limit_ms": 100.0,
        "targets": [
            {
                "name": "infercore",
                "kind": "infercore",
                "target_vs_floor": 0.8,
                "closed": closed(900, infercore_p99),
                "openloop": {"max_rate": 800},
            },
            {
                "name": "floor",
                "kind": "floor",
                "closed": closed(1000, 5),
                "openloop": {"max_rate": 1000},
            },
            {
                "name": "mlserver",
                "kind": "mlserver",
                "closed": closed(mls_rps, 50),
                "openloop": {"max_rate": None},
            },
        ],
        "notes": [],
    }


def test_ratios_and_verdicts() -> None:
    results = _results(floor_rps=1000, mls_rps=300, infercore_p99=150.0)
    (row,) = bench.ratios(results)
    assert row["vs_floor"] == pytest.approx(0.9)
    assert row["openloop_vs_floor"] == pytest.approx(0.8)
    assert row["vs_mlserver"] == pytest.approx(3.0)
    assert row["openloop_vs_mlserver"] is None  # MLServer passed no rate
    assert row["max_concurrency"] == 64 and row["p99_ms_at_max_concurrency"] == 150.0
    results["ratios"] = [row]
    table = bench.table_md(results)
    line = next(x for x in table.splitlines() if x.startswith("| infercore | 0.90"))
    assert "≥ 0.8 met" in line
    assert "| 3.00 | NOT met |" in line  # below 4x MLServer
    assert line.rstrip().endswith("NOT met |")  # p99 150 ms at c=64
    assert "| floor | 64 | 1,000 | 10.0 | 5.0 | 0 | 9 |" in table


def _window(requests: int, rps: float, p99: float) -> dict[str, float]:
    return {"concurrency": 64, "requests": requests, "rps": rps, "errors": 1, "p50_ms": p99 / 2,
            "p90_ms": p99 * 0.8, "p99_ms": p99, "max_ms": p99 * 2, "gen_cpu_pct": 10.0,
            "gen_req_per_cpu_s": 10 * rps, "server_cpu_s": requests * 100e-6}  # fmt: skip


def test_interleaved_windows_combine_over_all_requests_and_time() -> None:
    # 1,000 requests in 1 s, 3,000 in 2 s, 500 in 1 s: 4,500 over 4 s (the mean of the three
    # rates would say 1,000).
    r = bench.combine_windows(
        [_window(1000, 1000, 5), _window(3000, 1500, 9), _window(500, 500, 7)]
    )
    assert r["rps"] == pytest.approx(1125)
    assert r["requests"] == 4500 and r["errors"] == 3
    assert r["p99_ms"] == 7 and r["p99_max_ms"] == 9  # the median window's, and the worst
    assert r["rounds_rps"] == [1000, 1500, 500]  # round order kept for the per-round ratios
    assert r["gen_req_per_cpu_s"] == pytest.approx(4500 / 0.4)  # 0.1 + 0.2 + 0.1 CPU-s
    assert r["server_cpu_us"] == pytest.approx(100)


def test_ratio_per_round_pairs_the_windows_run_back_to_back() -> None:
    results = _results(floor_rps=1000, mls_rps=300, infercore_p99=50.0)
    mine, floor = results["targets"][0]["closed"][1], results["targets"][1]["closed"][1]
    mine["rounds_rps"], floor["rounds_rps"] = [800, 600, 900], [1000, 1200, 1000]
    (row,) = bench.ratios(results)
    assert row["vs_floor"] == pytest.approx(0.9)  # the best rates, as before
    pr = row["per_round"]
    assert pr["concurrency"] == 64
    assert pr["ratios"] == pytest.approx([0.8, 0.5, 0.9])
    assert (pr["median"], pr["min"], pr["max"]) == pytest.approx((0.8, 0.5, 0.9))
    results["ratios"] = [row]
    assert "| 0.80 (0.50-0.90, c=64) |" in bench.table_md(results)


def test_results_json_has_no_nan() -> None:
    cleaned = bench._no_nan({"a": math.nan, "b": [1.0, math.nan], "c": {"d": math.nan}})
    assert cleaned == {"a": None, "b": [1.0, None], "c": {"d": None}}


def test_each_target_leads_one_round_in_turn() -> None:
    targets = ["infercore", "nodrift", "floor"]
    orders = [bench._turns(targets, n) for n in range(4)]
    assert orders[:3] == [
        ["infercore", "nodrift", "floor"],
        ["nodrift", "floor", "infercore"],
        ["floor", "infercore", "nodrift"],
    ]
    assert orders[3] == orders[0]


# -- the GPU checks' bundle ------------------------------------------------------------------


def _bundle_requirements() -> object:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "gpu"))
    try:
        import bundle_requirements
    finally:
        sys.path.pop(0)
    return bundle_requirements


def test_the_gpu_bundle_holds_every_requirement_the_machine_lacks() -> None:
    """What infercore, infercore-torch and infercore-onnx need is on the machine or bundled."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    br: Any = _bundle_requirements()
    present = br.device_packages()
    assert {"torch", "numpy", "pytest", "onnxruntime"} <= present
    need = br.missing("3.12", present)
    # Our own distributions travel as wheels built from the tree, never as "missing".
    assert not [n for n in need if n.startswith("infercore")]
    assert not set(need) & present
    assert {"litestar", "msgspec", "hydra-core", "omegaconf", "uvicorn", "httptools"} <= set(need)
    # Pinned to the versions the lock file holds (the environment follows it: `uv sync --locked`).
    import tomllib

    lock = tomllib.loads((Path(__file__).resolve().parents[2] / "uv.lock").read_text())
    locked = {br.normalize(p["name"]): p.get("version") for p in lock["package"]}
    assert {name: locked.get(name) for name in need} == need
    # Every direct requirement of each root, for that Python, is present or bundled.
    for root, extra in br.ROOTS:
        for text in md.distribution(root).requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(br.environment("3.12", extra)):
                continue
            name = br.normalize(req.name)
            assert name in present or name in need or name.startswith("infercore"), name


def test_the_gpu_bundle_reads_the_machine_list_and_bundles_what_is_not_on_it(
    tmp_path: Path,
) -> None:
    br: Any = _bundle_requirements()
    listed = tmp_path / "packages.txt"
    listed.write_text("# a comment\nnumpy Torch  prometheus_client\n\nPyYAML  # trailing\n")
    assert br.device_packages(listed) == {"numpy", "torch", "prometheus-client", "pyyaml"}
    assert "numpy" not in br.missing("3.12", {"numpy"})
    assert "numpy" in br.missing("3.12", set())  # infercore's own requirement, when absent


# ------------------------------------------------------------ soak.py's checks


def _windows(
    n: int = 9,
    rss: Callable[[int], float] = lambda i: 300.0,
    p99: Callable[[int], float] = lambda i: 10.0,
    status: dict[str, int] | None = None,
) -> list[dict[str, Any]]:
    return [
        {
            "t_s": 10.0 * (i + 1),
            "scheduled": 1000,
            "completed": 1000,
            "status": dict(status or {"200": 1000}),
            "p50_ms": 1.0,
            "p99_ms": p99(i),
            "rss_mb": rss(i),
        }
        for i in range(n)
    ]


def _control(soaked_cpu: float = 250.0, soaked_p99: float = 10.0) -> list[dict[str, Any]]:
    out = []
    for _ in range(3):
        out.append({"server": "soaked", "cpu_us_per_request": soaked_cpu, "p99_ms": soaked_p99})
        out.append({"server": "fresh", "cpu_us_per_request": 250.0, "p99_ms": 10.0})
    for w in out:
        w["p50_ms"] = 1.0
    return out


def _failed(found: list[soak.Check]) -> set[str]:
    return {c.name for c in found if not c.ok}


def test_soak_passes_a_flat_run_that_warmed_up() -> None:
    # RSS climbs during the first third (caches, arenas), then holds.
    windows = _windows(rss=lambda i: [280.0, 300.0, 310.0][i] if i < 3 else 312.0)
    assert _failed(soak.soak_checks(windows, 9000, (200, 200), _control())) == set()


def test_soak_fails_memory_that_keeps_growing() -> None:
    windows = _windows(rss=lambda i: 300.0 + 5.0 * i)  # 5 MiB a window: 340 against 315 + 4
    found = soak.soak_checks(windows, 9000, (200, 200), _control())
    assert _failed(found) == {"memory flat"}
    detail = next(c.detail for c in found if c.name == "memory flat")
    assert "slope +1800.0 MiB/h" in detail and "last new high (by over 0.5 MiB) at 90 s" in detail


def test_soak_fails_a_server_slower_than_a_fresh_one() -> None:
    windows = _windows(p99=lambda i: 10.0 if i < 3 else 40.0)  # the machine, or the server?
    ok = soak.soak_checks(windows, 9000, (200, 200), _control())
    assert _failed(ok) == set()  # a fresh server beside it was as slow: the machine
    assert "10.0 -> 40.0 ms" in next(c.detail for c in ok if c.name.startswith("latency"))
    slow = soak.soak_checks(windows, 9000, (200, 200), _control(soaked_p99=21.5))
    assert _failed(slow) == {"latency as a fresh server's"}  # 21.5 against 2 x 10 + 1
    assert _failed(soak.soak_checks(windows, 9000, (200, 200), _control(soaked_p99=20.5))) == set()
    costly = soak.soak_checks(windows, 9000, (200, 200), _control(soaked_cpu=300.0))
    assert _failed(costly) == {"CPU per request as a fresh server's"}  # 300 against 1.15 x 250
    missing = soak.soak_checks(windows, 9000, (200, 200), [])
    assert _failed(missing) == {"compared with a fresh server"}


def test_soak_fails_errors_unanswered_requests_and_miscounts() -> None:
    control = _control()
    errors = _windows(status={"200": 999, "503": 1})
    assert _failed(soak.soak_checks(errors, 9000, (200, 200), control)) == {
        "every request answered 200"
    }
    lost = _windows()
    lost[4]["completed"] = 999  # one timed out: its status is "timeout", not 200
    lost[4]["status"] = {"200": 999, "timeout": 1}
    assert "every request answered 200" in _failed(
        soak.soak_checks(lost, 8999, (200, 200), control)
    )
    assert _failed(soak.soak_checks(_windows(), 8990, (200, 200), control)) == {
        "the server counted every request"
    }
    assert _failed(soak.soak_checks(_windows(), 9000, (503, 200), control)) == {
        "ready and answering afterwards"
    }


def test_soak_names_the_failing_windows_and_the_machine_s_pauses_in_them() -> None:
    windows = _windows()
    windows[3]["status"] = {"200": 997, "503": 3}
    windows[3].update(pause_max_ms=65.2, pauses=2, steal_ms=340.0)
    windows[5]["status"] = {"200": 999, "timeout": 1}  # no meter in this one
    detail = next(
        c.detail
        for c in soak.soak_checks(windows, 9000, (200, 200), _control())
        if c.name == "every request answered 200"
    )
    assert "window ending at 40 s: {'503': 3} (the machine paused up to 65 ms, 2 pauses" in detail
    assert "steal 340 ms" in detail
    assert detail.endswith("window ending at 60 s: {'timeout': 1}")
    assert "10 s" not in detail  # windows that answered 200 only are not listed


# ------------------------------------------------------------ pauses.py


def test_pause_windows_count_what_ended_inside_them() -> None:
    lines = [
        {"t": 10.0, "pause_ms": 12.0},
        {"t": 10.5, "steal_ms": 20.0},
        {"t": 11.2, "pause_ms": 65.0},
        {"t": 11.5, "steal_ms": 300.0},
        {"t": 13.0, "pause_ms": 40.0},
    ]
    assert pauses.summarize(lines, 10.6, 12.0) == pauses.Window(65.0, 1, 300.0)
    assert pauses.summarize(lines, 9.0, 14.0) == pauses.Window(65.0, 3, 320.0)
    assert pauses.summarize(lines, 14.0, 15.0) == pauses.Window(0.0, 0, 0.0)


def test_pause_meter_sees_its_process_stopped(tmp_path: Path) -> None:
    """A real meter process, stopped with SIGSTOP for 150 ms: it reports a pause that long at
    least (a lower bound the stop forces, not a timing goal)."""
    import os
    import signal
    import time

    meter = pauses.PauseMeter(tmp_path / "p.jsonl", None)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "p.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # the interpreter is up and sleeping in its loop
        start = time.monotonic()
        os.kill(meter.proc.pid, signal.SIGSTOP)
        time.sleep(0.15)
        os.kill(meter.proc.pid, signal.SIGCONT)
        seen = pauses.Window(0.0, 0, 0.0)
        while seen.pause_max_ms == 0.0 and time.monotonic() < deadline:
            time.sleep(0.05)
            seen = meter.window(start, time.monotonic())
        assert seen.pause_max_ms >= 150.0
        assert seen.pauses >= 1
    finally:
        meter.stop()
    assert meter.proc.returncode is not None


def test_soak_last_high_tells_a_step_from_growth() -> None:
    step = [(10.0 * i, 300.0 if i < 4 else 305.0) for i in range(12)]  # one step, then flat
    assert soak.slope_per_hour(step[6:]) == 0 and soak.slope_per_hour(step[2:]) > 0
    assert soak.last_high(step) == 40.0
    growing = [(10.0 * i, 300.0 + 0.6 * i) for i in range(12)]
    assert soak.last_high(growing) == 110.0
    noisy = [(10.0 * i, 300.0 + (0.4 if i % 2 else 0.0)) for i in range(12)]
    assert soak.last_high(noisy) == 0.0  # wobbles under 0.5 MiB set no new high
    assert math.isnan(soak.last_high([]))


def test_soak_slope_is_least_squares_per_hour() -> None:
    assert soak.slope_per_hour([(0.0, 100.0), (1800.0, 101.0), (3600.0, 102.0)]) == pytest.approx(2)
    assert math.isnan(soak.slope_per_hour([(5.0, 1.0)]))


@pytest.mark.parametrize("script", [adaptive_ab, cold_start, store_stall])
def test_ab_scripts_read_variants_and_refuse_a_malformed_one(
    script: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    adaptive_ab.add_variant_options(parser)
    args = parser.parse_args(
        ["--variant", f"old={tmp_path}:a=1,b=2", "--variant", "new=.", "--load-cpu", "3"]
    )
    assert args.variant == [("old", tmp_path, ["a=1", "b=2"]), ("new", Path(".").resolve(), [])]
    assert (args.server_cpu, args.load_cpu, args.out) == (0, 3, None)
    # The script's own parser: a variant without a checkout is a usage error, not a traceback.
    with pytest.raises(SystemExit) as exc:
        script.main(["--variant", "old"])
    assert exc.value.code == 2
    assert "'old': expected NAME=CHECKOUT" in capsys.readouterr().err
