"""``server.uds``: a server removes its socket file when it stops, and only its own.

A real ``infercore serve +recipe=iris deploy=sidecar`` with one worker and with two (the
supervisor binds the socket then); while it serves, the test removes the socket file and binds
its own listening socket at the same path, a stand-in for a second server. After SIGTERM the
first server exits 0 and the second's socket is still there, answering. Without the
replacement, the server's own file is removed. A stale socket file (what a killed server leaves)
is replaced with either worker count.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import e2e_support as e2e
import pytest

pytestmark = pytest.mark.e2e

STOP_WAIT_S = 30.0
READY_WAIT_S = e2e.READY_WAIT_S * 2  # two workers load on two cores


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # A Unix socket path must fit in 107 bytes: pytest's tmp_path may not.
    folder = Path(tempfile.mkdtemp(prefix="ic-own-", dir="/tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _start(sock: Path, workers: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("INFERCORE_UDS", None)
    with log.open("wb") as out:
        return subprocess.Popen(
            [
                str(e2e.INFERCORE),
                "serve",
                "+recipe=iris",
                "deploy=sidecar",
                f"server.uds={sock}",
                f"server.workers={workers}",
            ],
            cwd=e2e.REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )


def _stop(process: subprocess.Popen[bytes], log: Path) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
        pytest.fail(f"ignored SIGTERM for {STOP_WAIT_S:.0f} s:\n{log.read_text()}")
    text = log.read_text()
    assert code == 0, text
    assert "Traceback" not in text, text


def _answers(sock: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(str(sock))
        except OSError:
            return False
    return True


@pytest.mark.parametrize("workers", [1, 2])
def test_a_replaced_socket_file_is_left_to_its_new_owner(
    iris_onnx: Path, short_dir: Path, workers: int
) -> None:
    sock = short_dir / "run" / "s.sock"
    log = short_dir / "server.log"
    process = _start(sock, workers, log)
    second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        e2e.wait_ready_uds(process, sock, log, READY_WAIT_S)
        # Removed by hand, then bound anew by a second server, while the first still runs.
        sock.unlink()
        second.bind(str(sock))
        second.listen()
        theirs = os.lstat(sock)
        _stop(process, log)
        assert sock.is_socket(), "the first server removed the second server's socket file"
        now = os.lstat(sock)
        assert (now.st_dev, now.st_ino) == (theirs.st_dev, theirs.st_ino)
        assert _answers(sock)  # new clients still reach the second server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        second.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_server_removes_its_own_socket_file_at_exit(
    iris_onnx: Path, short_dir: Path, workers: int
) -> None:
    sock = short_dir / "run" / "s.sock"
    log = short_dir / "server.log"
    process = _start(sock, workers, log)
    try:
        e2e.wait_ready_uds(process, sock, log, READY_WAIT_S)
        assert (sock.stat().st_mode & 0o777) == 0o666  # anyone on the host, as uvicorn does
        _stop(process, log)
        assert not os.path.lexists(sock), "the socket file outlived its server"
        # INFO logs name the socket by its config key, never its path (RELIABILITY S6); with
        # two workers the supervisor's line too.
        text = log.read_text()
        assert "server.uds" in text and str(short_dir) not in text, text
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_stale_socket_file_is_replaced(iris_onnx: Path, short_dir: Path, workers: int) -> None:
    sock = short_dir / "s.sock"
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(sock))  # bound, never listening: what a killed server leaves behind
    log = short_dir / "server.log"
    process = _start(sock, workers, log)
    try:
        e2e.wait_ready_uds(process, sock, log, READY_WAIT_S)
        _stop(process, log)
        assert not os.path.lexists(sock)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
