"""The append-only audit log of rollout decisions: one JSON object per line.

Every decision (promotion, weights, approval requested / approved / rejected, rollback, load,
unload, a guard dropping a canary) is appended with who made it, when and why. The file is
opened in append mode for each record and never rewritten; the latest records are also kept
in memory for the admin API.
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

log = logging.getLogger("infercore.audit")

_encoder = msgspec.json.Encoder()


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AuditLog:
    """Appends records to ``path`` (JSON lines) and keeps the latest ``keep`` in memory.

    Args:
        path: The file; ``None`` keeps records in memory (and the log) only.
        keep: Records kept in memory.
    """

    def __init__(self, path: str | os.PathLike[str] | None, *, keep: int = 1000) -> None:
        self.path = Path(path) if path is not None else None
        self._recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=keep)
        self._lock = threading.Lock()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Write one record (``ts`` added); returns it.

        Raises:
            OSError: The file could not be written (the caller refuses the decision).
        """
        entry = {"ts": now_iso(), **record}
        line = _encoder.encode(entry) + b"\n"
        with self._lock:
            if self.path is not None:
                # O_APPEND: each record lands whole at the end, whoever else appends.
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                try:
                    os.write(fd, line)
                finally:
                    os.close(fd)
            self._recent.append(entry)
        log.info("audit: %s", line.decode().rstrip())
        return entry

    def recent(self, limit: int = 100) -> list[dict[str, Any]]:
        items = list(self._recent)
        return items[-limit:] if limit > 0 else []
