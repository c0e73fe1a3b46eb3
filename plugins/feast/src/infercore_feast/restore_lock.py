"""Who materializes an emptied online store again, when several processes find it at once.

Every replica (and every worker process) checks the store on its own and finds it emptied
within the same ``empty_check_s``; each materializing it would write the same rows N times
into one store, N full scans of the offline source at once. The one that takes the lock
materializes; the others wait, take it in turn, and find the markers back (or, if the holder
failed or died, materialize themselves).

- Redis: a key in that Redis, ``SET key token NX PX ttl``, refreshed every third of the TTL
  while the materialization runs, released only by the token that took it (a compare and
  delete in one Lua call). A holder that died stops refreshing: its key expires after the
  TTL, and a waiting replica takes over.
- SQLite: the store is a file on one host, shared by the processes there (several server
  workers, several models' sources): an exclusive ``flock`` on a file next to it. The kernel
  releases it when its holder dies, so it needs no TTL.

Every method blocks (network or file): the feature source calls them in a thread.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from infercore_feast.config import FeastSourceConfig

try:
    import fcntl
except ImportError:  # not POSIX: no file lock (each process materializes on its own)
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("infercore.feast")

T = TypeVar("T")

# Both compare the holder's token first: a holder whose key expired (and was taken by another
# replica since) must neither extend nor delete the new holder's key.
_REFRESH = """
if redis.call("get", KEYS[1]) == ARGV[1] then
    return redis.call("pexpire", KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call("get", KEYS[1]) == ARGV[1] then
    return redis.call("del", KEYS[1])
end
return 0
"""


class RestoreLock:
    """One process at a time materializes the store again (this base: no coordination).

    Attributes:
        held: Whether this object holds the lock now.
        busy: Whether :meth:`hold_while` is running (it releases the lock itself).
    """

    def __init__(self) -> None:
        self.held = False
        self.busy = False

    def acquire(self) -> bool:
        """Take the lock if it is free, without waiting: whether it is held now."""
        self.held = True
        return True

    def release(self) -> None:
        """Release the lock if this object holds it."""
        self.held = False

    def hold_while(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` with the lock (taken by :meth:`acquire`) kept while it
        runs; released when it returns or raises."""
        self.busy = True
        try:
            return fn(*args, **kwargs)
        finally:
            self.release()
            self.busy = False

    def close(self) -> None:
        """Release the lock unless :meth:`hold_while` still runs; close connections."""
        if self.held and not self.busy:
            self.release()


class RedisRestoreLock(RestoreLock):
    """``SET key token NX PX ttl`` in the store's Redis, refreshed while held."""

    def __init__(self, url: str, key: str, *, ttl_s: float, socket_timeout_s: float) -> None:
        super().__init__()
        self.key = key
        self.ttl_ms = max(1, round(ttl_s * 1000))
        self._url = url
        self._socket_timeout_s = socket_timeout_s
        self._client: Any = None
        self._token: str | None = None

    def _redis(self) -> Any:
        if self._client is None:
            import redis  # Feast's redis extra brings it; only a Redis store needs it

            self._client = redis.Redis.from_url(
                self._url,
                socket_timeout=self._socket_timeout_s,
                socket_connect_timeout=self._socket_timeout_s,
            )
        return self._client

    def acquire(self) -> bool:
        token = secrets.token_hex(16)
        if self._redis().set(self.key, token, nx=True, px=self.ttl_ms):
            self._token, self.held = token, True
            return True
        return False

    def refresh(self) -> bool:
        """Extend the key's TTL if this object still holds it: whether it does."""
        token = self._token
        if token is None:
            return False
        return bool(self._redis().eval(_REFRESH, 1, self.key, token, self.ttl_ms))

    def release(self) -> None:
        token, self._token, self.held = self._token, None, False
        if token is not None:
            self._redis().eval(_RELEASE, 1, self.key, token)

    def hold_while(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        stop = threading.Event()
        refresher = threading.Thread(
            target=self._refresh_until, args=(stop,), name="infercore-feast-lock", daemon=True
        )
        self.busy = True
        refresher.start()
        try:
            return fn(*args, **kwargs)
        finally:
            stop.set()
            refresher.join(self._socket_timeout_s * 2 + 1)
            try:
                self.release()
            except Exception as exc:  # it expires by itself after the TTL
                log.warning(
                    "feast: the materialization lock could not be released (%s); it expires in %gs",
                    type(exc).__name__,
                    self.ttl_ms / 1000,
                )
            finally:
                self.busy = False

    def _refresh_until(self, stop: threading.Event) -> None:
        # A third of the TTL: two refreshes may fail (Redis busy, a slow reply) before the key
        # expires under a holder still at work.
        while not stop.wait(self.ttl_ms / 3000):
            try:
                if not self.refresh():
                    log.warning(
                        "feast: the materialization lock expired while this process "
                        "materialized (not refreshed within %gs); another one may materialize "
                        "at the same time",
                        self.ttl_ms / 1000,
                    )
                    return
            except Exception as exc:
                log.debug("feast: refreshing the materialization lock failed: %r", exc)

    def close(self) -> None:
        try:
            super().close()
        finally:
            client, self._client = self._client, None
            if client is not None and not self.busy:
                client.close()


class FileRestoreLock(RestoreLock):
    """An exclusive ``flock`` on ``path``, released by the kernel if its holder dies."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        if fcntl is None:
            return super().acquire()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # Per open file: another source of this process, opening the file on its own,
            # is refused as another process is.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fd, self.held = fd, True
        return True

    def release(self) -> None:
        fd, self._fd, self.held = self._fd, None, False
        if fd is not None:
            os.close(fd)  # closing the last descriptor of the open file releases the lock


def restore_lock(config: FeastSourceConfig, sqlite_path: Path) -> RestoreLock:
    """The lock that the sources materializing ``config``'s online store share."""
    if config.online_store == "redis":
        return RedisRestoreLock(
            config.redis_url,
            # In the store's database: a flush that empties the store drops it too.
            f"infercore:feast:{config.project}:materializing",
            ttl_s=config.materialize_lock_ttl_s,
            socket_timeout_s=config.redis_socket_timeout_s,
        )
    return FileRestoreLock(sqlite_path.with_name(sqlite_path.name + ".materialize.lock"))
