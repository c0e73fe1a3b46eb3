"""Unix socket files a listener creates, and removes at exit only while they are still its own.

Every Unix socket infercore listens on (``server.uds`` with one worker or several, and
``admin.uds``) is bound by :func:`bind_unix`, which returns a :class:`SocketFile`, and its file is
removed at exit by :meth:`SocketFile.remove`, which unlinks the path only while it still names
the file bound. A socket file can be replaced while its server runs: removed by hand (or by a
tool tidying a folder), then bound anew by a second server. Unlinking the path when the first
server stops would cut the second one off from every new client, with no error anywhere.

A file is known by its ``(st_dev, st_ino)``. A filesystem such as ext4 gives a freed inode's
number to the next file made in the folder, so the file bound here would share its number with
a replacement made once it is freed; a :class:`SocketFile` therefore holds an ``O_PATH``
descriptor of its file, which keeps the inode (and its number) alive until :meth:`remove`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Iterator

from infercore.errors import ConfigError

#: Permission bits of the inference socket: anyone on the host may connect, as with uvicorn.
INFERENCE_MODE = 0o666
#: Permission bits of the admin socket: only its owner may connect (RELIABILITY.md S1).
OWNER_ONLY_MODE = 0o600

# Linux-only; elsewhere nothing is pinned and only the number is compared.
_O_PATH: int = getattr(os, "O_PATH", 0)


class SocketFile:
    """A Unix socket file this process bound at ``path``, and the inode it was bound to."""

    def __init__(self, path: str, device: int, inode: int, pin: int | None) -> None:
        self.path = path
        self.device = device
        self.inode = inode
        self._pin = pin

    def is_current(self) -> bool:
        """Whether ``path`` still names the file bound (not a replacement, not nothing)."""
        try:
            st = os.lstat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == (self.device, self.inode)

    def remove(self) -> bool:
        """Unlink ``path`` if it still names the file bound; whether it did.

        Another server's file at the path is left alone. Safe to call more than once.
        """
        removed = False
        if self.is_current():
            with contextlib.suppress(OSError):
                os.unlink(self.path)
                removed = True
        # Released only after the comparison: until then no new file can have this inode.
        if self._pin is not None:
            with contextlib.suppress(OSError):
                os.close(self._pin)
            self._pin = None
        self.device = self.inode = -1  # matches no file: a second call removes nothing
        return removed


def socket_answers(path: str) -> bool:
    """Whether a server accepts connections on the Unix socket ``path``.

    A socket file nobody answers on was left by a process that died and may be replaced;
    binding over one that answers would silently take it over from the running server.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def bind_unix(sock: socket.socket, path: str, *, key: str, mode: int) -> SocketFile:
    """Bind ``sock`` at ``path``, a file with permission bits ``mode``; the file bound.

    A stale socket file at ``path`` (its server died without removing it) is replaced; one a
    server answers on is refused. The caller checked the path before loading anything
    (``infercore serve``); checked again here, just before binding, because a server may have
    started on it since.

    Args:
        sock: An unbound ``AF_UNIX`` socket.
        path: The socket file's path.
        key: The config path that errors name (``server.uds``, ``admin.uds``).
        mode: The file's permission bits (:data:`INFERENCE_MODE`, :data:`OWNER_ONLY_MODE`).

    Raises:
        ConfigError: A server answers on ``path``.
        OSError: The bind failed (a folder that cannot be written, a path that is not a socket).
    """
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            if socket_answers(path):
                raise ConfigError(
                    f"{key}: another server is listening on this socket",
                    hint="stop it, or choose another path",
                )
            os.unlink(path)
    # Made owner-only, then opened up to `mode`: never, even for a moment, more open than it.
    with _umask(0o177):
        sock.bind(path)
    pin: int | None = None
    try:
        if _O_PATH:
            pin = os.open(path, _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
            st = os.fstat(pin)
        else:  # pragma: no cover - not Linux
            st = os.lstat(path)
        bound = SocketFile(path, st.st_dev, st.st_ino, pin)
    except OSError:
        if pin is not None:
            os.close(pin)
        raise
    try:
        os.chmod(path, mode)
    except OSError:
        bound.remove()
        raise
    return bound
