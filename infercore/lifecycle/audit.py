"""The append-only audit log of rollout decisions: one JSON object per line.

Every decision (promotion, weights, approval requested / approved / rejected / superseded,
rollback, load, unload, a guard dropping a canary) is appended with who made it, when and why.
The file is opened in append mode for each record and never rewritten; the latest records are
also kept in memory for the admin API.

The file is opened once when the log is created, so that a path that cannot be written is a
config error at start-up rather than a refusal at the first decision. Of the path's folders,
only the file's own folder is created (when its parent exists): a typo in ``admin.audit_log``
does not create a tree of folders somewhere unexpected.

When the log is created its latest records are read back from the file (up to ``keep``, read
from the end in bounded chunks), so that ``GET /admin/audit`` shows the previous runs' records
after a restart. A last line cut short by a crash is skipped (with a warning), and the next
record starts on a line of its own. Every record carries ``run``: an id of the server run that
wrote it, so that a server can tell what its predecessor did (:meth:`AuditLog.previous_run`).
"""

from __future__ import annotations

import collections
import logging
import os
import secrets
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from infercore.errors import ConfigError

log = logging.getLogger("infercore.audit")

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()
#: Bytes read back per chunk, and at most per record kept, from the end of the file.
_CHUNK = 64 * 1024
_BYTES_PER_RECORD = 4096


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _open_append(path: Path) -> int:
    # O_APPEND: each record lands whole at the end, whoever else appends.
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)


def check_folder(key: str, path: Path, hint: str, *, create: bool = False) -> bool:
    """The folder rule of ``admin.audit_log`` and ``admin.state_file``: the file's folder is a
    folder, or is missing inside an existing one (only the file's own folder is ever created:
    a typo does not create a tree somewhere unexpected).

    Args:
        key: The config path, for the messages.
        path: The file.
        hint: The fix, for the messages.
        create: Make the missing folder.

    Returns:
        Whether the folder existed.

    Raises:
        ConfigError: The folder is a file, or it and its parent are missing, or (``create``) it
            could not be made.
    """
    folder = path.parent
    if folder.exists() and not folder.is_dir():
        raise ConfigError(
            f"{key}: cannot create {str(path)!r}: {str(folder)!r} is not a folder", hint=hint
        )
    if folder.exists():
        return True
    if not folder.parent.is_dir():
        raise ConfigError(
            f"{key}: cannot create {str(path)!r}: {str(folder)!r} and {str(folder.parent)!r} "
            "do not exist (only the file's own folder is created)",
            hint=hint,
        )
    if create:
        try:
            folder.mkdir()
        except OSError as exc:
            raise ConfigError(
                f"{key}: cannot create {str(folder)!r} ({exc.strerror})", hint=hint
            ) from None
    return False


class AuditLog:
    """Appends records to ``path`` (JSON lines) and keeps the latest ``keep`` in memory.

    Args:
        path: The file; ``None`` or empty (``admin.audit_log=`` on the command line) keeps
            records in memory (and the log) only.
        keep: Records kept in memory.

    Raises:
        ConfigError: ``path`` cannot be opened for appending, or its folder's parent does not
            exist (``admin.audit_log``, the value and the fix).
    """

    def __init__(self, path: str | os.PathLike[str] | None, *, keep: int = 1000) -> None:
        self.path = Path(path) if path is not None and os.fspath(path) else None
        self._recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=keep)
        self._lock = threading.Lock()
        #: This server run's id, in every record it appends.
        self.run = secrets.token_hex(4)
        #: The records read back from the file when the log was created, oldest first.
        self.tail: list[dict[str, Any]] = []
        #: The file does not end with a newline (a write cut short): the next record starts
        #: a new line, so that it is not glued to the torn one.
        self._torn = False
        if self.path is not None:
            self._prepare(self.path)
            self.tail, self._torn = _read_tail(self.path, keep)
            self._recent.extend(self.tail)

    @staticmethod
    def _prepare(path: Path) -> None:
        hint = "point admin.audit_log at a writable file in an existing folder, or unset it"
        check_folder("admin.audit_log", path, hint, create=True)
        try:
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
        entry = {"ts": now_iso(), "run": self.run, **record}
        line = _encoder.encode(entry) + b"\n"
        failed: OSError | None = None
        with self._lock:
            if self.path is not None:
                try:
                    fd = _open_append(self.path)
                    try:
                        os.write(fd, b"\n" + line if self._torn else line)
                        self._torn = False
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

    def previous_run(self) -> list[dict[str, Any]]:
        """The records the file holds of the run before this one (the run of its last record
        read back), oldest first; records from before run ids count as one run."""
        if not self.tail:
            return []
        last = self.tail[-1].get("run")
        out: list[dict[str, Any]] = []
        for record in reversed(self.tail):
            if record.get("run") != last:
                break
            out.append(record)
        out.reverse()
        return out


def _read_tail(path: Path, keep: int) -> tuple[list[dict[str, Any]], bool]:
    """The last ``keep`` records of the file (oldest first), and whether it ends without a
    newline. Reads backwards in chunks, at most ``keep`` * 4 KiB (records are far smaller), so
    a long history costs no more than its tail; lines that do not parse are skipped."""
    if keep <= 0:
        return [], False
    cap = max(_CHUNK, keep * _BYTES_PER_RECORD)
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            if size == 0:
                return [], False
            fh.seek(size - 1)
            torn = fh.read(1) != b"\n"
            chunks: list[bytes] = []
            pos, read, newlines = size, 0, 0
            while pos > 0 and read < cap and newlines <= keep:
                step = min(_CHUNK, pos, cap - read)
                pos -= step
                fh.seek(pos)
                data = fh.read(step)
                chunks.append(data)
                read += len(data)
                newlines += data.count(b"\n")
    except OSError as exc:
        log.warning(
            "admin.audit_log: cannot read back the latest records (%s); GET /admin/audit shows "
            "this run's only",
            exc.strerror,
        )
        return [], False
    lines = b"".join(reversed(chunks)).split(b"\n")
    if pos > 0:
        lines = lines[1:]  # the first one is cut at the start of the bytes read
    records: list[dict[str, Any]] = []
    skipped = 0
    for raw in lines:
        if not raw.strip():
            continue
        try:
            record = _decoder.decode(raw)
        except msgspec.DecodeError:
            skipped += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            skipped += 1
    if skipped:
        log.warning(
            "admin.audit_log: %d line(s) that are not a JSON record were skipped when reading "
            "back the latest records (a line cut short by a crash?)",
            skipped,
        )
    return records[-keep:], torn
