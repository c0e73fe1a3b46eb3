"""The supervisor of ``server.workers`` (infercore.server.workers) with stand-in worker processes.

The stand-ins speak the supervisor's protocol (the ``INFERCORE_WORKER`` context, the ready
pipe, signals) without loading anything, so restart and give-up rules run in a second or two.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from infercore.server import workers
from infercore.server.workers import Supervisor

STAND_IN = r"""
import os, signal, sys, time
from pathlib import Path

index, _, ready_fd, _, _, _ = os.environ["INFERCORE_WORKER"].split(":")
mode, folder = sys.argv[1], Path(sys.argv[2])
counter = folder / f"starts-{index}"
starts = int(counter.read_text()) if counter.exists() else 0
counter.write_text(str(starts + 1))
(folder / f"metrics-dir-{index}").write_text(os.environ["PROMETHEUS_MULTIPROC_DIR"])
if mode == "broken":
    print("infercore: error: model broken", file=sys.stderr)
    sys.exit(3)
if mode == "crashloop" and index == "0" and starts > 0:
    sys.exit(4)  # every restart fails before it is ready
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
os.write(int(ready_fd), b"r")
if mode == "crashloop" and index == "0":
    time.sleep(0.3)
    os._exit(5)  # dies once, after it was ready
if mode == "dies-once" and index == "0" and starts == 0:
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
    return int(path.read_text()) if path.exists() else 0


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
    tmp_path: Path, listener: socket.socket, capfd: pytest.CaptureFixture[str]
) -> None:
    sup = _supervisor("broken", tmp_path, listener)
    assert sup.run() == 3  # the worker's own exit code
    err = capfd.readouterr().err
    assert "infercore: error: model broken" in err
    assert "before any worker was ready; stopping" in err
    # No restart of a broken start-up. Which worker fails first is a race: the other one may
    # be stopped before its first line ran.
    assert max(_starts(tmp_path, 0), _starts(tmp_path, 1)) == 1


def test_a_worker_that_dies_is_restarted(tmp_path: Path, listener: socket.socket) -> None:
    sup = _supervisor("dies-once", tmp_path, listener)
    _stop_when(lambda: _starts(tmp_path, 0) == 2 and sup.slots[0].ready)
    assert sup.run() == 0
    assert _starts(tmp_path, 0) == 2 and _starts(tmp_path, 1) == 1


def test_a_crash_loop_at_start_up_gives_up(
    tmp_path: Path, listener: socket.socket, capfd: pytest.CaptureFixture[str]
) -> None:
    sup = _supervisor("crashloop", tmp_path, listener)
    assert sup.run() == 1
    assert _starts(tmp_path, 0) == 1 + workers.MAX_START_FAILURES
    err = capfd.readouterr().err
    assert f"worker 0 failed to start {workers.MAX_START_FAILURES} times in a row" in err
