"""``deploy=sidecar``: a real ``infercore serve +recipe=fraud deploy=sidecar`` serves over a Unix
domain socket (nothing on TCP), answers V2 and V1 requests there, is probed by
``python -m infercore.deploy.probe --uds``, refuses a socket another server holds, and removes
its socket when it stops (exit 0)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import e2e_support as e2e
import httpx
import pytest

pytestmark = pytest.mark.e2e


READY_WAIT_S = 60.0  # the fraud recipe applies and materializes its Feast store first
TXN = {
    "card_id": "c_000042",
    "amount": 12.5,
    "hour": 3,
    "cross_border": 0,
    "merchant_category": "grocery",
    "channel": "pos",
    "country": "US",
}


def _uds_client(path: str) -> httpx.Client:
    # The host part is ignored on a Unix socket; "localhost" is what applications use.
    return httpx.Client(
        transport=httpx.HTTPTransport(uds=path), base_url="http://localhost", timeout=10.0
    )


def _probe(path: str, target: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "infercore.deploy.probe", "--uds", path, target],
        capture_output=True,
        text=True,
        timeout=20,
    )


@pytest.fixture(scope="module")
def sidecar(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[subprocess.Popen[bytes], str, Path, int]]:
    # A short folder: a socket path must fit in 107 bytes.
    folder = Path(tempfile.mkdtemp(prefix="ic-sc-", dir="/tmp"))
    state = tmp_path_factory.mktemp("fraud-state")
    sock = str(folder / "run" / "infercore.sock")  # `run/` does not exist yet: created 0700
    log = state / "server.log"
    port = e2e.free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("INFERCORE_UDS", None)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                str(e2e.INFERCORE),
                "serve",
                "+recipe=fraud",
                "deploy=sidecar",
                f"server.uds={sock}",
                f"server.port={port}",  # ignored with a socket: checked below
                f"++features.registry_path={state / 'registry.db'}",
                f"++features.sqlite_path={state / 'online_store.db'}",
            ],
            cwd=e2e.REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        e2e.wait_ready_uds(process, sock, log, READY_WAIT_S)
        yield process, sock, log, port
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


def test_serves_v2_and_v1_over_the_unix_socket_and_nothing_on_tcp(
    sidecar: tuple[subprocess.Popen[bytes], str, Path, int],
) -> None:
    _, sock, log, port = sidecar
    assert Path(sock).is_socket()
    assert (Path(sock).parent.stat().st_mode & 0o777) == 0o700
    with _uds_client(sock) as client:
        assert client.get("/v2/health/live").json() == {"live": True}
        meta = client.get("/v2/models/fraud").json()
        assert meta["name"] == "fraud"
        v1 = client.post("/v1/models/fraud:predict", json={"instances": [TXN]})
        assert v1.status_code == 200, v1.text
        (prediction,) = v1.json()["predictions"]
        assert 0.0 <= prediction["fraud_probability"] <= 1.0
        assert isinstance(prediction["is_fraud"], bool)
        bad = client.post("/v1/models/fraud:predict", json={"instances": [{**TXN, "amount": -1}]})
        assert bad.status_code == 400 and bad.json()["reason"] == "invalid_input"
        metrics = client.get("/metrics").text
        assert 'infercore_requests_total{code="200",model="fraud",version="1"}' in metrics
    # The port in the config is not used: nothing listens on TCP.
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", port))
    # INFO names the socket by its config key, not by its path (S6).
    text = log.read_text()
    assert "starting recipe=fraud on the Unix socket server.uds" in text
    assert sock not in text


def test_probe_module_checks_health_over_the_socket(
    sidecar: tuple[subprocess.Popen[bytes], str, Path, int],
) -> None:
    _, sock, _, _ = sidecar
    assert _probe(sock, "/v2/health/live").returncode == 0
    assert _probe(sock, "/v2/health/ready").returncode == 0
    missing = _probe(sock, "/v2/models/nope/ready")
    assert missing.returncode == 1 and "404" in missing.stderr


def test_a_socket_in_use_is_refused(
    sidecar: tuple[subprocess.Popen[bytes], str, Path, int],
) -> None:
    _, sock, _, _ = sidecar
    second = subprocess.run(
        [str(e2e.INFERCORE), "serve", "+recipe=iris", "deploy=sidecar", f"server.uds={sock}"],
        cwd=e2e.REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 2
    assert "another server is listening on this socket" in second.stderr
    with _uds_client(sock) as client:  # the first server still has it
        assert client.get("/v2/health/live").status_code == 200


def test_sigterm_drains_then_removes_the_socket(
    sidecar: tuple[subprocess.Popen[bytes], str, Path, int],
) -> None:
    process, sock, log, _ = sidecar
    with _uds_client(sock) as client:
        assert client.post("/v1/models/fraud:predict", json={"instances": [TXN]}).status_code == 200
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=20)
    assert code == 0, log.read_text()
    assert not os.path.exists(sock)
    assert _probe(sock, "/v2/health/live").returncode == 1
    text = log.read_text()
    assert "Traceback" not in text, text


def test_a_stale_socket_file_is_replaced_and_a_regular_file_refused(
    iris_onnx: Path, tmp_path: Path
) -> None:
    folder = Path(tempfile.mkdtemp(prefix="ic-st-", dir="/tmp"))
    try:
        stale = folder / "stale.sock"
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(stale))  # bound, never listening: what a killed process leaves
        regular = folder / "file.sock"
        regular.write_text("not a socket")
        refused = subprocess.run(
            [
                str(e2e.INFERCORE),
                "serve",
                "+recipe=iris",
                "deploy=sidecar",
                f"server.uds={regular}",
            ],
            cwd=e2e.REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode == 2
        assert "exists and is not a socket" in refused.stderr
        assert regular.read_text() == "not a socket"

        log = tmp_path / "iris.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [
                    str(e2e.INFERCORE),
                    "serve",
                    "+recipe=iris",
                    "deploy=sidecar",
                    f"server.uds={stale}",
                ],
                cwd=e2e.REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            e2e.wait_ready_uds(process, str(stale), log, READY_WAIT_S)
            with _uds_client(str(stale)) as client:
                r = client.post(
                    "/v1/models/iris:predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]]}
                )
                assert r.json()["predictions"][0]["label"] == 0
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=20) == 0, log.read_text()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
