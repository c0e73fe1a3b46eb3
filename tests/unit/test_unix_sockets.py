"""infercore.server.unix_sockets: bind a Unix socket file, and remove it only while it is ours."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from infercore.errors import ConfigError
from infercore.server.unix_sockets import (
    INFERENCE_MODE,
    OWNER_ONLY_MODE,
    bind_unix,
    socket_answers,
)


@pytest.fixture
def sock_path() -> Iterator[Path]:
    # A Unix socket path must fit in 107 bytes: pytest's tmp_path may not.
    folder = Path(tempfile.mkdtemp(prefix="ic-us-", dir="/tmp"))
    try:
        yield folder / "s.sock"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _unix() -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)


@pytest.mark.parametrize("mode", [INFERENCE_MODE, OWNER_ONLY_MODE])
def test_the_file_gets_the_mode_asked_for_and_the_umask_is_restored(
    sock_path: Path, mode: int
) -> None:
    before = os.umask(0o022)
    try:
        with _unix() as sock:
            owned = bind_unix(sock, str(sock_path), key="server.uds", mode=mode)
            assert (sock_path.stat().st_mode & 0o777) == mode
            assert os.umask(0o022) == 0o022
            assert owned.remove()
    finally:
        os.umask(before)
    assert not sock_path.exists()


def test_its_own_file_is_removed_once(sock_path: Path) -> None:
    with _unix() as sock:
        owned = bind_unix(sock, str(sock_path), key="server.uds", mode=INFERENCE_MODE)
        assert owned.is_current()
        assert owned.remove()
        assert not os.path.lexists(sock_path)
        # A second call, after another file appeared at the path, removes nothing.
        sock_path.write_text("someone else's")
        assert not owned.remove()
        assert sock_path.read_text() == "someone else's"


def test_a_replacement_bound_while_it_listens_is_left_alone(sock_path: Path) -> None:
    with _unix() as first, _unix() as second:
        owned = bind_unix(first, str(sock_path), key="server.uds", mode=INFERENCE_MODE)
        first.listen()
        sock_path.unlink()
        second.bind(str(sock_path))
        second.listen()
        assert not owned.is_current()
        assert not owned.remove()
        assert sock_path.is_socket() and socket_answers(str(sock_path))


def test_a_replacement_made_after_it_closed_is_left_alone(sock_path: Path) -> None:
    # The file system may give the new file the freed inode's number (ext4 does): the pinned
    # inode keeps the two apart.
    first = _unix()
    owned = bind_unix(first, str(sock_path), key="server.uds", mode=INFERENCE_MODE)
    first.listen()
    first.close()  # the listener stops; the file stays until the exit removes it
    sock_path.unlink()
    with _unix() as second:
        second.bind(str(sock_path))
        second.listen()
        assert not owned.remove()
        assert sock_path.is_socket() and socket_answers(str(sock_path))


def test_a_stale_socket_file_is_replaced(sock_path: Path) -> None:
    with _unix() as stale:
        stale.bind(str(sock_path))  # bound, never listening: what a killed process leaves
    with _unix() as sock:
        owned = bind_unix(sock, str(sock_path), key="server.uds", mode=INFERENCE_MODE)
        sock.listen()
        assert socket_answers(str(sock_path))
        assert owned.remove()


def test_a_live_socket_is_refused_and_left_alone(sock_path: Path) -> None:
    with _unix() as live, _unix() as sock:
        live.bind(str(sock_path))
        live.listen()
        with pytest.raises(ConfigError, match=r"^admin\.uds: another server is listening"):
            bind_unix(sock, str(sock_path), key="admin.uds", mode=OWNER_ONLY_MODE)
        assert socket_answers(str(sock_path))


def test_a_path_that_is_not_a_socket_is_an_os_error_and_kept(sock_path: Path) -> None:
    sock_path.write_text("data")
    with _unix() as sock, pytest.raises(OSError):
        bind_unix(sock, str(sock_path), key="server.uds", mode=INFERENCE_MODE)
    assert sock_path.read_text() == "data"
