"""A real, throw-away ``redis-server`` for the e2e tests (never the system's one on 6379).

``RedisServer.start(folder)`` runs ``redis-server`` from PATH on a free loopback port, without
persistence (``--save '' --appendonly no``) and with its working directory in ``folder``, and
waits (bounded) until it answers ``PING``. ``stop()`` sends SIGTERM to that process only (by
its PID) and kills it if it does not exit; it is idempotent and also undoes ``pause()``.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

#: ``redis-server`` on PATH, or None (the tests that need it skip; CI installs it).
REDIS_SERVER = shutil.which("redis-server")
SKIP_REASON = (
    "redis-server is not on PATH; install it (apt-get install -y redis-server; .ci/run does) "
    "to run the Redis online-store tests"
)
START_WAIT_S = 10.0
STOP_WAIT_S = 10.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ping(port: int, timeout_s: float = 0.5) -> bool:
    """Whether a Redis server answers PING on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
            s.settimeout(timeout_s)
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process on loopback; see the module docstring."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process = process
        self.port = port
        self.log = log
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    @classmethod
    def start(cls, folder: Path, *, timeout_s: float = START_WAIT_S) -> RedisServer:
        if REDIS_SERVER is None:
            raise RuntimeError(SKIP_REASON)
        folder.mkdir(parents=True, exist_ok=True)
        log = folder / "redis-server.log"
        last_error = ""
        for _ in range(3):  # a free port can be taken between probing and binding: retry
            port = _free_port()
            with log.open("ab") as out:
                process = subprocess.Popen(
                    [
                        REDIS_SERVER,
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        str(folder),
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            server = cls(process, port, log)
            deadline = time.monotonic() + timeout_s
            while process.poll() is None and time.monotonic() < deadline:
                if ping(port):
                    return server
                time.sleep(0.05)
            server.stop()
            last_error = f"exit code {process.returncode}"
        raise RuntimeError(
            f"redis-server did not answer PING within {timeout_s:.0f} s ({last_error}):\n"
            + log.read_text(errors="replace")[-2000:]
        )

    def pause(self) -> None:
        """SIGSTOP: the server keeps its socket open but answers nothing (a hung store)."""
        if self.running and not self.paused:
            self.process.send_signal(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.running and self.paused:
            self.process.send_signal(signal.SIGCONT)
        self.paused = False

    def stop(self, timeout_s: float = STOP_WAIT_S) -> None:
        """SIGTERM (after SIGCONT if paused), then SIGKILL on timeout. Idempotent."""
        if not self.running:
            self.paused = False
            return
        self.resume()
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=timeout_s)
