"""Refused request heads (431/414/408) are counted by real ``infercore serve`` processes,
and so are malformed bodies (400).

On the inference listener they count one code and one reason each under ``model=""``,
``version=""`` (no model is known from a head refused unread), adding up over the worker
processes of ``server.workers=2`` as every other count does; the admin listener's refusals are
not inference requests and are not counted. A head or a malformed body refused behind a
pipelined request gets its own answer after that request's, on uvloop as ``infercore serve``
runs it.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import e2e_support as e2e
import httpx
import psutil
import pytest

from infercore.testing import unrouted_counts

pytestmark = pytest.mark.e2e

CAP = 2048
LIVE = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
BIG = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (CAP + 100) + b"\r\n\r\n"
PARTIAL = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n"  # and nothing more
#: An inference request whose chunked body the parser refuses: a chunk-size line not in hex.
BAD_CHUNKED = (
    b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\nzz\r\n"
)
CONNECTIONS = 8
ROUNDS = 5


def _read_all(s: socket.socket) -> bytes:
    received = b""
    while chunk := s.recv(65536):
        received += chunk
    return received


def _exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        return _read_all(s)


def _refused(url: str) -> dict[str, float]:
    """What ``/metrics`` counts under no model: codes and reasons (zeros left out)."""
    return unrouted_counts(httpx.get(f"{url}/metrics", timeout=5).text)


def _owner_of(workers: list[psutil.Process], client_port: int) -> int | None:
    for proc in workers:
        for conn in proc.net_connections(kind="tcp"):
            if conn.raddr and conn.raddr.port == client_port and conn.status == "ESTABLISHED":
                return int(proc.pid)
    return None


def _late_heads(port: int, workers: list[psutil.Process]) -> tuple[list[bytes], set[int | None]]:
    """CONNECTIONS connections that each send an unfinished head; the answers, and the PIDs
    of the workers that held them (read while they wait for their 408)."""
    sockets = [
        socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(CONNECTIONS)
    ]
    try:
        for s in sockets:
            s.sendall(PARTIAL)
        time.sleep(0.2)  # accepted and read by now (each waits a second for its 408)
        owners = {_owner_of(workers, s.getsockname()[1]) for s in sockets}
        return [_read_all(s) for s in sockets], owners
    finally:
        for s in sockets:
            s.close()


def test_refused_heads_add_up_over_the_workers(launcher: e2e.Launcher, iris_onnx: Path) -> None:
    server = launcher.start(
        [
            "+recipe=iris",
            "server.workers=2",
            f"server.max_header_bytes={CAP}",
            "server.header_timeout_ms=1000",
        ]
    )
    supervisor = psutil.Process(server.process.pid)
    deadline = time.monotonic() + 30
    while len(workers := supervisor.children()) != 2:
        assert time.monotonic() < deadline, "two workers did not start"
        time.sleep(0.1)

    # The kernel hands each connection to one worker waiting in accept(); a round may land on
    # one worker only.
    late = 0
    owners: set[int | None] = set()
    for _ in range(ROUNDS):
        answers, round_owners = _late_heads(server.port, workers)
        assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), answers
        late += len(answers)
        owners |= round_owners
        if len(owners) == 2:
            break
    assert owners == {w.pid for w in workers}, (owners, [w.pid for w in workers])

    for _ in range(3):
        assert _exchange(server.port, BIG).startswith(b"HTTP/1.1 431 ")
    # Pipelined behind a request (uvloop, as served): the 200, then the 431, then the close.
    received = _exchange(server.port, LIVE + BIG)
    first, _, second = received.partition(b'{"live":true}')
    assert first.startswith(b"HTTP/1.1 200 OK\r\n"), received[:300]
    assert second.startswith(b"HTTP/1.1 431 ") and second.endswith(b'"headers_too_large"}')

    # Whichever worker answers /metrics reports the total of both.
    for _ in range(4):
        assert _refused(server.url) == {
            "408": float(late),
            "431": 4.0,
            "request_timeout": float(late),
            "headers_too_large": 4.0,
        }
    assert launcher.stop(server) == 0, server.log_text()


def test_the_admin_listener_s_refused_heads_are_not_counted(
    launcher: e2e.Launcher, iris_onnx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INFERCORE_ADMIN_TOKEN", "t" * 32)
    admin_port = e2e.free_port()
    server = launcher.start(
        [
            "+recipe=iris",
            f"server.max_header_bytes={CAP}",
            "server.header_timeout_ms=300",
            "admin.enabled=true",
            f"admin.port={admin_port}",
        ]
    )
    for port in (admin_port, server.port):
        assert _exchange(port, BIG).startswith(b"HTTP/1.1 431 ")
        assert _exchange(port, PARTIAL).startswith(b"HTTP/1.1 408 ")
        received = _exchange(port, BAD_CHUNKED)
        assert received.startswith(b"HTTP/1.1 400 "), received[:300]
        assert received.endswith(b'"reason": "invalid_input"}'), received[-300:]
    # Pipelined behind a request (uvloop, as served): the 200, then the 400, then the close.
    received = _exchange(server.port, LIVE + BAD_CHUNKED)
    first, _, second = received.partition(b'{"live":true}')
    assert first.startswith(b"HTTP/1.1 200 OK\r\n"), received[:300]
    assert second.startswith(b"HTTP/1.1 400 ") and b"malformed HTTP request body" in second
    assert _refused(server.url) == {
        "431": 1.0,
        "408": 1.0,
        "400": 2.0,
        "headers_too_large": 1.0,
        "request_timeout": 1.0,
        "invalid_input": 2.0,
    }
    assert launcher.stop(server) == 0, server.log_text()
