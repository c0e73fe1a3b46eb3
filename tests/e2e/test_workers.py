"""``server.workers=2``: a supervisor and two worker processes on one socket.

Real processes on loopback: requests spread over both workers, ``/metrics`` from whichever
worker answers adds up every worker's counts, SIGTERM stops everything with exit 0 and removes
the metrics folder, a worker killed with SIGKILL is replaced while the other keeps answering,
a broken model stops start-up with its error line and a non-zero exit, and a SIGTERM while a
replacement worker still loads leaves no connection accepted and then reset.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import e2e_support as e2e
import httpx
import psutil
import pytest

pytestmark = pytest.mark.e2e


BODY = {
    "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]
}
INFER = "/v2/models/iris/infer"
CONNECTIONS = 16
PER_CONNECTION = 10
ROUNDS = 5
REQUESTS_TOTAL = re.compile(r"^infercore_requests_total\{([^}]*)\} ([0-9.e+]+)$", re.M)


@pytest.fixture
def launcher(tmp_path: Path, iris_onnx: Path) -> object:
    launcher = e2e.Launcher(tmp_path)
    try:
        yield launcher
    finally:
        launcher.close()


def _workers(server: object, count: int = 2, timeout_s: float = 30.0) -> list[psutil.Process]:
    """The supervisor's worker processes, once there are ``count`` of them."""
    supervisor = psutil.Process(server.process.pid)  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout_s
    while True:
        children = supervisor.children()
        if len(children) == count:
            return children
        assert time.monotonic() < deadline, f"{len(children)} workers, expected {count}"
        time.sleep(0.1)


def _owner_of(workers: list[psutil.Process], client_port: int) -> int | None:
    for proc in workers:
        for conn in proc.net_connections(kind="tcp"):
            if conn.raddr and conn.raddr.port == client_port and conn.status == "ESTABLISHED":
                return proc.pid
    return None


def _requests_total(text: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for labels, value in REQUESTS_TOTAL.findall(text):
        code = re.search(r'code="(\d+)"', labels)
        assert code is not None
        totals[code.group(1)] = totals.get(code.group(1), 0.0) + float(value)
    return totals


def _load(url: str, workers: list[psutil.Process]) -> tuple[list[int], set[int | None]]:
    """CONNECTIONS threads, each on its own connection; returns the status codes and the PIDs
    of the workers that held the connections (read while every connection is still open)."""
    statuses: list[int] = []
    ports: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(CONNECTIONS)
    hold = threading.Barrier(CONNECTIONS + 1)  # the threads and the test

    def run() -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        with httpx.Client(base_url=url, timeout=10.0, limits=limits) as client:
            start.wait()
            for i in range(PER_CONNECTION):
                response = client.post(INFER, json=BODY)
                with lock:
                    statuses.append(response.status_code)
                if i == 0:
                    stream = response.extensions["network_stream"]
                    with lock:
                        ports.append(stream.get_extra_info("client_addr")[1])
            hold.wait()  # every thread has answered: the test reads the owners now
            hold.wait()

    threads = [threading.Thread(target=run) for _ in range(CONNECTIONS)]
    for t in threads:
        t.start()
    hold.wait(timeout=60)
    owners = {_owner_of(workers, port) for port in ports}
    hold.wait(timeout=60)
    for t in threads:
        t.join(timeout=30)
    return statuses, owners


def test_two_workers_share_the_socket_and_the_metrics_add_up(launcher: object) -> None:
    server = launcher.start(["+recipe=iris", "server.workers=2"])  # type: ignore[attr-defined]
    workers = _workers(server)
    folder = Path(workers[0].environ()["PROMETHEUS_MULTIPROC_DIR"])
    assert folder.is_dir() and (folder.stat().st_mode & 0o777) == 0o700

    # The kernel hands each connection to one worker waiting in accept(); a worker that wakes
    # first may take every queued connection, so a round may land on one worker only.
    sent = 0
    owners: set[int | None] = set()
    for _ in range(ROUNDS):
        statuses, round_owners = _load(server.url, workers)
        assert statuses == [200] * (CONNECTIONS * PER_CONNECTION)
        sent += len(statuses)
        owners |= round_owners
        if len(owners) == 2:
            break
    # Both worker processes answered requests.
    assert owners == {w.pid for w in workers}, (owners, [w.pid for w in workers])

    # Whichever worker answers /metrics reports the total of both.
    for _ in range(4):
        text = httpx.get(f"{server.url}/metrics", timeout=5).text
        assert _requests_total(text) == {"200": float(sent)}, text
        assert 'infercore_model_ready{model="iris",version="1"} 1.0' in text
        assert 'infercore_inflight_requests{model="iris",version="1"} 0.0' in text

    assert launcher.stop(server) == 0, server.log_text()  # type: ignore[attr-defined]
    assert not folder.exists(), "the metrics folder outlived the server"
    for proc in workers:
        assert not proc.is_running()
    assert "Traceback" not in server.log_text()


def test_a_killed_worker_is_replaced_and_the_server_keeps_answering(launcher: object) -> None:
    server = launcher.start(["+recipe=iris", "server.workers=2"])  # type: ignore[attr-defined]
    victim, survivor = _workers(server)
    with httpx.Client(base_url=server.url, timeout=10.0) as client:
        for _ in range(20):
            assert client.post(INFER, json=BODY).status_code == 200
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)

    # Meanwhile every new connection is answered (by the survivor, or by the replacement
    # once its model is ready: it listens only then).
    answered = 0
    deadline = time.monotonic() + 60
    replaced = False
    while time.monotonic() < deadline and not (replaced and answered >= 40):
        with httpx.Client(base_url=server.url, timeout=10.0) as client:
            assert client.post(INFER, json=BODY).status_code == 200
        answered += 1
        pids = {p.pid for p in psutil.Process(server.process.pid).children()}  # type: ignore[attr-defined]
        new = pids - {victim.pid, survivor.pid}
        replaced = (
            len(pids) == 2
            and len(new) == 1
            and survivor.pid in pids
            and f"(pid {min(new)}) ready" in server.log_text()  # type: ignore[attr-defined]
        )
    assert replaced, server.log_text()  # type: ignore[attr-defined]
    assert "worker 0" in server.log_text() or "worker 1" in server.log_text()
    assert "restarting in" in server.log_text()

    # The dead worker's counts still add up (its samples stay in the folder).
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    assert _requests_total(text) == {"200": float(20 + answered)}, text
    assert launcher.stop(server) == 0, server.log_text()  # type: ignore[attr-defined]


def test_a_broken_model_stops_start_up_with_its_error(launcher: object, tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    server = launcher.start(  # type: ignore[attr-defined]
        [
            "+recipe=iris",
            "server.workers=2",
            f"model_root={tmp_path}",
            "models.iris.versions.1.loader.path=broken.onnx",
        ],
        ready=False,
    )
    code = server.process.wait(timeout=60)
    log = server.log_text()
    assert code == 1, log
    assert "infercore: error:" in log and "models.iris.versions.1.loader" in log, log
    assert "before any worker was ready" in log
    assert "Traceback" not in log


def test_two_workers_on_the_sidecar_unix_socket(launcher: object, tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    server = launcher.start(  # type: ignore[attr-defined]
        ["+recipe=iris", "deploy=sidecar", "server.workers=2", f"server.uds={sock}"], ready=False
    )
    transport = httpx.HTTPTransport(uds=str(sock))
    deadline = time.monotonic() + e2e.READY_WAIT_S
    with httpx.Client(transport=transport, base_url="http://localhost", timeout=5.0) as client:
        while True:
            assert server.process.poll() is None, server.log_text()
            try:
                if client.get("/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, server.log_text()
            time.sleep(0.1)
        for _ in range(10):
            assert client.post(INFER, json=BODY).status_code == 200
        assert _requests_total(client.get("/metrics").text) == {"200": 10.0}
    assert len(_workers(server)) == 2
    assert launcher.stop(server) == 0, server.log_text()  # type: ignore[attr-defined]
    assert not sock.exists(), "the socket file outlived the server"


# Imported at start-up by every process of the server (PYTHONPATH): a replacement worker (one
# started while the others serve, its context ending in ":1") loads its models only once the
# gate file exists, and says when it began, so the test stops the server while it is loading.
GATED_RESTART = """
import os
gate = os.environ.get("INFERCORE_TEST_LOAD_GATE")
if gate and os.environ.get("INFERCORE_WORKER", "").endswith(":1"):
    import asyncio, time
    from pathlib import Path
    from infercore.runtime import Runtime

    start = Runtime.start

    async def gated_start(self):
        Path(gate + ".loading").write_text(str(os.getpid()))
        end = time.monotonic() + 60
        while not Path(gate).exists() and time.monotonic() < end:
            await asyncio.sleep(0.05)
        await start(self)

    Runtime.start = gated_start
"""


def _probe(port: int) -> str:
    """One new connection and one request: "refused", the status line, or what went wrong."""
    try:
        conn = socket.create_connection(("127.0.0.1", port), timeout=2.0)
    except ConnectionRefusedError:
        return "refused"
    with conn:
        conn.settimeout(3.0)
        try:
            conn.sendall(b"GET /v2/health/live HTTP/1.1\r\nhost: test\r\n\r\n")
            data = conn.recv(65536)
        except TimeoutError:
            return "accepted, unanswered"
        except ConnectionResetError:
            return "reset"
    return data.split(b"\r\n", 1)[0].decode() if data else "closed without an answer"


def test_sigterm_while_a_replacement_worker_loads_resets_no_connection(
    launcher: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(GATED_RESTART)
    gate = tmp_path / "gate"
    loading = tmp_path / "gate.loading"
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    )
    monkeypatch.setenv("INFERCORE_TEST_LOAD_GATE", str(gate))
    server = launcher.start(  # type: ignore[attr-defined]
        ["+recipe=iris", "server.workers=2", "server.drain_delay_s=0.2"]
    )
    try:
        victim, survivor = _workers(server)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        deadline = time.monotonic() + 30
        while not loading.exists():  # the replacement started and is loading its models
            assert time.monotonic() < deadline, server.log_text()  # type: ignore[attr-defined]
            time.sleep(0.05)
        replacement = int(loading.read_text())

        server.process.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
        survivor.wait(timeout=30)  # the serving worker drained and closed its copy of the socket
        # Nobody serves now, and the replacement is still loading. A new connection is
        # refused, or answered 503: never accepted into a queue nobody reads, then reset.
        outcomes = [_probe(server.port) for _ in range(3)]  # type: ignore[attr-defined]
        assert all(o in ("refused", "HTTP/1.1 503 Service Unavailable") for o in outcomes), outcomes
    finally:
        gate.touch()  # the replacement finishes loading

    assert server.process.wait(timeout=30) == 0, server.log_text()  # type: ignore[attr-defined]
    log = server.log_text()  # type: ignore[attr-defined]
    # Told to stop while loading, the replacement never reports ready.
    assert f"(pid {replacement}) ready" not in log, log
    assert "loaded after the stop signal; not serving" in log, log
    assert "Traceback" not in log
