"""The supervisor of ``server.workers`` (infercore.server.workers) with stand-in worker processes.

The stand-ins speak the supervisor's protocol (the ``INFERCORE_WORKER`` context, the ready
pipe, signals) without loading anything, so restart and give-up rules run in a second or two.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from infercore.server import workers
from infercore.server.shutdown import (
    GracefulShutdown,
    ShutdownMiddleware,
    ShutdownState,
    http_protocol,
)
from infercore.server.workers import Supervisor

STAND_IN = r"""
import os, signal, sys, time
from pathlib import Path

index, _, ready_fd, _, _, _ = os.environ["INFERCORE_WORKER"].split(":")
mode, folder = sys.argv[1], Path(sys.argv[2])
counter = folder / f"starts-{index}"
starts = int(counter.read_text()) if counter.exists() else 0
(folder / f".starts-{index}").write_text(str(starts + 1))
(folder / f".starts-{index}").replace(counter)  # never seen half-written
(folder / f"metrics-dir-{index}").write_text(os.environ["PROMETHEUS_MULTIPROC_DIR"])
if mode == "broken":
    print("infercore: error: model broken", file=sys.stderr)
    sys.exit(3)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
crashing = (mode == "crashloop" and index == "0") or mode == "crashloop-all"
if crashing and starts > 0:
    time.sleep(0.2)  # a dependency that is down: every restart fails before it is ready
    sys.exit(4)
if mode == "gauges":
    from prometheus_client import Gauge
    (folder / f"pid-{index}-{starts}").write_text(str(os.getpid()))
    Gauge("t_per_pid", "default mode: all").set(1)
    Gauge("t_live", "live", multiprocess_mode="livemax").set(1)
os.write(int(ready_fd), b"r")
if crashing:
    time.sleep(0.3)
    os._exit(5)  # dies once, after it was ready
if mode in ("dies-once", "gauges") and index == "0" and starts == 0:
    time.sleep(0.3)
    os.kill(os.getpid(), signal.SIGKILL)
while True:
    time.sleep(0.05)
"""


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.set_inheritable(True)
    yield sock
    sock.close()


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers, "BACKOFF_FIRST_S", 0.05)
    monkeypatch.setattr(workers, "BACKOFF_MAX_S", 0.1)


def _supervisor(mode: str, folder: Path, listener: socket.socket, n: int = 2) -> Supervisor:
    return Supervisor(
        [sys.executable, "-c", STAND_IN, mode, str(folder)], n, listener, stop_timeout_s=10
    )


def _stop_when(condition: object, timeout_s: float = 20.0) -> threading.Thread:
    """SIGTERM this process once ``condition()`` holds (the supervisor runs in the main thread)."""

    def watch() -> None:
        deadline = threading.Event()
        for _ in range(int(timeout_s / 0.05)):
            if condition():  # type: ignore[operator]
                break
            deadline.wait(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _starts(folder: Path, index: int) -> int:
    path = folder / f"starts-{index}"
    try:
        return int(path.read_text())
    except (OSError, ValueError):  # not there yet, or being rewritten
        return 0


def test_sigterm_stops_every_worker_with_exit_0(tmp_path: Path, listener: socket.socket) -> None:
    sup = _supervisor("serve", tmp_path, listener)
    _stop_when(lambda: sup.all_ready)
    assert sup.run() == 0
    assert all(slot.process is None for slot in sup.slots)
    metrics_dir = Path((tmp_path / "metrics-dir-0").read_text())
    assert metrics_dir == Path((tmp_path / "metrics-dir-1").read_text())
    assert not metrics_dir.exists()  # removed at exit


def test_workers_get_a_metrics_folder_inside_infercore_metrics_dir(
    tmp_path: Path, listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What `infercore deploy k8s` sets: the pod's root filesystem is read-only.
    parent = tmp_path / "pod-metrics"
    parent.mkdir()
    monkeypatch.setenv(workers.METRICS_PARENT_ENV, str(parent))
    sup = _supervisor("serve", tmp_path, listener)
    _stop_when(lambda: sup.all_ready)
    assert sup.run() == 0
    metrics_dir = Path((tmp_path / "metrics-dir-0").read_text())
    assert metrics_dir.parent == parent
    assert list(parent.iterdir()) == []  # removed at exit


def test_a_worker_that_fails_before_any_was_ready_stops_the_server(
    tmp_path: Path,
    listener: socket.socket,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="infercore.workers")
    sup = _supervisor("broken", tmp_path, listener)
    assert sup.run() == 3  # the worker's own exit code
    err = capfd.readouterr().err
    assert "infercore: error: model broken" in err
    assert "before any worker was ready; stopping" in err
    assert "received SIGTERM" not in caplog.text
    # No restart of a broken start-up. Which worker fails first is a race: the other one may
    # be stopped before its first line ran.
    assert max(_starts(tmp_path, 0), _starts(tmp_path, 1)) == 1


def test_a_worker_that_dies_is_restarted(tmp_path: Path, listener: socket.socket) -> None:
    sup = _supervisor("dies-once", tmp_path, listener)
    _stop_when(lambda: _starts(tmp_path, 0) == 2 and sup.slots[0].ready)
    assert sup.run() == 0
    assert _starts(tmp_path, 0) == 2 and _starts(tmp_path, 1) == 1


def test_a_crash_loop_while_another_worker_serves_keeps_retrying(
    tmp_path: Path,
    listener: socket.socket,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Worker 0 dies, and its restarts fail (the feature store is down) while worker 1 serves:
    # worker 1 keeps serving, and worker 0 is retried past MAX_START_FAILURES.
    caplog.set_level(logging.INFO, logger="infercore.workers")
    sup = _supervisor("crashloop", tmp_path, listener)
    _stop_when(lambda: _starts(tmp_path, 0) >= 3 + workers.MAX_START_FAILURES)
    assert sup.run() == 0
    assert _starts(tmp_path, 0) >= 3 + workers.MAX_START_FAILURES
    assert _starts(tmp_path, 1) == 1  # never stopped
    # Not given up on (the supervisor's own stop line); what stopped it is the test's signal.
    assert "no worker serves; stopping" not in capfd.readouterr().err
    log = caplog.text
    assert "worker 0 (pid " in log and "1 other worker(s) serve; restarting in" in log
    assert f"failed to start {workers.MAX_START_FAILURES} times in a row" in log
    assert f"failed to start {workers.MAX_START_FAILURES + 1} times in a row" in log
    assert log.count("received SIGTERM") == 1  # the test's own, at the end


def test_a_crash_loop_with_no_worker_serving_gives_up(
    tmp_path: Path,
    listener: socket.socket,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="infercore.workers")
    sup = _supervisor("crashloop-all", tmp_path, listener)
    assert sup.run() == 1
    starts = sorted((_starts(tmp_path, 0), _starts(tmp_path, 1)))
    # The first to fail MAX_START_FAILURES times in a row stops the server.
    assert starts[1] == 1 + workers.MAX_START_FAILURES, starts
    err = capfd.readouterr().err
    assert "times in a row (last: code 4) and no worker serves; stopping" in err
    assert f"failed to start {workers.MAX_START_FAILURES} times" in err
    # The log says why the server stops; no signal came.
    assert "failed to start and no worker serves" in caplog.text
    assert "received SIGTERM" not in caplog.text


def test_a_dead_workers_gauges_are_forgotten(tmp_path: Path, listener: socket.socket) -> None:
    # A worker killed with SIGKILL leaves its metrics files; the supervisor removes those of
    # its gauges (live modes, and the per-pid series of the default mode "all").
    sup = _supervisor("gauges", tmp_path, listener)
    files: list[str] = []

    def restarted() -> bool:
        if not (_starts(tmp_path, 0) == 2 and sup.slots[0].ready):
            return False
        files.extend(sorted(p.name for p in Path(sup.metrics_dir).iterdir()))
        return True

    _stop_when(restarted)
    assert sup.run() == 0
    dead, *live = (int((tmp_path / f"pid-{i}").read_text()) for i in ("0-0", "0-1", "1-0"))
    assert not [name for name in files if name.endswith(f"_{dead}.db")], files
    for pid in live:
        assert {f"gauge_all_{pid}.db", f"gauge_livemax_{pid}.db"} <= set(files), files


def _loopback_listener() -> tuple[socket.socket, int]:
    """A non-blocking listening socket on a free loopback port (a worker's shared socket)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    return listener, listener.getsockname()[1]


def _read_until_closed(client: socket.socket) -> bytes:
    """Everything the server sends, until it closes the connection (a reset raises)."""
    data = b""
    with client:
        while chunk := client.recv(65536):
            data += chunk
    return data


def test_a_held_listener_answers_its_queue_503_and_closes_at_the_signal() -> None:
    # A replacement worker still loading holds its copy of the shared socket without accepting
    # (GracefulShutdown.hold). At SIGTERM it closes that copy at once, and the connections
    # already queued on it get 503 shutting_down instead of a reset when the socket closes.
    listener, port = _loopback_listener()
    post = b"POST /v2/models/m/infer HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\n{}"
    get = b"GET /v2/health/live HTTP/1.1\r\nhost: t\r\n\r\n"
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in (post, get)]
    for client, request in zip(clients, (post, get), strict=True):
        client.sendall(request)

    async def main() -> list[bytes]:
        shutdown = GracefulShutdown(
            SimpleNamespace(should_exit=False), ShutdownState(), drain_delay_s=5.0
        )
        shutdown.is_ready = lambda: False  # still loading: no drain delay
        shutdown.hold([listener])
        shutdown.on_signal(signal.SIGTERM)
        assert listener.fileno() == -1  # closed in the signal's callback
        assert shutdown.release() == []  # nothing left to serve
        answers = await asyncio.gather(*(asyncio.to_thread(_read_until_closed, c) for c in clients))
        await asyncio.wait_for(shutdown.answered(), 5)
        return answers

    answers = asyncio.run(asyncio.wait_for(main(), 20))
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), answer
        assert b"connection: close" in answer and answer.endswith(b'"shutting_down"}')
    with pytest.raises(ConnectionRefusedError):  # the last copy is closed: new connects refused
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


@pytest.mark.parametrize("starved", [False, True], ids=["idle", "starved"])
def test_a_signal_while_uvicorn_takes_the_released_listener_closes_it_once_open(
    starved: bool,
) -> None:
    # The listener was held while the models loaded, then released to uvicorn; the signal
    # comes before uvicorn has opened its listeners on it (its start-up, milliseconds). Closed
    # at once, there was nothing to close: uvicorn then opened them and returned without
    # serving or closing them, so the socket kept accepting for a process about to exit.
    import contextlib

    import uvicorn

    listener, port = _loopback_listener()
    # Generous (a loaded machine can starve the event loop for seconds): a connection the
    # server never closes still fails the read, with a timeout.
    queued = socket.create_connection(("127.0.0.1", port), timeout=15)
    queued.sendall(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":  # as infercore's app: uvicorn's start-up awaits it
            while (await receive())["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main() -> bytes:
        # As infercore's app: ShutdownMiddleware closes each connection after its answer once
        # the signal came. Without it, a connection adopted or shut down before its request
        # was read (the event loop starved past uvicorn's first 0.1 s tick: a loaded machine)
        # stays open after its answer for uvicorn's keep-alive timeout (5 s), as long as the
        # client's read timeout was.
        state = ShutdownState()
        config = uvicorn.Config(
            ShutdownMiddleware(app, state), lifespan="on", log_level="warning", http=http_protocol()
        )
        server = uvicorn.Server(config)
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
        shutdown = GracefulShutdown(server, state, drain_delay_s=0.0)
        shutdown.hold([listener])
        sockets = shutdown.release()
        serving = asyncio.create_task(server.serve(sockets=sockets))
        shutdown.on_signal(signal.SIGTERM)  # before uvicorn ran at all
        if starved:
            # A loaded machine: the event loop stalls just after uvicorn started, so that the
            # close's next look and uvicorn's first tick fall due together, before the queued
            # connection's request was read (the CI flake's sequence, made certain).
            async def stall() -> None:
                while not server.started:
                    await asyncio.sleep(0)
                time.sleep(0.15)

            stalling = asyncio.create_task(stall())
        answer = await asyncio.to_thread(_read_until_closed, queued)
        await asyncio.wait_for(serving, 10)
        await asyncio.wait_for(shutdown.answered(), 10)
        if starved:
            await stalling
        return answer

    answer = asyncio.run(asyncio.wait_for(main(), 20))
    assert answer.startswith(b"HTTP/1.1 "), answer  # answered, not dropped
    with pytest.raises(ConnectionRefusedError):  # and the listener closed for good
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
