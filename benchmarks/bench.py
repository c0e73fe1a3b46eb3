"""Benchmark a recipe against the floor (bare Litestar) and the peer (MLServer), in one run.

Targets: ``infercore serve +recipe=RECIPE`` (plus variants), the floor
(``benchmarks/floor_app.py``: a bare Litestar endpoint on the same runner that only parses the
V2 JSON request) and MLServer serving the same ONNX file with adaptive batching
(``benchmarks/mlserver/``; iris only).

1. start every target, one after the other, on a free 127.0.0.1 port, pinned to the server CPU
   (``taskset``); time from process start to the first 200 of its readiness endpoint
   (start-up); check one request answers 200 with V2 outputs; warm each up for 2 s. They stay
   up together (an idle server costs the core next to nothing);
2. closed loop: ``wrk`` (pinned to the load CPU) at each concurrency for ``--duration`` seconds
   per target, in ``--rounds`` interleaved windows: the targets take turns, so a slow spell of
   the shared machine falls on all of them alike (run one after the other, the same target
   measured 0.4x and 0.8x the floor in two runs minutes apart). Requests cycle through pre-built
   V2 bodies (iris: iris-like rows; fraud: real card ids, Zipf popularity, 2 % unknown cards,
   as ``locustfile_fraud.py``); throughput, p50, p99, errors and wrk's own CPU use; each
   ratio to the floor is also given round by round;
3. open loop: ``benchmarks/openloop.py`` (in this process, pinned to the load CPU) at rates
   around each target's closed-loop peak, latency from the scheduled send time; the highest
   rate with p99 under ``--p99-limit-ms`` and no errors. ``--openloop-rounds`` sweeps per
   target (2), the targets taking turns; the best counts (a slow spell can only lower one);
4. read each server's peak RSS (VmHWM, summed over its processes), stop it (SIGTERM, SIGKILL
   after 15 s; every server is stopped on every exit path, Ctrl-C included).

The load generators' own ceilings are measured against the floor in the same run: their CPU
use during each run, and requests per CPU-second of the generator (the rate one core of it
could drive). Writes ``results.json``, ``table.md`` and ``plot.png`` (throughput and p50/p99 vs
concurrency) to ``--out``, and prints the table with the ratios against the targets of issue 8.

Run with the project's environment (``uv run``); needs ``wrk`` and ``taskset``. MLServer is
installed on first use into ``benchmarks/.venv-mlserver`` (git-ignored) with ``uv``; if that
fails, MLServer is skipped with a line saying why.

    uv run python benchmarks/bench.py iris
    uv run python benchmarks/bench.py fraud --concurrency 1,8,32,64 --duration 10
    uv run python benchmarks/bench.py iris --peers floor --no-openloop -- batching.max_batch_size=64
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import http.client
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import openloop

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
MLSERVER_VENV = BENCH / ".venv-mlserver"
#: infercore's own code (installed editable: compiled in place, not in site-packages).
SOURCES = [REPO / "infercore", *sorted((REPO / "plugins").glob("*/src"))]
MLSERVER_VERSION = "1.7.1"


class BenchError(Exception):
    """A failure with a one-line explanation (printed without a traceback)."""


# ---------------------------------------------------------------------------------------------
# What is benchmarked


@dataclass
class Recipe:
    model: str
    artifacts: list[str]
    build: str
    ready_s: float
    feast: bool
    #: infercore variants: label -> (Hydra overrides, target ratio vs the floor)
    variants: dict[str, tuple[list[str], float]]
    #: MLServer model-settings folder under benchmarks/mlserver/ (None: no MLServer peer)
    mlserver: str | None
    #: The request bodies the load generators send (to every target)
    bodies: Callable[[], list[bytes]]
    why_no_mlserver: str = ""
    #: The recipe infercore serves (``+recipe=``), when not the benchmark's own name
    recipe: str = ""
    #: INFERCORE_RECIPES_DIR for infercore, relative to the project (None: the project's recipes)
    recipes_dir: str | None = None


#: What the fraud targets serve (the champion) and draw their requests from.
FRAUD_ARTIFACTS = [
    "recipes/fraud/artifacts/v1/model.onnx",
    "recipes/fraud/data/card_features.parquet",
    "recipes/fraud/data/transactions.parquet",
]

RECIPES = {
    "iris": Recipe(
        model="iris",
        artifacts=["recipes/iris/artifacts/model.onnx"],
        build="uv run python recipes/iris/train.py",
        ready_s=60,
        feast=False,
        variants={"infercore": ([], 0.8)},
        mlserver="iris",
        bodies=lambda: iris_bodies(1000),
    ),
    "fraud": Recipe(
        model="fraud",
        artifacts=FRAUD_ARTIFACTS,
        build="uv run python recipes/fraud/build.py",
        ready_s=120,  # the first start imports Feast and materializes the online store
        feast=True,
        variants={
            # The recipe as shipped: Feast reads, v2 in shadow, drift monitoring (1 in 10).
            "infercore": ([], 0.6),
            "infercore-nodrift": (["models.fraud.drift=null"], 0.8),
        },
        mlserver=None,
        bodies=lambda: fraud_bodies(2000),
        why_no_mlserver=(
            "MLServer for fraud skipped: the model's inputs are 3 request fields plus 5 Feast "
            "features; MLServer has no feature store, so it would not do the same work "
            "(`bench.py fraud-model` compares the model alone)"
        ),
    ),
    # The fraud champion alone, every input in the request: the work MLServer can do too.
    "fraud-model": Recipe(
        model="fraud",
        artifacts=FRAUD_ARTIFACTS,
        build="uv run python recipes/fraud/build.py",
        ready_s=60,
        feast=False,
        variants={"infercore": ([], 0.8)},
        mlserver="fraud-model",
        bodies=lambda: fraud_model_bodies(2000),
        recipe="fraud_model",
        recipes_dir="benchmarks/recipes",
    ),
}

IRIS_MEANS = [  # per species: sepal length, sepal width, petal length, petal width
    (5.01, 3.43, 1.46, 0.25),
    (5.94, 2.77, 4.26, 1.33),
    (6.59, 2.97, 5.55, 2.03),
]


def iris_bodies(n: int, seed: int = 8) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        means = rng.choice(IRIS_MEANS)
        row = [round(max(0.1, rng.gauss(m, 0.3)), 2) for m in means]
        body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": row}]}
        out.append(json.dumps(body, separators=(",", ":")).encode())
    return out


def fraud_bodies(n: int, seed: int = 8, zipf: float = 1.0, unknown: float = 0.02) -> list[bytes]:
    """One-transaction V2 requests drawn as ``locustfile_fraud.py`` draws them."""
    import bisect
    import itertools

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    data = REPO / "recipes" / "fraud" / "data"
    ids = sorted(
        pc.unique(pq.read_table(data / "card_features.parquet").column("card_id")).to_pylist()
    )
    rng = random.Random(seed)
    rng.shuffle(ids)
    cum = list(itertools.accumulate(1.0 / (r + 1) ** zipf for r in range(len(ids))))
    ctx_cols = ("merchant_category", "channel", "country", "cross_border", "hour")
    txns = pq.read_table(data / "transactions.parquet", columns=[*ctx_cols, "amount"])
    context = list(zip(*(txns.column(c).to_pylist() for c in ctx_cols), strict=True))
    logs = pc.ln(txns.column("amount"))
    log_mean, log_std = pc.mean(logs).as_py(), pc.stddev(logs).as_py()
    out = []
    for _ in range(n):
        if rng.random() < unknown:
            card = f"c_new_{rng.randrange(10**8):08d}"
        else:
            card = ids[bisect.bisect_left(cum, rng.random() * cum[-1])]
        category, channel, country, cross_border, hour = rng.choice(context)
        amount = max(0.01, round(math.exp(rng.gauss(log_mean, log_std)), 2))
        cols = [
            ("card_id", "BYTES", card),
            ("amount", "FP32", amount),
            ("hour", "FP32", int(hour)),
            ("cross_border", "FP32", int(cross_border)),
            ("merchant_category", "BYTES", category),
            ("channel", "BYTES", channel),
            ("country", "BYTES", country),
        ]
        body = {
            "inputs": [
                {"name": name, "datatype": dtype, "shape": [1], "data": [value]}
                for name, dtype, value in cols
            ]
        }
        out.append(json.dumps(body, separators=(",", ":")).encode())
    return out


def fraud_model_bodies(n: int, seed: int = 8) -> list[bytes]:
    """V2 requests that carry every input of the fraud champion (v1), each ``[1, 1]``.

    The transaction's fields are drawn as :func:`fraud_bodies` draws them; the card's three
    features come from a random row of the feature table (what Feast would have read).
    """
    import pyarrow.parquet as pq

    data = REPO / "recipes" / "fraud" / "data"
    feature_cols = ("txn_count_1h", "txn_count_24h", "amount_avg_7d")
    features = pq.read_table(data / "card_features.parquet", columns=list(feature_cols))
    card_rows = list(zip(*(features.column(c).to_pylist() for c in feature_cols), strict=True))
    rng = random.Random(seed)
    out = []
    for body in fraud_bodies(n, seed):
        fields = {i["name"]: i for i in json.loads(body)["inputs"]}
        values = dict(zip(feature_cols, rng.choice(card_rows), strict=True))
        cols = [
            (name, fields[name]["datatype"], fields[name]["data"])
            for name in ("amount", "hour", "cross_border", "merchant_category", "channel")
        ]
        cols += [(name, "FP32", [round(float(values[name]), 4)]) for name in feature_cols]
        inputs = [
            {"name": name, "shape": [1, 1], "datatype": dtype, "data": value}
            for name, dtype, value in cols
        ]
        out.append(json.dumps({"inputs": inputs}, separators=(",", ":")).encode())
    return out


# ---------------------------------------------------------------------------------------------
# Servers


def infercore_server(
    name: str,
    recipe_name: str,
    recipe: Recipe,
    port: int,
    log: Path,
    overrides: list[str],
    tmp: Path,
    cpu: int | None,
    bin_dir: Path,
    ready_s: float,
) -> Server:
    """``infercore serve +recipe=RECIPE`` on ``port`` and ``cpu`` (not started).

    A Feast recipe gets a fresh registry and online store under ``tmp``, outside the recipe
    folder (removed when the server stops): its start-up includes materializing them.
    """
    argv = [str(bin_dir / "infercore"), "serve", f"+recipe={recipe_name}"]
    argv += [f"server.port={port}", *overrides]
    env = dict(os.environ)
    if recipe.recipes_dir is not None:
        env["INFERCORE_RECIPES_DIR"] = str(REPO / recipe.recipes_dir)
    cleanup = []
    if recipe.feast:
        feast_dir = tmp / f"feast-{name}"
        feast_dir.mkdir()
        argv += [
            f"++features.registry_path={feast_dir}/registry.db",
            f"++features.sqlite_path={feast_dir}/online_store.db",
        ]
        cleanup.append(feast_dir)
    server = Server(name, [*pin(cpu), *argv], port, "/v2/health/ready", ready_s, log, env=env)
    server.cleanup = cleanup
    return server


def metric_sum(port: int, prefix: str) -> float:
    """The sum of every sample of a server's ``/metrics`` whose line starts with ``prefix``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin(cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu)] if cpu is not None else []


@dataclass
class Server:
    name: str
    argv: list[str]
    port: int
    ready_path: str
    ready_s: float
    log_path: Path
    env: dict[str, str] | None = None
    cwd: Path = REPO
    proc: subprocess.Popen[bytes] | None = None
    startup_s: float = math.nan
    cleanup: list[Path] = field(default_factory=list)

    def start(self) -> None:
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.cwd,
            env=self.env,
            start_new_session=True,  # its own process group: stopped by us, in order
        )
        self._log = log
        _RUNNING.append(self)
        deadline = t0 + self.ready_s
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(self._exit_message())
            if http_status(self.port, "GET", self.ready_path, timeout=1.0)[0] == 200:
                self.startup_s = time.perf_counter() - t0
                return
            time.sleep(0.02)
        raise BenchError(
            f"{self.name} did not become ready (GET {self.ready_path} -> 200) within "
            f"{self.ready_s:.0f} s; its log: {self.log_path}"
        )

    def _exit_message(self) -> str:
        text = self.log_path.read_text(errors="replace")
        if re.search(r"address already in use|errno 98", text, re.I):
            return f"{self.name}: port {self.port} is busy (another process took it); try again"
        tail = "\n    ".join(text.strip().splitlines()[-8:])
        return (
            f"{self.name} exited with code {self.proc.returncode if self.proc else '?'} before "
            f"it was ready; the end of its log ({self.log_path}):\n    {tail}"
        )

    def peak_rss_mb(self) -> float:
        """VmHWM of the server and its descendants, summed (MiB)."""
        if self.proc is None:
            return math.nan
        total = 0
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            m = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
            total += int(m.group(1)) if m else 0
        return total / 1024

    def cpu_s(self) -> float:
        """CPU seconds (user + system) used so far by the server and its descendants."""
        if self.proc is None:
            return math.nan
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / tick

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGTERM)  # the group we created for it
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                print(f"  {self.name} ignored SIGTERM for 15 s; killing it", file=sys.stderr)
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if hasattr(self, "_log"):
            self._log.close()
        if self in _RUNNING:
            _RUNNING.remove(self)
        for path in self.cleanup:
            shutil.rmtree(path, ignore_errors=True)


_RUNNING: list[Server] = []


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def http_status(
    port: int, method: str, path: str, body: bytes | None = None, timeout: float = 5.0
) -> tuple[int, bytes, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, r.read(), {k.lower(): v for k, v in r.getheaders()}
    except OSError:
        return 0, b"", {}
    finally:
        conn.close()


def compile_bytecode(python: Path | str, *extra: Path) -> str:
    """Compile the environment of ``python`` (and ``extra`` folders) to bytecode; say how long.

    Start-up is measured as a deployed image starts: with every module already compiled (the
    Dockerfile builds with ``UV_COMPILE_BYTECODE=1``). ``uv sync`` compiles nothing by default,
    and where ``PYTHONDONTWRITEBYTECODE`` is set (this machine's environment) or the
    environment is read-only, every start would compile Feast, SQLAlchemy, pandas ... from
    source again: the fraud server took 5.8-9.1 s to be ready that way and 3.9-4.0 s compiled.
    Files already compiled are only checked (10-15 s for this project's environment here).
    """
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    t0 = time.perf_counter()
    argv = [str(python), "-m", "compileall", "-q", "-j", "0", purelib, *map(str, extra)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    took = time.perf_counter() - t0
    # compileall exits 1 when some file does not compile (test data, Python 2 leftovers in
    # packages): those are never imported, and the rest is compiled all the same.
    return f"bytecode of {purelib} checked or compiled in {took:.1f} s (rc {proc.returncode})"


def ensure_mlserver(log: Path) -> tuple[Path | None, str]:
    """The MLServer executable of benchmarks/.venv-mlserver (installed if missing), or a reason."""
    exe = MLSERVER_VENV / "bin" / "mlserver"
    py = MLSERVER_VENV / "bin" / "python"
    check = [str(py), "-c", "import mlserver, onnxruntime, numpy"]
    if exe.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        print(compile_bytecode(py))
        return exe, ""
    uv = shutil.which("uv")
    if uv is None:
        return (
            None,
            "MLServer skipped: `uv` is not on PATH to install it in benchmarks/.venv-mlserver",
        )
    import onnxruntime

    print(f"installing MLServer {MLSERVER_VERSION} into {MLSERVER_VENV.relative_to(REPO)} ...")
    with open(log, "wb") as out:
        steps = [
            [uv, "venv", "--quiet", "--python", sys.executable, str(MLSERVER_VENV)],
            [
                uv,
                "pip",
                "install",
                "--python",
                str(py),
                f"mlserver=={MLSERVER_VERSION}",
                f"onnxruntime=={onnxruntime.__version__}",  # the same as infercore's
                "numpy",
            ],
        ]
        for step in steps:
            try:
                rc = subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, timeout=600)
            except subprocess.TimeoutExpired:
                return None, f"MLServer skipped: installing it took over 10 min (log: {log})"
            if rc.returncode != 0:
                return None, f"MLServer skipped: installing it failed (log: {log})"
    if subprocess.run(check, capture_output=True).returncode != 0:
        return None, f"MLServer skipped: installed but does not import (log: {log})"
    print(compile_bytecode(py))
    return exe, ""


# ---------------------------------------------------------------------------------------------
# Load


WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,'
    .. '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def wrk_script(path: str, bodies: list[bytes], dest: Path) -> Path:
    """A wrk Lua script cycling through pre-formatted requests, printing a JSON summary."""
    lines = ["local bodies = {"]
    for b in bodies:
        lines.append("[==[" + b.decode() + "]==],")
    lines.append("}")
    lines.append(
        "local reqs = {}\nlocal i = 0\ninit = function(args)\n  for k, b in ipairs(bodies) do\n"
        f'    reqs[k] = wrk.format("POST", "{path}", '
        '{["Content-Type"] = "application/json"}, b)\n  end\nend\n'
        "request = function()\n  i = i + 1\n  if i > #reqs then i = 1 end\n  return reqs[i]\nend\n"
    )
    dest.write_text("\n".join(lines) + WRK_DONE)
    return dest


def run_wrk(
    port: int, path: str, script: Path, conns: int, secs: float, cpu: int | None
) -> dict[str, Any]:
    argv = [
        *pin(cpu),
        "wrk",
        "-t1",
        f"-c{conns}",
        f"-d{max(1, round(secs))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        f"http://127.0.0.1:{port}{path}",
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.perf_counter()
    _, _, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = 0
    out = proc.stdout.read().decode() if proc.stdout else ""
    err = proc.stderr.read().decode() if proc.stderr else ""
    m = re.search(r"WRKJSON (\{.*\})", out)
    if m is None:
        raise BenchError(f"wrk gave no summary: {(err or out).strip()[:300]}")
    w = json.loads(m.group(1))
    errors = w["connect"] + w["read"] + w["write"] + w["status"] + w["timeout"]
    secs_run = w["duration_us"] / 1e6
    cpu_s = usage.ru_utime + usage.ru_stime
    return {
        "concurrency": conns,
        "requests": w["requests"],
        "errors": errors,
        "rps": w["requests"] / secs_run if secs_run else 0.0,
        "p50_ms": w["p50_us"] / 1000,
        "p90_ms": w["p90_us"] / 1000,
        "p99_ms": w["p99_us"] / 1000,
        "max_ms": w["max_us"] / 1000,
        "gen_cpu_pct": 100 * cpu_s / wall,
        "gen_req_per_cpu_s": w["requests"] / cpu_s if cpu_s else math.nan,
    }


def combine_windows(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """One target's interleaved wrk windows at one concurrency as one result.

    req/s is over all the windows' requests and time; p50/p90/p99 are the median of the
    windows' (``p99_max_ms`` the worst); ``rounds_rps`` keeps each window's rate, in round
    order, for the per-round ratios.
    """
    requests = sum(w["requests"] for w in windows)
    secs = sum(w["requests"] / w["rps"] for w in windows if w["rps"])
    gen_cpu_s = sum(w["requests"] / w["gen_req_per_cpu_s"] for w in windows if w["requests"])

    def median(key: str) -> float:
        return float(statistics.median(w[key] for w in windows))

    return {
        "concurrency": windows[0]["concurrency"],
        "requests": requests,
        "errors": sum(w["errors"] for w in windows),
        "rps": requests / secs if secs else 0.0,
        "p50_ms": median("p50_ms"),
        "p90_ms": median("p90_ms"),
        "p99_ms": median("p99_ms"),
        "p99_max_ms": max(w["p99_ms"] for w in windows),
        "max_ms": max(w["max_ms"] for w in windows),
        "gen_cpu_pct": statistics.fmean(w["gen_cpu_pct"] for w in windows),
        "gen_req_per_cpu_s": requests / gen_cpu_s if gen_cpu_s else math.nan,
        "rounds_rps": [w["rps"] for w in windows],
        # The server's CPU per answered request (its processes' user + system time).
        "server_cpu_us": (
            1e6 * sum(w.get("server_cpu_s", math.nan) for w in windows) / requests
            if requests
            else math.nan
        ),
    }


def run_openloop(
    port: int, reqs: list[bytes], rates: list[float], secs: float, p99_limit: float
) -> dict[str, Any]:
    c0 = time.process_time()
    t0 = time.perf_counter()
    best, runs = _asyncio_run(
        openloop.sweep(
            "127.0.0.1", port, reqs, rates, secs, p99_limit_ms=p99_limit, log=True, refine=1
        )
    )
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    completed = sum(r.completed for r in runs)
    return {
        "max_rate": best,
        "p99_limit_ms": p99_limit,
        "runs": [r.summary() for r in runs],
        "gen_cpu_pct": 100 * cpu / wall,
        "gen_req_per_cpu_s": completed / cpu if cpu else math.nan,
    }


def _asyncio_run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# ---------------------------------------------------------------------------------------------
# Figures


def fmt(x: float | None, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}"


def best_rps(target: dict[str, Any]) -> float:
    return max((r["rps"] for r in target.get("closed", [])), default=math.nan)


def ratios(results: dict[str, Any]) -> list[dict[str, Any]]:
    """infercore variant / floor and / MLServer, with the targets of issue 8."""
    targets = {t["name"]: t for t in results["targets"]}
    floor = targets.get("floor")
    mls = targets.get("mlserver")
    out = []
    for t in results["targets"]:
        if t["kind"] != "infercore" or not t.get("closed"):
            continue
        row: dict[str, Any] = {"name": t["name"], "target_vs_floor": t.get("target_vs_floor")}
        last = max(t["closed"], key=lambda r: r["concurrency"])
        row["p99_ms_at_max_concurrency"] = last["p99_ms"]
        row["max_concurrency"] = last["concurrency"]
        if floor and floor.get("closed"):
            row["vs_floor"] = best_rps(t) / best_rps(floor)
            # Round by round at infercore's best concurrency: each ratio from two windows run
            # back to back, so the spread shows how much the machine moved during the run.
            top = max(t["closed"], key=lambda r: r["rps"])
            same = [r for r in floor["closed"] if r["concurrency"] == top["concurrency"]]
            mine, theirs = top.get("rounds_rps", []), same[0].get("rounds_rps", []) if same else []
            per_round = [a / b for a, b in zip(mine, theirs, strict=False) if b]
            if per_round:
                row["per_round"] = {
                    "concurrency": top["concurrency"],
                    "ratios": per_round,
                    "median": statistics.median(per_round),
                    "min": min(per_round),
                    "max": max(per_round),
                }
            ol, fl = (
                t.get("openloop", {}).get("max_rate"),
                floor.get("openloop", {}).get("max_rate"),
            )
            row["openloop_vs_floor"] = ol / fl if ol and fl else None
        if mls and mls.get("closed"):
            row["vs_mlserver"] = best_rps(t) / best_rps(mls)
            ol, ml = t.get("openloop", {}).get("max_rate"), mls.get("openloop", {}).get("max_rate")
            row["openloop_vs_mlserver"] = ol / ml if ol and ml else None
        out.append(row)
    return out


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "NOT met")


def table_md(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"# {results['recipe']}: infercore vs the floor and MLServer ({results['date']})",
        "",
        f"Machine: {m['cpu']}, {m['cpus']} CPUs, load average before the run {m['loadavg']}; "
        f"server on CPU {results['server_cpu']}, load generators on CPU {results['load_cpu']}. "
        f"Closed loop: wrk, {results['duration_s']:g} s per concurrency and target, in "
        f"{results.get('rounds', 1)} interleaved windows (the targets take turns; req/s over "
        "all windows, p50 and p99 the median window's). Open loop: "
        f"openloop.py, {results['openloop_duration_s']:g} s per rate, Poisson arrivals, "
        "latency from the scheduled send time; the best of "
        f"{results.get('openloop_rounds', 1)} sweeps per target, the targets taking turns.",
        "",
        "`" + results["command"] + "`",
        "",
        "| target | concurrency | req/s | p50 ms | p99 ms | errors | wrk CPU % "
        "| server CPU µs/request |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in results["targets"]:
        for r in t.get("closed", []):
            lines.append(
                f"| {t['name']} | {r['concurrency']} | {fmt(r['rps'])} | {fmt(r['p50_ms'], 1)} "
                f"| {fmt(r['p99_ms'], 1)} | {r['errors']} | {fmt(r['gen_cpu_pct'])} "
                f"| {fmt(r.get('server_cpu_us'))} |"
            )
    lines += [
        "",
        "| target | best req/s | open-loop max rate (p99 < "
        f"{results['p99_limit_ms']:g} ms) | peak RSS MiB | start-up s |",
        "|---|---:|---:|---:|---:|",
    ]
    for t in results["targets"]:
        if t.get("skipped"):
            lines.append(f"| {t['name']} | skipped: {t['skipped']} | | | |")
            continue
        ol = t.get("openloop", {})
        lines.append(
            f"| {t['name']} | {fmt(best_rps(t))} | {fmt(ol.get('max_rate'))} "
            f"| {fmt(t.get('peak_rss_mb'))} | {fmt(t.get('startup_s'), 2)} |"
        )
    gen = results.get("generator_ceiling")
    if gen:
        lines += [
            "",
            "Load generators against the floor (their own ceiling; one core each): "
            f"wrk used {fmt(gen['wrk_cpu_pct'])} % of its core at {fmt(gen['wrk_rps'])} req/s "
            f"(≈ {fmt(gen['wrk_req_per_cpu_s'])} requests per CPU-second); openloop.py used "
            f"{fmt(gen.get('openloop_cpu_pct'))} % of its core, ≈ "
            f"{fmt(gen.get('openloop_req_per_cpu_s'))} requests per CPU-second.",
        ]
    lines += [
        "",
        "| infercore | / floor (best req/s) | target | / floor per round: median (range) "
        "| / floor (open loop) | / MLServer (best req/s) | target ≥ 4 | p99 at max concurrency "
        f"| target < {results['p99_limit_ms']:g} ms |",
        "|---|---:|---|---:|---:|---:|---|---:|---|",
    ]
    for r in results["ratios"]:
        vf, vm, tf = r.get("vs_floor"), r.get("vs_mlserver"), r.get("target_vs_floor")
        p99 = r["p99_ms_at_max_concurrency"]
        pr = r.get("per_round")
        rounds = (
            f"{pr['median']:.2f} ({pr['min']:.2f}-{pr['max']:.2f}, c={pr['concurrency']})"
            if pr
            else "-"
        )
        lines.append(
            f"| {r['name']} | {fmt(vf, 2)} | ≥ {tf} {verdict(None if vf is None else vf >= tf)} "
            f"| {rounds} "
            f"| {fmt(r.get('openloop_vs_floor'), 2)} | {fmt(vm, 2)} "
            f"| {verdict(None if vm is None else vm >= 4)} | {fmt(p99, 1)} ms "
            f"(c={r['max_concurrency']}) | {verdict(p99 < results['p99_limit_ms'])} |"
        )
    for note in results.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], dest: Path) -> str | None:
    """Throughput and p50/p99 vs concurrency; returns why not when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed in this environment"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for t in results["targets"]:
        rows = sorted(t.get("closed", []), key=lambda r: r["concurrency"])
        if not rows:
            continue
        xs = [r["concurrency"] for r in rows]
        (line,) = ax1.plot(xs, [r["rps"] for r in rows], marker="o", label=t["name"])
        color = line.get_color()
        ax2.plot(xs, [r["p99_ms"] for r in rows], marker="o", color=color, label=f"{t['name']} p99")
        ax2.plot(
            xs,
            [r["p50_ms"] for r in rows],
            marker=".",
            ls="--",
            color=color,
            label=f"{t['name']} p50",
        )
    ax2.axhline(results["p99_limit_ms"], color="grey", lw=0.8, ls=":")
    ticks = sorted({r["concurrency"] for t in results["targets"] for r in t.get("closed", [])})
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(c) for c in ticks])
        ax.minorticks_off()
        ax.set_xlabel("concurrency (closed loop, wrk)")
        ax.grid(True, alpha=0.3)
    ax1.set_ylabel("requests/s")
    ax1.set_ylim(bottom=0)
    ax1.legend(fontsize=8)
    ax2.set_yscale("log")
    ax2.set_ylabel("latency ms")
    ax2.legend(fontsize=7, ncol=2)
    fig.suptitle(f"{results['recipe']} over V2, server on one core ({results['date']})")
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)
    return None


# ---------------------------------------------------------------------------------------------
# The run


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Hydra overrides after `--` go to every infercore server of the run.",
    )
    p.add_argument("recipe", choices=sorted(RECIPES), help="the recipe to benchmark")
    p.add_argument("--concurrency", default="1,8,32,64", help="closed-loop connections (1,8,32,64)")
    p.add_argument(
        "--duration", type=float, default=10, help="seconds per concurrency and target (10)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="interleaved windows per concurrency: targets take turns, duration/rounds "
        "seconds each (5)",
    )
    p.add_argument(
        "--peers",
        default="floor,mlserver",
        help="comma-separated peers: floor,mlserver (default), floor, mlserver, or '' for none",
    )
    p.add_argument(
        "--variants",
        default=None,
        help="infercore variants of the recipe to run (default: all; fraud: infercore, "
        "infercore-nodrift)",
    )
    p.add_argument("--openloop-duration", type=float, default=5, help="seconds per rate (5)")
    p.add_argument(
        "--openloop-rounds",
        type=int,
        default=2,
        help="open-loop sweeps per target, the targets taking turns; the best counts (2)",
    )
    p.add_argument("--no-openloop", action="store_true", help="closed loop only")
    p.add_argument("--p99-limit-ms", type=float, default=100.0)
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--load-cpu", type=int, default=1)
    p.add_argument("--ready-timeout", type=float, default=None, help="seconds (iris 60, fraud 120)")
    p.add_argument("--out", type=Path, default=None, help="benchmarks/results/RECIPE-<date>/")
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, overrides = argv[:at], argv[at + 1 :]
    args = p.parse_args(argv)
    args.overrides = overrides
    try:
        args.concurrency = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    except ValueError:
        p.error(f"--concurrency: expected numbers like 1,8,32,64, got {args.concurrency!r}")
    if not args.concurrency or min(args.concurrency) < 1:
        p.error("--concurrency: at least one value, each >= 1")
    args.peers = [x.strip() for x in args.peers.split(",") if x.strip()]
    for peer in args.peers:
        if peer not in ("floor", "mlserver"):
            p.error(f"--peers: unknown peer {peer!r}; available: floor, mlserver")
    recipe = RECIPES[args.recipe]
    if args.variants is None:
        args.variants = list(recipe.variants)
    else:
        args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        for v in args.variants:
            if v not in recipe.variants:
                p.error(
                    f"--variants: {v!r}; available for {args.recipe}: {', '.join(recipe.variants)}"
                )
    if args.duration <= 0 or args.openloop_duration <= 0:
        p.error("--duration and --openloop-duration must be positive")
    if args.rounds < 1 or args.openloop_rounds < 1:
        p.error("--rounds and --openloop-rounds must be at least 1")
    if args.duration / args.rounds < 1:
        p.error(
            f"--duration {args.duration:g} / --rounds {args.rounds} is under 1 s, wrk's "
            "shortest run; lower --rounds or raise --duration"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return _main(args)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; servers stopped", file=sys.stderr)
        return 130
    finally:
        for server in list(_RUNNING):
            server.stop()


def _on_signal(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _main(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    recipe = RECIPES[args.recipe]
    for tool in ("wrk",):
        if shutil.which(tool) is None:
            raise BenchError(f"`{tool}` is not on PATH (apt-get install {tool})")
    for f in recipe.artifacts:
        if not (REPO / f).is_file():
            raise BenchError(f"{f} is missing; build it with: {recipe.build}")
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "infercore").exists():
        raise BenchError(f"no `infercore` next to {sys.executable}; run with `uv run python ...`")
    ncpu = os.cpu_count() or 1
    server_cpu: int | None = args.server_cpu
    load_cpu: int | None = args.load_cpu
    if shutil.which("taskset") is None or max(args.server_cpu, args.load_cpu) >= ncpu:
        print(f"note: not pinning (taskset missing or only {ncpu} CPU(s))", file=sys.stderr)
        server_cpu = load_cpu = None
    else:
        os.sched_setaffinity(0, {args.load_cpu})  # this process runs the open-loop generator

    date = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out: Path = args.out or BENCH / "results" / f"{args.recipe}-{date}"
    out.mkdir(parents=True, exist_ok=True)
    args.bytecode = compile_bytecode(sys.executable, *SOURCES)
    print(args.bytecode, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-{args.recipe}-"))
    try:
        return _run(args, recipe, out, tmp, date, bin_dir, server_cpu, load_cpu)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(
    args: argparse.Namespace,
    recipe: Recipe,
    out: Path,
    tmp: Path,
    date: str,
    bin_dir: Path,
    server_cpu: int | None,
    load_cpu: int | None,
) -> int:
    path = f"/v2/models/{recipe.model}/infer"
    bodies = recipe.bodies()
    script = wrk_script(path, bodies, tmp / "load.lua")
    reqs = [openloop.encode_post("127.0.0.1", None, path, b, "application/json") for b in bodies]
    ready_s = args.ready_timeout or recipe.ready_s
    cmd = "uv run python benchmarks/bench.py " + " ".join(
        sys.argv[1:] if sys.argv[1:] else [args.recipe]
    )
    results: dict[str, Any] = {
        "recipe": args.recipe,
        "date": date,
        "command": cmd,
        "machine": machine(),
        "server_cpu": server_cpu,
        "load_cpu": load_cpu,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "openloop_duration_s": args.openloop_duration,
        "openloop_rounds": args.openloop_rounds,
        "p99_limit_ms": args.p99_limit_ms,
        "bytecode": args.bytecode,
        "targets": [],
        "notes": [],
    }

    plans: list[tuple[str, str, Any]] = [
        ("infercore", v, recipe.variants[v]) for v in args.variants
    ]
    if "floor" in args.peers:
        plans.append(("floor", "floor", None))
    if "mlserver" in args.peers:
        if recipe.mlserver is None:
            print(recipe.why_no_mlserver)
            results["notes"].append(recipe.why_no_mlserver + ".")
        else:
            plans.append(("mlserver", "mlserver", None))

    started: list[tuple[dict[str, Any], Server]] = []
    for kind, name, variant in plans:
        port = free_port()
        log = out / f"{name}-server.log"
        target: dict[str, Any] = {"name": name, "kind": kind}
        if kind == "infercore":
            overrides, goal = variant
            target["target_vs_floor"] = goal
            target["overrides"] = [*overrides, *args.overrides]
            server = infercore_server(
                name,
                recipe.recipe or args.recipe,
                recipe,
                port,
                log,
                [*overrides, *args.overrides],
                tmp,
                server_cpu,
                bin_dir,
                ready_s,
            )
        elif kind == "floor":
            argv = [sys.executable, str(BENCH / "floor_app.py"), "--port", str(port)]
            server = Server(name, [*pin(server_cpu), *argv], port, "/v2/health/ready", ready_s, log)
        else:
            exe, why = ensure_mlserver(out / "mlserver-install.log")
            if exe is None:
                print(why)
                results["notes"].append(why + ".")
                target["skipped"] = why
                results["targets"].append(target)
                continue
            mdir = tmp / "mlserver"
            (mdir / recipe.model).mkdir(parents=True)
            settings = json.loads((BENCH / "mlserver" / "settings.json").read_text())
            settings.update(http_port=port, grpc_port=free_port(), metrics_port=free_port())
            (mdir / "settings.json").write_text(json.dumps(settings))
            src = BENCH / "mlserver" / recipe.mlserver / "model-settings.json"
            ms = json.loads(src.read_text())
            uri = (src.parent / ms["parameters"]["uri"]).resolve()
            ms["parameters"]["uri"] = str(uri)
            (mdir / recipe.model / "model-settings.json").write_text(json.dumps(ms))
            target["model_settings"] = {
                k: ms[k] for k in ("max_batch_size", "max_batch_time") if k in ms
            }
            target["settings"] = {k: settings[k] for k in ("parallel_workers", "debug")}
            env = {**os.environ, "PYTHONPATH": str(BENCH / "mlserver")}
            env.pop("VIRTUAL_ENV", None)
            server = Server(
                name,
                [*pin(server_cpu), str(exe), "start", str(mdir)],
                port,
                f"/v2/models/{recipe.model}/ready",
                ready_s,
                log,
                env=env,
            )
        print(f"{name}: starting on 127.0.0.1:{port} ...", flush=True)
        try:
            server.start()
        except BenchError as exc:
            if kind == "mlserver":  # the peer is optional: say why, go on
                why = f"MLServer skipped: {exc}"
                print(why)
                results["notes"].append(why)
                target["skipped"] = str(exc)
                results["targets"].append(target)
                server.stop()
                continue
            raise
        target["startup_s"] = server.startup_s
        print(f"  ready after {server.startup_s:.2f} s", flush=True)
        status, body, headers = http_status(port, "POST", path, bodies[0])
        if status != 200 or b'"outputs"' not in body or "x-infercore-degraded" in headers:
            server.stop()
            raise BenchError(
                f"{name}: a V2 request was answered {status} {body[:200]!r}; log: {log}"
            )
        started.append((target, server))
        results["targets"].append(target)

    for _, server in started:  # warm-up, discarded
        run_wrk(server.port, path, script, max(args.concurrency), 2, load_cpu)
    names = [t["name"] for t, _ in started]
    for target, _ in started:
        target["closed"] = []
    window_s = args.duration / args.rounds
    for c in args.concurrency:
        windows: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        for n in range(args.rounds):
            # Targets take turns, each round starting one further along: a slow spell of the
            # shared machine falls on all of them alike, not on whichever ran then.
            for target, server in _turns(started, n):
                cpu0 = server.cpu_s()
                w = run_wrk(server.port, path, script, c, window_s, load_cpu)
                w["server_cpu_s"] = server.cpu_s() - cpu0
                windows[target["name"]].append(w)
        for target, _ in started:
            r = combine_windows(windows[target["name"]])
            target["closed"].append(r)
            print(
                f"  {target['name']:<18} c={c:<4} {r['rps']:8.0f} req/s  p50 {r['p50_ms']:7.1f} ms"
                f"  p99 {r['p99_ms']:7.1f} ms  errors {r['errors']}  "
                f"wrk CPU {r['gen_cpu_pct']:.0f} %  server {r['server_cpu_us']:.0f} µs/req  rounds "
                + " ".join(f"{x:.0f}" for x in r["rounds_rps"]),
                flush=True,
            )
    if not args.no_openloop:
        sweeps: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        for n in range(args.openloop_rounds):
            for target, server in _turns(started, n):
                peak = best_rps(target)
                rates = sorted({max(10, round(peak * f, -1)) for f in (0.5, 0.7, 0.85, 1.0, 1.15)})
                print(f"{target['name']}: open loop, round {n + 1} ...", flush=True)
                sweep = run_openloop(
                    server.port, reqs, rates, args.openloop_duration, args.p99_limit_ms
                )
                sweeps[target["name"]].append(sweep)
                print(f"  open loop: highest rate passing {sweep['max_rate']}", flush=True)
        for target, _ in started:
            # The best round: a slow spell of the machine can only lower a sweep's figure.
            runs = sweeps[target["name"]]
            best = max(runs, key=lambda o: o["max_rate"] or 0)
            target["openloop"] = {**best, "rounds_max_rate": [o["max_rate"] for o in runs]}
    for target, server in started:
        target["peak_rss_mb"] = server.peak_rss_mb()
        server.stop()
        print(f"{target['name']}: stopped; peak RSS {target['peak_rss_mb']:.0f} MiB", flush=True)

    floor = next((t for t in results["targets"] if t["name"] == "floor" and t.get("closed")), None)
    if floor:
        top = max(floor["closed"], key=lambda r: r["rps"])
        gen = {
            "wrk_rps": top["rps"],
            "wrk_cpu_pct": top["gen_cpu_pct"],
            "wrk_req_per_cpu_s": top["gen_req_per_cpu_s"],
        }
        if floor.get("openloop"):
            gen["openloop_cpu_pct"] = floor["openloop"]["gen_cpu_pct"]
            gen["openloop_req_per_cpu_s"] = floor["openloop"]["gen_req_per_cpu_s"]
        results["generator_ceiling"] = gen
    results["ratios"] = ratios(results)
    (out / "results.json").write_text(json.dumps(_no_nan(results), indent=1) + "\n")
    table = table_md(results)
    why = plot(results, out / "plot.png")
    if why:
        print(why)
    (out / "table.md").write_text(table)
    print()
    print(table)
    print(f"files: {out}/results.json, table.md{'' if why else ', plot.png'}, *-server.log")
    return 0


def _turns(started: list[Any], n: int) -> list[Any]:
    """Round ``n``'s order: the targets in turn, starting ``n`` further along."""
    k = n % len(started)
    return started[k:] + started[:k]


def _no_nan(x: Any) -> Any:
    """NaN (no value) as null, so that results.json is strict JSON."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_no_nan(v) for v in x]
    return x


if __name__ == "__main__":
    raise SystemExit(main())
