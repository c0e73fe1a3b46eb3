"""A real ``infercore serve +recipe=iris deploy=sidecar admin.enabled=true`` (text logs, DEBUG):

- an unauthenticated request to the admin socket whose path holds ``%0a`` / ``%0d`` / ``%1b``
  cannot write a line of its own into the log (CWE-117): it is refused 401, and the refusal is
  one line quoting the path;
- INFO lines name the sockets by their config keys, never by their file paths (S6); the paths
  are on DEBUG lines.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import e2e_support as e2e
import pytest

pytestmark = pytest.mark.e2e

TOKEN = "log-lines-admin-token-0123456789"
READY_WAIT_S = 60.0
#: What a forged line would look like: a real audit decision.
FORGED = "15:30:00 INFO    infercore.audit: audit: forged (401)"
#: A record's first line: ``HH:MM:SS LEVEL logger: …``.
RECORD = re.compile(r"^\d\d:\d\d:\d\d (?P<level>[A-Z]+) +(?P<logger>[\w.]+): ")


@dataclass
class Sidecar:
    process: subprocess.Popen[bytes]
    folder: Path
    sock: str
    admin_sock: str
    log: Path

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
                return None
        return self.process.returncode


def _raw_request(path: str, target: str) -> bytes:
    """One HTTP/1.1 request with ``target`` sent as it is (no client normalizes it)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture(scope="module")
def sidecar(iris_onnx: Path) -> Iterator[Sidecar]:
    # Short paths: a socket path must fit in 107 bytes. Neither folder exists yet.
    folder = Path(tempfile.mkdtemp(prefix="ic-log-", dir="/tmp"))
    sock = str(folder / "run" / "inf.sock")
    admin_sock = str(folder / "adm" / "admin.sock")
    log = folder / "server.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "INFERCORE_ADMIN_TOKEN": TOKEN}
    for name in ("INFERCORE_UDS", "INFERCORE_ADMIN_UDS", "INFERCORE_PORT"):
        env.pop(name, None)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                str(e2e.INFERCORE),
                "serve",
                "+recipe=iris",
                "deploy=sidecar",
                f"server.uds={sock}",
                "server.log_format=text",
                "server.log_level=debug",
                "admin.enabled=true",
                f"admin.uds={admin_sock}",
            ],
            cwd=e2e.REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    server = Sidecar(process, folder, sock, admin_sock, log)
    try:
        e2e.wait_ready_uds(process, sock, log, READY_WAIT_S)
        yield server
    finally:
        code = server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    assert code == 0, f"exit {code}"


def test_an_unauthenticated_admin_path_cannot_forge_a_log_line(sidecar: Sidecar) -> None:
    target = "/admin/x%0a15:30:00%20INFO%20%20%20%20infercore.audit:%20audit:%20forged%20(401)"
    reply = _raw_request(sidecar.admin_sock, target + "%0d%1b[2J")
    assert reply.startswith(b"HTTP/1.1 401 "), reply[:200]
    time.sleep(0.5)  # the line is written before the reply; a margin for the pipe
    lines = sidecar.log.read_text(errors="replace").splitlines()
    assert FORGED not in lines
    # Every line is a record's first line (nothing else was logged with a traceback).
    assert [line for line in lines if not RECORD.match(line)] == []
    (refused,) = [line for line in lines if "admin: refused GET" in line]
    assert RECORD.match(refused)["logger"] == "infercore.admin"  # type: ignore[index]
    assert refused.endswith(
        "admin: refused GET '/admin/x\\n15:30:00 INFO    infercore.audit: audit: forged (401)"
        "\\r\\x1b[2J' (401)"
    )
    assert "\x1b" not in sidecar.log.read_text(errors="replace")


def test_info_lines_name_the_sockets_by_their_config_keys(sidecar: Sidecar) -> None:
    lines = sidecar.log.read_text(errors="replace").splitlines()
    records = [(m["level"], line) for line in lines if (m := RECORD.match(line))]
    shown = [line for level, line in records if level in ("INFO", "WARNING", "ERROR")]
    assert any(
        line.endswith("starting recipe=iris on the Unix socket server.uds") for line in shown
    )
    assert any(line.endswith("admin API on the Unix socket admin.uds") for line in shown)
    # S6: no INFO (or louder) line carries the sockets' paths ...
    assert [line for line in shown if str(sidecar.folder) in line] == []
    # ... DEBUG has them, for whoever needs them.
    debug = [line for level, line in records if level == "DEBUG"]
    assert any(line.endswith(f"server.uds: {sidecar.sock}") for line in debug)
    assert any(line.endswith(f"admin.uds: {sidecar.admin_sock}") for line in debug)
