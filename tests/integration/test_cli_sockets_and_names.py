"""The CLI: what ``serve`` refuses before it listens (a live or unusable
``admin.uds``, ``admin.audit_log``) and ``config validate`` refusing the same; the admin
listener's sockets (never another server's taken over or removed; a port in use is one line);
``new-plugin`` refusing a name something installed already uses. In process, then as a user
runs ``infercore``."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata as md
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from infercore import cli
from infercore.errors import ConfigError, InfercoreError
from infercore.scaffold import ScaffoldError, new_plugin
from infercore.server.admin import AdminListener
from infercore.testing import composed_from_dict, runtime_from_dict

REPO = Path(__file__).resolve().parents[2]
IRIS_ONNX = REPO / "recipes" / "iris" / "artifacts" / "model.onnx"
SCRIPT = Path(sys.executable).parent / "infercore"
INFERCORE = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "infercore.cli"]
TOKEN = "t0ken-for-tests-0123456789"
ENV = {"INFERCORE_ADMIN_TOKEN": TOKEN}

needs_iris = pytest.mark.skipif(not IRIS_ONNX.is_file(), reason="iris model not built")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERCORE_")}
    env.update(INFERCORE_ADMIN_TOKEN=TOKEN, PYTHONUNBUFFERED="1", **extra)
    return env


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*INFERCORE, *args],
        cwd=REPO,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def _cli_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The lines the CLI itself prints (log lines start with a time)."""
    assert "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("infercore: ")]


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A folder whose socket paths fit sun_path (pytest's tmp_path can be too long)."""
    folder = Path(tempfile.mkdtemp(prefix="qa5-", dir="/tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _admin_models(sock: Path) -> bytes:
    """GET /admin/models over the admin socket: the raw response."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect(str(sock))
        client.sendall(
            b"GET /admin/models HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n"
            + f"Authorization: Bearer {TOKEN}\r\n\r\n".encode()
        )
        chunks = []
        while chunk := client.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _config(**admin: Any) -> dict[str, Any]:
    return {
        "batching": {"kind": "none"},
        "models": {"m": {"versions": {"1": {"loader": {"kind": "fake"}}}}},
        "admin": {"enabled": True, **admin},
    }


def _check(data: dict[str, Any], *, create: bool) -> None:
    cli.check_before_listen(composed_from_dict(data), 1, create=create)


@pytest.fixture(autouse=True)
def _token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERCORE_ADMIN_TOKEN", TOKEN)


@contextlib.contextmanager
def _live_socket(path: Path) -> Iterator[socket.socket]:
    """A server listening on the Unix socket ``path`` (another infercore, say)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        sock.listen()
        try:
            yield sock
        finally:
            path.unlink()  # as that server does when it stops


def _stale_socket(path: Path) -> None:
    """A socket file left by a process that died: nobody listens on it any more."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


# --- admin.uds: the rule server.uds follows ------------------------------------------------


@pytest.mark.parametrize("create", [True, False], ids=["serve", "validate"])
def test_an_admin_socket_another_server_answers_on_is_refused(
    short_tmp: Path, create: bool
) -> None:
    path = short_tmp / "admin.sock"
    with _live_socket(path):
        with pytest.raises(ConfigError) as info:
            _check(_config(uds=str(path)), create=create)
        assert str(info.value).startswith("admin.uds: another server is listening on this socket")
        assert _answers(path)  # left alone


@pytest.mark.parametrize("create", [True, False], ids=["serve", "validate"])
def test_a_stale_admin_socket_and_a_missing_folder_are_accepted(
    short_tmp: Path, create: bool
) -> None:
    stale = short_tmp / "admin.sock"
    _stale_socket(stale)
    _check(_config(uds=str(stale)), create=create)
    assert stale.is_socket()  # replaced when the listener binds, not before
    missing = short_tmp / "run" / "admin.sock"
    _check(_config(uds=str(missing)), create=create)
    # serve makes the folder owner-only (as for server.uds); validate changes nothing.
    if create:
        assert (missing.parent.stat().st_mode & 0o777) == 0o700
    else:
        assert not missing.parent.exists()


@pytest.mark.parametrize("create", [True, False], ids=["serve", "validate"])
def test_an_admin_socket_folder_that_cannot_be_made_is_a_config_error(
    short_tmp: Path, create: bool
) -> None:
    (short_tmp / "file").write_text("")
    with pytest.raises(ConfigError, match=r"^admin\.uds: cannot create the socket's folder"):
        _check(_config(uds=str(short_tmp / "file" / "run" / "admin.sock")), create=create)
    (short_tmp / "plain").write_text("")
    with pytest.raises(ConfigError, match=r"^admin\.uds: the path exists and is not a socket"):
        _check(_config(uds=str(short_tmp / "plain")), create=create)
    with pytest.raises(ConfigError, match=r"^admin\.uds: the socket path is empty"):
        _check(_config(uds=""), create=create)
    assert sorted(p.name for p in short_tmp.iterdir()) == ["file", "plain"]


def test_an_admin_socket_that_is_the_server_socket_is_refused(short_tmp: Path) -> None:
    data = _config(uds=str(short_tmp / "s.sock"))
    data["server"] = {"uds": str(short_tmp / "s.sock")}
    with pytest.raises(ConfigError, match=r"^admin\.uds: it is server\.uds too"):
        _check(data, create=False)


def test_deploy_checks_only_the_admin_socket_path_length(short_tmp: Path) -> None:
    with _live_socket(short_tmp / "admin.sock"):  # on this machine, not in the pod
        cli.check_before_listen(
            composed_from_dict(_config(uds=str(short_tmp / "admin.sock"))), 1, local=False
        )
    with pytest.raises(ConfigError, match=r"^admin\.uds: the socket path is \d+ bytes"):
        cli.check_before_listen(
            composed_from_dict(_config(uds="/tmp/" + "a" * 120 + ".sock")), 1, local=False
        )


# --- the admin listener never takes over, nor removes, another server's socket --------------


def test_the_admin_listener_refuses_a_live_socket_and_keeps_it(short_tmp: Path) -> None:
    path = short_tmp / "admin.sock"
    rt = runtime_from_dict(_config(uds=str(path)))
    listener = AdminListener.from_runtime(rt, ENV)
    assert listener is not None
    with _live_socket(path):
        with pytest.raises(ConfigError, match="another server is listening on this socket"):
            asyncio.run(listener.start())
        assert _answers(path)


def test_the_admin_listener_removes_only_the_socket_file_it_created(short_tmp: Path) -> None:
    path = short_tmp / "admin.sock"
    rt = runtime_from_dict(_config(uds=str(path)))

    async def scenario() -> None:
        listener = AdminListener.from_runtime(rt, ENV)
        assert listener is not None
        await listener.start()
        try:
            assert _answers(path)
            # Its file removed by hand, and the path bound by another server since.
            path.unlink()
            with _live_socket(path):
                await listener.stop()
                assert _answers(path), "the other server's socket was removed"
        finally:
            await listener.stop()

    asyncio.run(scenario())

    async def own() -> None:
        listener = AdminListener.from_runtime(rt, ENV)
        assert listener is not None
        await listener.start()
        await listener.stop()

    _stale_socket(path)  # a stale one is replaced, and the listener's own file removed
    asyncio.run(own())
    assert not path.exists()


def test_an_admin_port_in_use_is_one_error_naming_the_address_and_the_fix() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rt = runtime_from_dict(_config(port=port))
        listener = AdminListener.from_runtime(rt, ENV)
        assert listener is not None
        # Before the fix uvicorn's sys.exit(1) escaped the task as SystemExit.
        with pytest.raises(InfercoreError) as info:
            asyncio.run(listener.start())
    assert not isinstance(info.value, ConfigError)  # exit 1, as for server.port
    assert str(info.value) == (
        f"the admin API could not listen on http://127.0.0.1:{port}: Address already in use "
        "(hint: stop what listens there, or set admin.port to a free port)"
    )


# --- admin.audit_log: validate refuses what serve refuses, creating nothing -----------------


@pytest.mark.parametrize("admin", [True, False], ids=["admin-on", "admin-off"])
def test_validate_refuses_the_audit_logs_serve_refuses(tmp_path: Path, admin: bool) -> None:
    from infercore.lifecycle.audit import AuditLog

    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    for bad in (
        tmp_path / "missing" / "deeper" / "audit.jsonl",
        tmp_path / "file" / "audit.jsonl",
        tmp_path / "folder",
    ):
        data = _config(audit_log=str(bad), enabled=admin)
        with pytest.raises(ConfigError) as validate:
            _check(data, create=False)
        with pytest.raises(ConfigError) as serve:
            AuditLog(str(bad))  # what serve opens
        assert str(validate.value) == str(serve.value)
        assert str(validate.value).startswith("admin.audit_log: ")
    # A file in a folder yet to be made is fine, and validate makes neither.
    _check(_config(audit_log=str(tmp_path / "new" / "audit.jsonl")), create=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_validate_refuses_an_audit_log_in_a_folder_it_cannot_write(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(ConfigError, match=r"admin\.audit_log: cannot write .*Permission"):
            _check(_config(audit_log=str(locked / "audit.jsonl")), create=False)
    finally:
        locked.chmod(0o700)


# --- new-plugin: a name something installed already uses -------------------------------------


def _site(root: Path, dist: str, entry_points: str) -> Path:
    """A site folder holding the metadata of an installed distribution ``dist``."""
    info = root / f"{dist.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(entry_points)
    return root


@pytest.mark.parametrize(
    ("name", "dist", "entry_points", "taken_by"),
    [
        # Installing infercore-qa5-taken would uninstall the one installed.
        ("qa5-taken", "infercore-qa5-taken", "", "the installed distribution infercore-qa5-taken"),
        ("qa5_taken", "infercore-qa5-taken", "", "the installed distribution infercore-qa5-taken"),
        # Another distribution's plugin of that name: both would refuse to start.
        (
            "qa5-ep",
            "acme-plugins",
            "[infercore]\nqa5_ep = acme\n",
            "the plugin 'qa5_ep' of acme-plugins",
        ),
    ],
)
def test_a_name_an_installed_distribution_or_plugin_has_is_refused(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    dist: str,
    entry_points: str,
    taken_by: str,
) -> None:
    monkeypatch.syspath_prepend(str(_site(tmp_path / "site", dist, entry_points)))
    out = tmp_path / "out"
    with pytest.raises(ScaffoldError) as info:
        new_plugin(name, "action", out)
    assert str(info.value).startswith(f"plugin name {name!r} is taken by {taken_by}; ")
    assert "choose another name (e.g. my-" in str(info.value)
    assert not out.exists()


def test_a_name_an_installed_package_has_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "site" / "infercore_qa5_pkg").mkdir(parents=True)
    (tmp_path / "site" / "infercore_qa5_pkg" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(ScaffoldError, match="taken by the installed package infercore_qa5_pkg"):
        new_plugin("qa5-pkg", "action", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_new_plugin_refuses_a_first_party_plugins_name_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        md.distribution("infercore-onnx")
    except md.PackageNotFoundError:
        pytest.skip("infercore-onnx is not installed here")
    monkeypatch.chdir(tmp_path)
    # An action kind named onnx registers nothing onnx already has: only the name collides.
    assert cli.run(["new-plugin", "onnx", "--kind", "action"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "infercore: new-plugin: plugin name 'onnx' is taken by the installed distribution "
        "infercore-onnx; installing infercore-onnx would replace it (hint: choose another name "
        "(e.g. my-onnx); `infercore plugins` lists the installed ones)"
    ]
    assert list(tmp_path.iterdir()) == []


# --- as a user runs it ------------------------------------------------------------------


@needs_iris
def test_a_second_server_is_refused_a_live_admin_socket_and_leaves_it_alone(
    short_tmp: Path,
) -> None:
    # deploy=sidecar gives every server on a host the same admin.uds unless told otherwise.
    admin_sock = short_tmp / "adm" / "admin.sock"  # its folder does not exist yet
    env = _env(INFERCORE_ADMIN_UDS=str(admin_sock))
    args = ["+recipe=iris", "deploy=sidecar", "admin.enabled=true"]
    log = short_tmp / "a.log"
    with log.open("wb") as out:
        first = subprocess.Popen(
            [*INFERCORE, "serve", *args, f"server.uds={short_tmp / 'a' / 's.sock'}"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while b"ready: iris@1" not in log.read_bytes():
            assert first.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        # The folder was made, owner-only, as server.uds's is.
        assert (admin_sock.parent.stat().st_mode & 0o777) == 0o700
        assert b'"name":"iris"' in _admin_models(admin_sock)

        second = ["+recipe=iris", "deploy=sidecar", "admin.enabled=true"]
        expected = [
            "infercore: config error: admin.uds: another server is listening on this socket "
            "(hint: stop it, or choose another path)"
        ]
        for command in (["config", "validate"], ["serve"]):
            result = run(*command, *second, f"server.uds={short_tmp / 'b' / 's.sock'}", env=env)
            assert result.returncode == 2, (command, result.stderr)
            assert _cli_lines(result) == expected, (command, result.stderr)

        # The first server still owns its admin socket.
        assert admin_sock.is_socket()
        assert b'"name":"iris"' in _admin_models(admin_sock)
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 0, log.read_text()
    assert not admin_sock.exists()  # its own socket, removed when it stopped


@needs_iris
@pytest.mark.parametrize("listen", ["tcp", "uds"])
def test_an_admin_port_in_use_is_one_line_and_exit_1(short_tmp: Path, listen: str) -> None:
    inference_sock = short_tmp / "s.sock"
    where = "server.port=0" if listen == "tcp" else f"server.uds={inference_sock}"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("serve", "+recipe=iris", where, "admin.enabled=true", f"admin.port={port}")
    # As for server.port in use: exit 1, the address and its cause in one line.
    assert result.returncode == 1, result.stderr
    assert _cli_lines(result) == [
        f"infercore: error: the admin API could not listen on http://127.0.0.1:{port}: "
        "Address already in use (hint: stop what listens there, or set admin.port to a free "
        "port)"
    ]
    assert "ready:" not in result.stderr
    # The inference socket, bound first, is not left behind.
    assert not inference_sock.exists()


@pytest.mark.parametrize(
    ("audit", "says"),
    [
        ("no/such/audit.jsonl", "do not exist"),
        ("file/audit.jsonl", "is not a folder"),
    ],
)
def test_validate_refuses_the_audit_log_serve_refuses(
    tmp_path: Path, audit: str, says: str
) -> None:
    (tmp_path / "file").write_text("")
    path = tmp_path / audit
    overrides = ["+recipe=iris", "admin.enabled=true", f"admin.audit_log={path}"]
    validate = run("config", "validate", *overrides)
    serve = run("serve", *overrides, "server.port=0", "admin.port=0")
    assert (validate.returncode, serve.returncode) == (2, 2), validate.stderr + serve.stderr
    lines = _cli_lines(validate)
    assert lines == _cli_lines(serve)
    assert len(lines) == 1 and lines[0].startswith("infercore: config error: admin.audit_log: ")
    assert says in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
