"""Open-loop HTTP load: requests sent at scheduled times of a fixed rate, whatever the server does.

A closed-loop generator (wrk, Locust) waits for an answer before it sends the next request, so a
slow server slows the load down and the latencies it reports hide the queue that built up
("coordinated omission"). Here every request has a scheduled send time fixed in advance (a
Poisson or uniform arrival process at ``rate`` per second) and its latency is measured from that
scheduled time, not from when it actually left: a stalled server or a late generator shows up in
the figures.

- raw asyncio (uvloop when installed), HTTP/1.1 keep-alive connections, request bytes encoded once
  before the run;
- a pool of connections opened before the run; when every connection is busy a new one is
  opened (counted), up to ``max_connections``, after which a send waits for a free connection
  (counted as ``waited``: the figures are then no longer strictly open loop);
- bounded: the schedule covers ``duration`` seconds; answers still missing ``timeout`` seconds
  after the last scheduled send count as errors.

``sweep`` runs several rates and returns the highest at which p99 stays under a limit with no
errors. Command line (one rate, or a sweep)::

    python benchmarks/openloop.py http://127.0.0.1:8080/v2/models/iris/infer --rate 2000 \\
        --body '{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":[5,3,1,0]}]}'
    python benchmarks/openloop.py URL --body-file bodies.jsonl --sweep 500,1000,2000,4000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import sys
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of values, nearest-rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def schedule(rate: float, duration: float, arrival: str = "poisson", seed: int = 0) -> list[float]:
    """Send offsets in seconds from the start: ``rate`` per second on average over ``duration``."""
    if rate <= 0 or duration <= 0:
        raise ValueError("rate and duration must be positive")
    if arrival == "uniform":
        return [i / rate for i in range(int(rate * duration))]
    if arrival != "poisson":
        raise ValueError(f"arrival: expected poisson or uniform, got {arrival!r}")
    rng = random.Random(seed)
    offsets, t = [], rng.expovariate(rate)
    while t < duration:
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


def encode_post(host: str, port: int | None, path: str, body: bytes, content_type: str) -> bytes:
    """One HTTP/1.1 keep-alive POST, as bytes."""
    where = host if port is None else f"{host}:{port}"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {where}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode("ascii") + body


@dataclass
class OpenLoopResult:
    """What one open-loop run measured; latencies in milliseconds from the scheduled send time."""

    rate: float
    duration_s: float
    scheduled: int
    completed: int = 0
    errors: int = 0
    status: dict[str, int] = field(default_factory=dict)
    p50_ms: float = math.nan
    p90_ms: float = math.nan
    p99_ms: float = math.nan
    max_ms: float = math.nan
    #: Mean and p99 of (actual send - scheduled send): how late the generator itself was.
    send_lag_mean_ms: float = math.nan
    send_lag_p99_ms: float = math.nan
    achieved_rps: float = 0.0
    #: Error answers by the ``reason`` of their JSON body (``"?"`` when it has none).
    reasons: dict[str, int] = field(default_factory=dict)
    #: 503 answers without a ``Retry-After`` header.
    retry_after_missing: int = 0
    #: Latency percentiles of the 2xx answers and of the error answers, apart.
    ok_p99_ms: float = math.nan
    rejected_p50_ms: float = math.nan
    rejected_p99_ms: float = math.nan
    connections_opened: int = 0
    #: Connections opened during the run because every open one was busy.
    connections_added: int = 0
    #: Sends that had to wait for a free connection (max_connections reached).
    waited: int = 0
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    rejected_ms: list[float] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, object]:
        d = asdict(self)
        d.pop("latencies_ms")
        d.pop("rejected_ms")
        return d

    def passes(self, p99_limit_ms: float) -> bool:
        return self.errors == 0 and self.completed == self.scheduled and self.p99_ms < p99_limit_ms


class _Conn:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


@dataclass(slots=True)
class _Response:
    status: int
    retry_after: bool
    #: The body of an error answer (``b""`` for a 2xx, which is not kept).
    body: bytes


async def _read_response(reader: asyncio.StreamReader) -> _Response:
    """Read one HTTP/1.1 response (Content-Length or chunked)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, chunked, retry_after = 0, False, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif name == b"retry-after":
            retry_after = True
    body = b""
    if chunked:
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            parts.append((await reader.readexactly(size + 2))[:-2])
            if size == 0:
                break
        body = b"".join(parts)
    elif length:
        body = await reader.readexactly(length)
    return _Response(status, retry_after, body if status >= 400 else b"")


def _reason(body: bytes) -> str:
    """The ``reason`` of an infercore error body (``"?"`` when there is none)."""
    try:
        reason = json.loads(body).get("reason")
    except (ValueError, AttributeError):
        return "?"
    return reason if isinstance(reason, str) else "?"


async def run(
    host: str,
    port: int,
    requests: Sequence[bytes],
    rate: float,
    duration: float,
    *,
    arrival: str = "poisson",
    connections: int = 64,
    max_connections: int = 1024,
    timeout: float = 5.0,
    seed: int = 0,
) -> OpenLoopResult:
    """Send ``requests`` (cycled; pre-encoded HTTP/1.1) at ``rate`` per second for ``duration``."""
    offsets = schedule(rate, duration, arrival, seed)
    result = OpenLoopResult(rate=rate, duration_s=duration, scheduled=len(offsets))
    idle: deque[_Conn] = deque()
    free = asyncio.Condition()
    opened = 0
    waiting = 0

    async def connect() -> _Conn:
        nonlocal opened
        reader, writer = await asyncio.open_connection(host, port)
        opened += 1
        return _Conn(reader, writer)

    for conn in await asyncio.gather(
        *(connect() for _ in range(min(connections, max_connections)))
    ):
        idle.append(conn)
    result.connections_opened = opened
    statuses: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    latencies: list[float] = []
    rejected: list[float] = []
    ok: list[float] = []
    lags: list[float] = []

    async def release(conn: _Conn | None) -> None:
        if conn is not None:
            idle.append(conn)
        if waiting:
            async with free:
                free.notify()

    async def one(i: int, scheduled_at: float, conn: _Conn | None) -> None:
        nonlocal opened, waiting
        try:
            if conn is None:
                if opened < max_connections:
                    opened += 1  # reserve the slot before the await
                    result.connections_added += 1
                    reader, writer = await asyncio.open_connection(host, port)
                    conn = _Conn(reader, writer)
                else:
                    result.waited += 1
                    waiting += 1
                    try:
                        async with free:
                            await free.wait_for(lambda: bool(idle))
                    finally:
                        waiting -= 1
                    conn = idle.popleft()
            lags.append(time.perf_counter() - scheduled_at)
            conn.writer.write(requests[i % len(requests)])
            response = await _read_response(conn.reader)
            latency = time.perf_counter() - scheduled_at
            latencies.append(latency)
            status = response.status
            statuses[str(status)] += 1
            if status >= 400:
                result.errors += 1
                rejected.append(latency)
                reasons[_reason(response.body)] += 1
                if status == 503 and not response.retry_after:
                    result.retry_after_missing += 1
            else:
                ok.append(latency)
            await release(conn)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            statuses["connection_error"] += 1
            result.errors += 1
            if conn is not None:
                conn.close()
            opened -= 1
            await release(None)

    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter() + 0.05
    for i, offset in enumerate(offsets):
        at = start + offset
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        conn = idle.popleft() if idle else None
        task = asyncio.create_task(one(i, at, conn))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        _, pending = await asyncio.wait(set(tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            statuses["timeout"] += len(pending)
            result.errors += len(pending)
    elapsed = time.perf_counter() - start
    for conn in idle:
        conn.close()

    result.completed = len(latencies)
    result.status = dict(statuses)
    result.reasons = dict(reasons)
    result.latencies_ms = [x * 1000 for x in latencies]
    result.rejected_ms = [x * 1000 for x in rejected]
    if ok:
        result.ok_p99_ms = 1000 * percentile(ok, 99)
    if rejected:
        result.rejected_p50_ms = percentile(result.rejected_ms, 50)
        result.rejected_p99_ms = percentile(result.rejected_ms, 99)
    if latencies:
        result.p50_ms = percentile(result.latencies_ms, 50)
        result.p90_ms = percentile(result.latencies_ms, 90)
        result.p99_ms = percentile(result.latencies_ms, 99)
        result.max_ms = max(result.latencies_ms)
    if lags:
        result.send_lag_mean_ms = 1000 * sum(lags) / len(lags)
        result.send_lag_p99_ms = 1000 * percentile(lags, 99)
    result.achieved_rps = result.completed / max(elapsed, duration)
    return result


async def sweep(
    host: str,
    port: int,
    requests: Sequence[bytes],
    rates: Sequence[float],
    duration: float,
    *,
    p99_limit_ms: float = 100.0,
    refine: int = 1,
    log: bool = False,
    **kwargs: object,
) -> tuple[float | None, list[OpenLoopResult]]:
    """Run rates in increasing order until one fails; then ``refine`` bisection steps.

    When the lowest rate fails already, the rate is halved (up to three times) before bisecting.

    Returns the highest rate that passed (p99 under the limit, no errors, every request answered;
    None if none did) and every run.
    """
    runs: list[OpenLoopResult] = []
    best: float | None = None
    failed: float | None = None

    async def attempt(rate: float) -> bool:
        r = await run(host, port, requests, rate, duration, **kwargs)  # type: ignore[arg-type]
        runs.append(r)
        ok = r.passes(p99_limit_ms)
        if log:
            print(
                f"  open loop {rate:8.0f}/s: answered {r.achieved_rps:8.0f}/s p50 {r.p50_ms:7.1f}"
                f" p99 {r.p99_ms:7.1f} ms errors {r.errors} waited {r.waited}"
                f" {'ok' if ok else 'FAIL'}",
                flush=True,
            )
        await asyncio.sleep(0.5)  # let the server drain before the next rate
        return ok

    for rate in sorted(rates):
        if await attempt(rate):
            best = rate
        else:
            failed = rate
            break
    # Not even the lowest rate passed: halve it (three times at most) to find one that does.
    for _ in range(3 if best is None and failed is not None else 0):
        rate = round(failed / 2)  # type: ignore[operator]
        if rate < 1:
            break
        if await attempt(rate):
            best = rate
            break
        failed = rate
    for _ in range(refine if failed is not None else 0):
        low = best or 0.0
        mid = round((low + failed) / 2)  # type: ignore[operator]
        if mid <= low or mid >= failed:  # type: ignore[operator]
            break
        if await attempt(mid):
            best = mid
        else:
            failed = mid
    return best, runs


def _install_uvloop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("url", help="http://HOST:PORT/PATH to POST to")
    p.add_argument("--body", help="one JSON request body")
    p.add_argument("--body-file", help="request bodies, one per line (cycled)")
    p.add_argument("--rate", type=float, help="requests per second (one run)")
    p.add_argument("--sweep", help="comma-separated rates: the highest passing one is reported")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per rate (default 10)")
    p.add_argument("--arrival", choices=["poisson", "uniform"], default="poisson")
    p.add_argument("--connections", type=int, default=64, help="opened before the run")
    p.add_argument("--max-connections", type=int, default=1024)
    p.add_argument("--p99-limit-ms", type=float, default=100.0)
    p.add_argument("--json", action="store_true", help="print the result(s) as JSON")
    args = p.parse_args(argv)
    if (args.body is None) == (args.body_file is None):
        p.error("give one of --body or --body-file")
    if (args.rate is None) == (args.sweep is None):
        p.error("give one of --rate or --sweep")
    url = urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    if args.body_file:
        with open(args.body_file, "rb") as f:
            bodies = [line.rstrip(b"\n") for line in f if line.strip()]
    else:
        bodies = [args.body.encode()]
    reqs = [encode_post(host, port, url.path or "/", b, "application/json") for b in bodies]
    loop_name = _install_uvloop()
    common = dict(
        arrival=args.arrival, connections=args.connections, max_connections=args.max_connections
    )
    try:
        if args.rate is not None:
            r = asyncio.run(run(host, port, reqs, args.rate, args.duration, **common))  # type: ignore[arg-type]
            if args.json:
                print(json.dumps(r.summary()))
            else:
                print(f"{loop_name}: {json.dumps(r.summary(), indent=1)}")
            return 0 if r.errors == 0 else 1
        rates = [float(x) for x in args.sweep.split(",")]
        best, runs = asyncio.run(
            sweep(
                host,
                port,
                reqs,
                rates,
                args.duration,
                p99_limit_ms=args.p99_limit_ms,
                log=not args.json,
                **common,
            )
        )
    except OSError as exc:
        print(f"openloop: cannot connect to {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"max_rate": best, "runs": [r.summary() for r in runs]}))
    else:
        print(f"highest rate with p99 < {args.p99_limit_ms:g} ms and no errors: {best}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
