"""``server.workers=N``: a supervisor process and N worker processes on one listening socket.

The supervisor composes and validates the config once, binds the listening socket once (TCP or
the sidecar's Unix socket) and starts N fresh worker processes (``python -m infercore.cli
serve ...``, never ``fork``: ONNX Runtime and torch start threads when they load, and a forked
copy of a process with threads is unsafe). Each worker inherits the socket and runs the same
serve path as ``server.workers=1``: its own runtime, its own uvicorn server, the same shutdown
sequence (RELIABILITY P11). The kernel hands each new connection to one worker waiting in
``accept``.

Why one shared socket rather than ``SO_REUSEPORT``: a port in use fails once, with one clear
line, before any worker starts; the socket stays open while a worker restarts, so connections
wait in its queue instead of being refused; a worker killed with SIGKILL has no accept queue of
its own whose connections the kernel would reset; and it works for Unix sockets, which
``SO_REUSEPORT`` does not balance. The cost: under light load one worker may take most
connections (a busy worker is not in ``accept``, so under load the spread evens out).

Readiness: the first workers listen at once (liveness answers while models load) and each
answers ``/v2/health/ready`` 200 only once the supervisor has seen every worker ready, so a
probe never reports a server ready while one of its workers would still answer 503.

Signals: SIGTERM or SIGINT is forwarded to every worker (a second one too: the workers then stop
at once), the supervisor closes its own copy of the socket (the last worker to close its copy
adopts what is queued, see :mod:`infercore.server.shutdown`), waits for every worker, and exits
0 when all of them exited 0. A replacement still loading its models closes its copy at the
signal, answering what is queued on it ``503 shutting_down``, and never reports ready: a copy
held by a process that does not accept would let connections queue unanswered after the
serving workers closed theirs, then reset them. Workers run in their own process group, so a
Ctrl-C in a terminal reaches them once, through the supervisor.

Restarts: a worker that exits while the server is not stopping is restarted with a backoff
(0.5 s doubling to 10 s) and, once the others serve, it listens only after its models are
ready. A worker that exits before any worker was ever ready stops the server with its exit code
(a broken model: its error line is on stderr, as with one worker). Later, a worker that fails
to start is retried at the capped backoff for as long as another worker serves (a dependency
that is down, such as the feature store, does not take the serving workers down with it; from
the :data:`MAX_START_FAILURES`-th failure in a row each retry is logged as an error); once it
has failed that many times in a row while no worker serves, the server stops with exit 1. Such
a stop is logged with its reason, not as a signal.

Metrics: the supervisor gives the workers a fresh private folder (``0700``, removed at exit) as
``PROMETHEUS_MULTIPROC_DIR``; every worker writes its samples there and answers ``/metrics``
with the totals of all workers (:mod:`infercore.metrics`). The folder is made inside
``$INFERCORE_METRICS_DIR`` when that is set (``infercore deploy k8s`` points it at a
memory-backed ``emptyDir``: the pod's root filesystem is read-only), else in the temporary
folder (``$TMPDIR``, ``/tmp``).

``server.workers=auto``: one worker per CPU this process may use, which is the smaller of the
affinity mask and the cgroup CPU quota rounded up (a container's CPU limit; without it a pod
would start one worker per CPU of the node).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from infercore.errors import ConfigError, InfercoreError
from infercore.server.unix_sockets import INFERENCE_MODE, SocketFile, bind_unix

log = logging.getLogger("infercore.workers")

#: ``"INDEX:LISTEN_FD:READY_FD:GO_FD:PARENT_PID:DEFER"``, set by the supervisor for each worker.
WORKER_ENV = "INFERCORE_WORKER"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Where the supervisor makes its private metrics folder (default: the temporary folder).
METRICS_PARENT_ENV = "INFERCORE_METRICS_DIR"
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")

#: Start-up failures in a row (a worker that exits before it is ready) before giving up.
MAX_START_FAILURES = 5
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0
BACKLOG = 2048
_POLL_S = 0.05


@dataclass(frozen=True)
class WorkerContext:
    """What a worker process was given by its supervisor."""

    index: int
    listen_fd: int
    ready_fd: int
    #: The supervisor writes to it once every worker is ready (-1: no need to wait).
    go_fd: int
    parent_pid: int
    #: Listen only once the models are ready (a restart while the other workers serve).
    defer_listen: bool

    def listener(self) -> socket.socket:
        sock = socket.socket(fileno=self.listen_fd)
        sock.setblocking(False)
        return sock

    def report_ready(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self.ready_fd, b"r")
            os.close(self.ready_fd)

    def watch_peers(self, loop: asyncio.AbstractEventLoop, on_ready: Callable[[], None]) -> None:
        """Call ``on_ready`` once the supervisor says that every worker is ready."""
        if self.go_fd < 0:
            on_ready()
            return
        fd = self.go_fd

        def readable() -> None:
            try:
                data = os.read(fd, 1)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            loop.remove_reader(fd)
            os.close(fd)
            if data:
                on_ready()

        os.set_blocking(fd, False)
        loop.add_reader(fd, readable)

    def orphaned(self) -> bool:
        """The supervisor is gone (this process was re-parented)."""
        return os.getppid() != self.parent_pid


def worker_context() -> WorkerContext | None:
    """The context of this process when a supervisor started it, else ``None``."""
    raw = os.environ.get(WORKER_ENV)
    if not raw:
        return None
    try:
        index, listen_fd, ready_fd, go_fd, parent, defer = raw.split(":")
        return WorkerContext(
            int(index), int(listen_fd), int(ready_fd), int(go_fd), int(parent), defer == "1"
        )
    except ValueError:
        raise ConfigError(
            f"{WORKER_ENV}={raw!r} is not a worker context",
            hint=f"the supervisor sets it; unset {WORKER_ENV}",
        ) from None


def worker_count(value: int | str) -> int:
    """``server.workers`` as a number (``auto``: :func:`available_cpus`)."""
    if value == "auto":
        return available_cpus()
    assert isinstance(value, int)
    return value


def available_cpus(cgroup_root: Path | None = None, proc_cgroup: Path | None = None) -> int:
    """The CPUs this process may use: its affinity mask, capped by its cgroup CPU quota.

    A container's CPU limit is a quota (``cpu.max`` or ``cpu.cfs_quota_us``), not a smaller
    affinity mask, so the mask alone would count every CPU of the node. A fractional quota
    rounds up (a 1.5-CPU limit runs two workers); the result is at least 1.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root, proc_cgroup)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def cgroup_cpu_quota(
    cgroup_root: Path | None = None, proc_cgroup: Path | None = None
) -> float | None:
    """CPUs the cgroup CPU quota allows this process (quota / period), ``None`` without one.

    cgroup v2 (``cpu.max``: ``"QUOTA PERIOD"`` or ``"max PERIOD"``) first, then v1
    (``cpu.cfs_quota_us``, -1 for none, and ``cpu.cfs_period_us``). The process's own cgroup
    (``/proc/self/cgroup``) and each of its ancestors may set one: the smallest applies. Inside
    a container with its own cgroup namespace the mount's root is the container's cgroup; with
    v1, the runtime mounts the container's cgroup at the controller's root, so the root's own
    files are read too.
    """
    # Resolved here, not as defaults, so that tests can point the module at fake files.
    cgroup_root = cgroup_root or CGROUP_ROOT
    try:
        lines = (proc_cgroup or PROC_SELF_CGROUP).read_text().splitlines()
    except OSError:
        lines = []
    v2_path, v1_path = "/", "/"
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if parts[0] == "0" and controllers == "":
            v2_path = path
        elif "cpu" in controllers.split(","):
            v1_path = path
    quotas = [q for d in _ancestors(cgroup_root, v2_path) if (q := _v2_quota(d)) is not None]
    v2 = (cgroup_root / "cgroup.controllers").exists()
    if not v2:
        for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
            base = cgroup_root / name
            if base.is_dir():
                quotas += [q for d in _ancestors(base, v1_path) if (q := _v1_quota(d)) is not None]
                break
    return min(quotas) if quotas else None


def _ancestors(base: Path, path: str) -> list[Path]:
    """``base/path`` and each of its parents up to ``base`` (those that exist)."""
    parts = [p for p in path.split("/") if p and p not in (".", "..")]
    folders = [base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
    return [f for f in folders if f.is_dir()]


def _v2_quota(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
        if quota == "max":
            return None
        return _ratio(int(quota), int(period))
    except (OSError, ValueError):
        return None


def _v1_quota(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return _ratio(quota, period)


def _ratio(quota: int, period: int) -> float | None:
    return quota / period if quota > 0 and period > 0 else None


def make_metrics_dir() -> str:
    """A fresh ``0700`` folder for the workers' Prometheus samples (see the module docstring)."""
    parent = os.environ.get(METRICS_PARENT_ENV) or None
    try:
        return tempfile.mkdtemp(prefix="infercore-metrics-", dir=parent)
    except OSError as exc:
        where = f"{METRICS_PARENT_ENV}={parent}" if parent else "the temporary folder"
        raise InfercoreError(
            f"server.workers: could not make the metrics folder in {where}: {exc.strerror or exc}",
            hint=f"point {METRICS_PARENT_ENV} (or TMPDIR) at a writable folder",
        ) from None


def check_config(config: Any, workers: int) -> None:
    """Refuse what several workers cannot do correctly."""
    if workers > 1 and config.admin.enabled:
        raise ConfigError(
            f"server.workers: {workers} workers with admin.enabled: each worker keeps its own "
            "model versions, stages and approvals, so an admin call would change only the "
            "worker that answered it",
            hint="use server.workers=1 with the admin API (scale with more pods or processes "
            "behind a load balancer), or set admin.enabled=false",
        )
    if workers > 1 and config.admin.state_file is not None:
        raise ConfigError(
            f"server.workers: {workers} workers with admin.state_file: each worker would keep "
            "(and save) its own rollout",
            hint="use server.workers=1 with admin.state_file, or unset it",
        )


def bind(cfg: Any) -> tuple[socket.socket, SocketFile | None]:
    """The listening socket every worker shares, and its Unix socket file (``None`` on TCP).

    Whoever stops listening removes the file through :meth:`SocketFile.remove`: only while it
    is still this server's (see :mod:`infercore.server.unix_sockets`).

    Raises:
        ConfigError: Another server answers on ``server.uds``.
        InfercoreError: The bind failed (a port in use, a folder that cannot be written).
    """
    owned: SocketFile | None = None
    if cfg.uds is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET)
    try:
        if cfg.uds is not None:
            owned = bind_unix(sock, cfg.uds, key="server.uds", mode=INFERENCE_MODE)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((cfg.host, cfg.port))
        sock.listen(BACKLOG)
    except BaseException as exc:
        sock.close()
        if owned is not None:
            owned.remove()
        if not isinstance(exc, OSError):
            raise
        where = f"unix:{cfg.uds}" if cfg.uds is not None else f"http://{cfg.host}:{cfg.port}"
        raise InfercoreError(f"could not listen on {where}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock, owned


@dataclass
class _Slot:
    index: int
    process: subprocess.Popen[bytes] | None = None
    ready_fd: int = -1
    go_fd: int = -1
    ready: bool = False
    #: Exits before readiness, in a row.
    failures: int = 0
    restart_at: float = 0.0
    #: Signals forwarded to the current process.
    signalled: int = 0


class Supervisor:
    """Starts, watches, restarts and stops the worker processes (see the module docstring)."""

    def __init__(
        self,
        command: list[str],
        workers: int,
        listener: socket.socket,
        *,
        stop_timeout_s: float,
        socket_file: SocketFile | None = None,
        metrics_dir: str | None = None,
    ) -> None:
        self.command = command
        self.listener: socket.socket | None = listener
        #: The Unix socket file :func:`bind` made: removed at exit while it is still this one.
        self.socket_file = socket_file
        self.stop_timeout_s = stop_timeout_s
        self.slots = [_Slot(i) for i in range(workers)]
        #: Removed at exit, like the folder made here when none is given.
        self.metrics_dir = metrics_dir if metrics_dir is not None else make_metrics_dir()
        self.signals = 0
        self.signum: int = signal.SIGTERM
        #: Why the supervisor stops the server by itself (None: a signal came).
        self.stop_reason: str | None = None
        self.stop_deadline: float | None = None
        self.any_ready = False
        self.all_ready = False
        self.code = 0

    # -- signals --------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only recorded here; the loop forwards it (a handler may run in the middle of a start).
        self.signals += 1
        self.signum = signum

    def _forward_signals(self) -> None:
        if self.stop_deadline is None:
            running = sum(1 for s in self.slots if s.process is not None)
            if self.stop_reason is None:
                log.info(
                    "received %s: stopping %d worker(s)", signal.Signals(self.signum).name, running
                )
            else:
                log.error("stopping %d worker(s): %s", running, self.stop_reason)
            self.stop_deadline = time.monotonic() + self.stop_timeout_s
        for slot in self.slots:
            process = slot.process
            while process is not None and slot.signalled < self.signals:
                slot.signalled += 1
                if process.poll() is None:
                    with contextlib.suppress(OSError):
                        process.send_signal(self.signum)
        self._close_listener()

    def _close_listener(self) -> None:
        # The socket closes when its last copy does: the last worker to close its copy
        # first takes over the connections still queued on it.
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    # -- workers --------------------------------------------------------------------------

    def _start(self, slot: _Slot) -> None:
        assert self.listener is not None
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        # The first workers listen at once (liveness answers while models load) but report
        # ready only once all of them are; a restarted one listens only once it is ready.
        go_read, go_write = (-1, -1) if self.all_ready else os.pipe()
        defer = "1" if self.all_ready else "0"
        listen_fd = self.listener.fileno()
        context = f"{slot.index}:{listen_fd}:{write_fd}:{go_read}:{os.getpid()}:{defer}"
        env = {**os.environ, WORKER_ENV: context, MULTIPROC_ENV: self.metrics_dir}
        fds = (listen_fd, write_fd) if go_read < 0 else (listen_fd, write_fd, go_read)
        try:
            slot.process = subprocess.Popen(self.command, env=env, pass_fds=fds, process_group=0)
        finally:
            os.close(write_fd)
            if go_read >= 0:
                os.close(go_read)
        self._close_go(slot)
        slot.go_fd = go_write
        slot.ready_fd = read_fd
        slot.ready = False
        slot.signalled = 0
        log.info("worker %d started (pid %d)", slot.index, slot.process.pid)

    def _poll_ready(self, slot: _Slot) -> None:
        if slot.ready or slot.ready_fd < 0:
            return
        try:
            data = os.read(slot.ready_fd, 1)
        except BlockingIOError:
            return
        if data:
            slot.ready = True
            slot.failures = 0
            self.any_ready = True
            assert slot.process is not None
            log.info("worker %d (pid %d) ready", slot.index, slot.process.pid)
            if not self.all_ready and all(s.ready for s in self.slots):
                self.all_ready = True
                log.info("all %d workers are ready", len(self.slots))
                for other in self.slots:
                    if other.go_fd >= 0:
                        with contextlib.suppress(OSError):
                            os.write(other.go_fd, b"g")
                    self._close_go(other)
        self._close_ready(slot)

    @staticmethod
    def _close_go(slot: _Slot) -> None:
        if slot.go_fd >= 0:
            os.close(slot.go_fd)
            slot.go_fd = -1

    @staticmethod
    def _close_ready(slot: _Slot) -> None:
        if slot.ready_fd >= 0:
            os.close(slot.ready_fd)
            slot.ready_fd = -1

    def _reap(self, slot: _Slot, code: int) -> None:
        assert slot.process is not None
        pid = slot.process.pid
        self._poll_ready(slot)
        self._close_ready(slot)
        slot.process = None
        from infercore.metrics import forget_process

        # Live gauges (inflight, queue depth, readiness, breakers) of a dead worker no longer
        # count, nor does a per-pid series of it.
        with contextlib.suppress(OSError):
            forget_process(pid, self.metrics_dir)
        if self.signals:
            if code in (-signal.SIGTERM, -signal.SIGINT):
                code = 0  # stopped by the forwarded signal before it could handle it
            if code != 0:
                log.error("worker %d (pid %d) exited with %s", slot.index, pid, _describe(code))
                self.code = self.code or _exit_code(code)
            return
        if not slot.ready:
            slot.failures += 1
        else:
            slot.failures = 0
        if not self.any_ready:
            print(
                f"infercore: error: worker {slot.index} exited with {_describe(code)} before "
                "any worker was ready; stopping",
                file=sys.stderr,
            )
            self._stop_all(_exit_code(code), f"worker {slot.index} failed before any was ready")
            return
        delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** max(0, slot.failures - 1))
        if slot.failures >= MAX_START_FAILURES:
            serving = sum(1 for s in self.slots if s.process is not None and s.ready)
            if not serving:
                print(
                    f"infercore: error: worker {slot.index} failed to start {slot.failures} "
                    f"times in a row (last: {_describe(code)}) and no worker serves; stopping",
                    file=sys.stderr,
                )
                self._stop_all(
                    EXIT_FAILURE, f"worker {slot.index} failed to start and no worker serves"
                )
                return
            # The others serve: a dependency that is down (a feature store) must not take
            # them down too. Keep trying, at the capped backoff, and say so each time.
            log.error(
                "worker %d (pid %d) failed to start %d times in a row (last: %s); %d other "
                "worker(s) serve; restarting in %.1fs",
                slot.index,
                pid,
                slot.failures,
                _describe(code),
                serving,
                delay,
            )
        else:
            log.warning(
                "worker %d (pid %d) exited with %s; restarting in %.1fs",
                slot.index,
                pid,
                _describe(code),
                delay,
            )
        slot.restart_at = time.monotonic() + delay

    def _stop_all(self, code: int, reason: str) -> None:
        """Stop every worker as a SIGTERM would, logging ``reason`` (no signal came)."""
        self.code = code
        self.stop_reason = reason
        self.signals += 1
        self.signum = signal.SIGTERM
        self._forward_signals()

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> int:
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            for slot in self.slots:
                self._start(slot)
            return self._loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._kill_all()
            self._close_listener()
            for slot in self.slots:
                self._close_ready(slot)
                self._close_go(slot)
            if self.socket_file is not None:
                self.socket_file.remove()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _loop(self) -> int:
        while True:
            if self.signals:
                self._forward_signals()
            now = time.monotonic()
            running = 0
            for slot in self.slots:
                if slot.process is None:
                    if not self.signals and slot.restart_at and now >= slot.restart_at:
                        slot.restart_at = 0.0
                        self._start(slot)
                        running += 1
                    continue
                self._poll_ready(slot)
                code = slot.process.poll()
                if code is None:
                    running += 1
                else:
                    self._reap(slot, code)
            if self.signals and running == 0:
                if self.code == 0 and self.signals:
                    log.info("stopped")
                return self.code
            if self.stop_deadline is not None and now > self.stop_deadline:
                log.error(
                    "workers still running %.0fs after the signal; killed", self.stop_timeout_s
                )
                self._kill_all()
                return self.code or EXIT_FAILURE
            time.sleep(_POLL_S)

    def _kill_all(self) -> None:
        for slot in self.slots:
            process = slot.process
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


EXIT_FAILURE = 1


def _exit_code(code: int) -> int:
    return code if code > 0 else EXIT_FAILURE


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"code {code}"


def supervise(config: Any, overrides: list[str], workers: int, *, debug: bool = False) -> int:
    """Run ``workers`` copies of ``infercore serve OVERRIDES`` on one socket until stopped."""
    cfg = config.server
    # Before binding: a metrics folder that cannot be made fails with nothing to undo.
    metrics_dir = make_metrics_dir()
    try:
        listener, socket_file = bind(cfg)
    except BaseException:
        shutil.rmtree(metrics_dir, ignore_errors=True)
        raise
    if cfg.uds is not None:
        # INFO logs carry no file paths (RELIABILITY S6): the socket by its config key.
        where = "the Unix socket server.uds"
        log.debug("server.uds: %s", cfg.uds)
    else:
        where = f"http://{cfg.host}:{cfg.port}"
    log.info("supervising %d workers on %s (pid %d)", workers, where, os.getpid())
    command = [sys.executable, "-m", "infercore.cli", *(["--debug"] if debug else []), "serve"]
    supervisor = Supervisor(
        [*command, *overrides],
        workers,
        listener,
        # The workers' own bound, plus time to start Python and stop the components.
        stop_timeout_s=cfg.drain_delay_s + cfg.graceful_timeout_s + 15.0,
        socket_file=socket_file,
        metrics_dir=metrics_dir,
    )
    return supervisor.run()
