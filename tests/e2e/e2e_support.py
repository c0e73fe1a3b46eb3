"""Real ``infercore serve`` processes on loopback: start, wait until ready, stop with SIGTERM.

The e2e tests import this module by its own name (``import e2e_support as e2e``): every test
folder of the workspace has a conftest.py, so ``import conftest`` would find whichever one was
imported last. The fixtures are in this folder's conftest.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
IRIS_ONNX = REPO / "recipes" / "iris" / "artifacts" / "model.onnx"
INFERCORE = Path(sys.executable).parent / "infercore"

#: The artifact is built by recipes/iris/train.py; wait this long for it to appear.
ARTIFACT_WAIT_S = 600.0
READY_WAIT_S = 30.0
STOP_WAIT_S = 20.0


@dataclass(frozen=True)
class Server:
    """A running server process."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_artifact(path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.is_file() or path.stat().st_size == 0:
        if time.monotonic() > deadline:
            pytest.fail(
                f"{path} did not appear within {timeout_s:.0f} s "
                "(build it: uv run python recipes/iris/train.py)"
            )
        time.sleep(2.0)
    # A file still being written may be short: wait until its size settles.
    size = -1
    while size != path.stat().st_size:
        size = path.stat().st_size
        time.sleep(0.2)


def start_server(overrides: list[str], log: Path, port: int | None = None) -> Server:
    port = port or free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("INFERCORE_PORT", None)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(INFERCORE), "serve", *overrides, f"server.port={port}"],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    return Server(process, port, log)


def wait_ready(server: Server, timeout_s: float = READY_WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=server.url, timeout=2.0) as client:
        while True:
            if server.process.poll() is not None:
                pytest.fail(
                    f"the server exited with {server.process.returncode} before it was "
                    f"ready:\n{server.log_text()}"
                )
            try:
                if client.get("/v2/health/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                stop_server(server)
                pytest.fail(
                    f"the server was not ready within {timeout_s:.0f} s:\n{server.log_text()}"
                )
            time.sleep(0.1)


def wait_ready_uds(
    process: subprocess.Popen[bytes], path: str | Path, log: Path, timeout_s: float = READY_WAIT_S
) -> None:
    """Wait until a server on the Unix socket ``path`` answers ready; fail with its log if it
    exits first or is not ready within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    transport = httpx.HTTPTransport(uds=str(path))
    with httpx.Client(transport=transport, base_url="http://localhost", timeout=5.0) as client:
        while True:
            if process.poll() is not None:
                pytest.fail(f"exited with {process.returncode}:\n{log.read_text()}")
            try:
                if client.get("/v2/health/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"not ready on {path} within {timeout_s:.0f} s:\n{log.read_text()}")
            time.sleep(0.1)


def stop_server(server: Server, timeout_s: float = STOP_WAIT_S) -> int | None:
    """SIGTERM, then wait; kill on timeout. Returns the exit code (None if it had to be killed)."""
    process = server.process
    if process.poll() is not None:
        return process.returncode
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
        return None


class Launcher:
    """Starts extra server processes for one test and stops whatever is left at its end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.servers: list[Server] = []

    def start(self, overrides: list[str], *, ready: bool = True) -> Server:
        server = start_server(overrides, self.folder / f"server-{len(self.servers)}.log")
        self.servers.append(server)
        if ready:
            wait_ready(server)
        return server

    def stop(self, server: Server) -> int | None:
        return stop_server(server)

    def close(self) -> None:
        for server in self.servers:
            stop_server(server)
