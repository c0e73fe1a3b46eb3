"""The append-only audit log of rollout decisions: one JSON object per line.

Every decision (promotion, weights, approval requested / approved / rejected / superseded,
rollback, load, unload, a guard dropping a canary) is appended with who made it, when and why.
The file is opened in append mode for each record and never rewritten; the latest records are
also kept in memory for the admin API.

The file is opened once when the log is created, so that a path that cannot be written is a
config error at start-up rather than a refusal at the first decision. Of the path's folders,
only the file's own folder is created (when its parent exists): a typo in ``admin.audit_log``
does not create a tree of folders somewhere unexpected.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from infercore.errors import ConfigError

log = logging.getLogger("infercore.audit")

_encoder = msgspec.json.Encoder()


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _open_append(path: Path) -> int:
    # O_APPEND: each record lands whole at the end, whoever else appends.
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)


class AuditLog:
    """Appends records to ``path`` (JSON lines) and keeps the latest ``keep`` in memory.

    Args:
        path: The file; ``None`` keeps records in memory (and the log) only.
        keep: Records kept in memory.

    Raises:
        ConfigError: ``path`` cannot be opened for appending, or its folder's parent does not
            exist (``admin.audit_log``, the value and the fix).
    """

    def __init__(self, path: str | os.PathLike[str] | None, *, keep: int = 1000) -> None:
        self.path = Path(path) if path is not None else None
        self._recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=keep)
        self._lock = threading.Lock()
        if self.path is not None:
            self._prepare(self.path)

    @staticmethod
    def _prepare(path: Path) -> None:
        hint = "point admin.audit_log at a writable file in an existing folder, or unset it"
        folder = path.parent
        try:
            if folder.exists() and not folder.is_dir():
                raise ConfigError(
                    f"admin.audit_log: cannot create {str(path)!r}: {str(folder)!r} is not a "
                    "folder",
                    hint=hint,
                )
            if not folder.exists():
                # Only the file's own folder is created, and only inside an existing folder.
                if not folder.parent.is_dir():
                    raise ConfigError(
                        f"admin.audit_log: cannot create {str(path)!r}: {str(folder)!r} and "
                        f"{str(folder.parent)!r} do not exist (only the file's own folder is "
                        "created)",
                        hint=hint,
                    )
                folder.mkdir()
            os.close(_open_append(path))
        except OSError as exc:
            raise ConfigError(
                f"admin.audit_log: cannot write {str(path)!r} ({exc.strerror})", hint=hint
            ) from None

    def append(self, record: dict[str, Any], *, strict: bool = True) -> dict[str, Any]:
        """Write one record (``ts`` added); returns it.

        Args:
            record: The decision.
            strict: Raise when the file cannot be written (the decision is not made). When
                false (a decision already carried out), the record is kept in memory and
                logged with a warning instead.

        Raises:
            OSError: ``strict`` and the file could not be written.
        """
        entry = {"ts": now_iso(), **record}
        line = _encoder.encode(entry) + b"\n"
        failed: OSError | None = None
        with self._lock:
            if self.path is not None:
                try:
                    fd = _open_append(self.path)
                    try:
                        os.write(fd, line)
                    finally:
                        os.close(fd)
                except OSError as exc:
                    if strict:
                        raise
                    failed = exc
            self._recent.append(entry)
        if failed is not None:
            log.warning(
                "audit (not written to admin.audit_log: %s): %s",
                failed.strerror,
                line.decode().rstrip(),
            )
        else:
            log.info("audit: %s", line.decode().rstrip())
        return entry

    def recent(self, limit: int = 100) -> list[dict[str, Any]]:
        items = list(self._recent)
        return items[-limit:] if limit > 0 else []
