"""``server.workers=auto`` in a container, and where the workers' metrics folder goes.

The cgroup files are fakes under ``tmp_path`` laid out as the kernel lays them out: cgroup v2
(``cpu.max``) and v1 (``cpu/cpu.cfs_quota_us``), each with ``/proc/self/cgroup``.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from infercore.errors import InfercoreError
from infercore.server import workers


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _v2(root: Path, cpu_max: dict[str, str], own: str = "/") -> Path:
    """A cgroup v2 mount with ``cpu.max`` files by cgroup path; returns /proc/self/cgroup."""
    _write(root / "cgroup.controllers", "cpuset cpu io memory pids\n")
    for path, text in cpu_max.items():
        _write(root / path.strip("/") / "cpu.max", text)
    proc = root.parent / "proc-self-cgroup"
    _write(proc, f"0::{own}\n")
    return proc


def _v1(root: Path, quota: str, period: str = "100000", controller: str = "cpu,cpuacct") -> Path:
    folder = root / controller
    _write(folder / "cpu.cfs_quota_us", quota + "\n")
    _write(folder / "cpu.cfs_period_us", period + "\n")
    (root / "memory").mkdir()
    proc = root.parent / "proc-self-cgroup"
    _write(proc, f"4:memory:/docker/abc\n3:{controller}:/docker/abc\n1:name=systemd:/\n")
    return proc


@pytest.fixture
def eight_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)


@pytest.mark.parametrize(
    ("cpu_max", "quota"),
    [
        ("200000 100000\n", 2.0),
        ("150000 100000\n", 1.5),
        ("50000 100000", 0.5),
        ("max 100000", None),
    ],
)
def test_cgroup_v2_cpu_max(tmp_path: Path, cpu_max: str, quota: float | None) -> None:
    root = tmp_path / "cgroup"
    proc = _v2(root, {"/": cpu_max})
    assert workers.cgroup_cpu_quota(root, proc) == quota


def test_cgroup_v2_the_smallest_quota_of_the_own_cgroup_and_its_ancestors(tmp_path: Path) -> None:
    # No cgroup namespace: the mount shows the whole tree, /proc/self/cgroup says where we are.
    root = tmp_path / "cgroup"
    own = "/kubepods.slice/pod1/ctr"
    proc = _v2(root, {"/kubepods.slice/pod1": "300000 100000", own: "max 100000"}, own=own)
    assert workers.cgroup_cpu_quota(root, proc) == 3.0
    _write(root / own.strip("/") / "cpu.max", "250000 100000")
    assert workers.cgroup_cpu_quota(root, proc) == 2.5


@pytest.mark.parametrize("controller", ["cpu,cpuacct", "cpu"])
def test_cgroup_v1_cfs_quota(tmp_path: Path, controller: str) -> None:
    root = tmp_path / "cgroup"
    proc = _v1(root, "250000", controller=controller)
    assert workers.cgroup_cpu_quota(root, proc) == 2.5


def test_cgroup_v1_without_a_quota(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    proc = _v1(root, "-1")
    assert workers.cgroup_cpu_quota(root, proc) is None


@pytest.mark.parametrize("cpu_max", ["", "garbage", "100000", "abc 100000", "100000 0"])
def test_unreadable_quotas_are_no_quota(tmp_path: Path, cpu_max: str) -> None:
    root = tmp_path / "cgroup"
    proc = _v2(root, {"/": cpu_max})
    assert workers.cgroup_cpu_quota(root, proc) is None


def test_no_cgroup_files_at_all(tmp_path: Path) -> None:
    assert workers.cgroup_cpu_quota(tmp_path / "none", tmp_path / "none-either") is None


@pytest.mark.parametrize(
    ("cpu_max", "cpus"),
    [
        ("200000 100000", 2),
        ("150000 100000", 2),  # rounds up
        ("10000 100000", 1),  # at least one
        ("1600000 100000", 8),  # never more than the affinity mask
        ("max 100000", 8),  # no quota: the affinity mask
    ],
)
def test_available_cpus_follows_the_quota(
    tmp_path: Path, eight_cpus: None, cpu_max: str, cpus: int
) -> None:
    root = tmp_path / "cgroup"
    proc = _v2(root, {"/": cpu_max})
    assert workers.available_cpus(root, proc) == cpus


def test_workers_auto_reads_the_cgroup(
    tmp_path: Path, eight_cpus: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "cgroup"
    proc = _v1(root, "300000")
    monkeypatch.setattr(workers, "CGROUP_ROOT", root)
    monkeypatch.setattr(workers, "PROC_SELF_CGROUP", proc)
    assert workers.worker_count("auto") == 3
    assert workers.worker_count(5) == 5


# --- the metrics folder ------------------------------------------------------------------


def test_the_metrics_folder_goes_where_infercore_metrics_dir_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parent = tmp_path / "metrics"
    parent.mkdir()
    monkeypatch.setenv(workers.METRICS_PARENT_ENV, str(parent))
    folder = Path(workers.make_metrics_dir())
    assert folder.parent == parent
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_without_it_the_metrics_folder_goes_to_tmpdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    monkeypatch.delenv(workers.METRICS_PARENT_ENV, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert Path(workers.make_metrics_dir()).parent == tmp_path


def test_a_metrics_folder_that_cannot_be_made_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(workers.METRICS_PARENT_ENV, str(tmp_path / "missing"))
    with pytest.raises(InfercoreError, match=workers.METRICS_PARENT_ENV):
        workers.make_metrics_dir()


def test_a_port_in_use_leaves_no_metrics_folder_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(workers.METRICS_PARENT_ENV, str(tmp_path))
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        server = SimpleNamespace(
            uds=None,
            host="127.0.0.1",
            port=busy.getsockname()[1],
            drain_delay_s=0.0,
            graceful_timeout_s=1.0,
        )
        with pytest.raises(InfercoreError, match="could not listen"):
            workers.supervise(SimpleNamespace(server=server), [], 2)
    finally:
        busy.close()
    assert list(tmp_path.iterdir()) == []
