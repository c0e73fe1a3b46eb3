"""The rollout state on disk (``admin.state_file``): saved after every change, restored at start.

Without it a restart serves the recipe's rollout again: promotions, weights, the versions loaded
at run time and pending approvals are gone. With it, :class:`~infercore.lifecycle.Lifecycle`
writes a snapshot after every change (a load, an unload, a promotion, weights, a rollback, an
approval asked for or decided, a canary guard trip, drift actions starting) and restores it
when the server starts, after the recipe's versions have loaded and before it reports ready.

What a snapshot holds (JSON, ``format`` 1), per model:

- ``recipe``: the recipe's rollout as it was when the state was saved (its primary, each
  version's stage and weight, its ``repository`` folder). The state applies only to that
  recipe: if it changed, the recipe is what the operator means now, and it is served.
- ``primary``, ``previous`` (the rollback history) and, per version, its ``stage``, ``weight``,
  whether it is loaded, and the canary guard's last trip of it.
- each version loaded at run time from the model's repository folder, with the pins its load
  used (``path``, ``sha256``, and the digests of its companion files): it is loaded again with
  the same checks as an admin load, and only if the manifest still pins the same digests. One
  unloaded since is restored unloaded (not loaded, known: listed, in the rollback history,
  loaded again by name as before the restart, with what the manifest pins then); if its
  folder or its pin is gone from the repository it is forgotten, with a WARNING.
- ``drift_last_action_at``: when the drift monitor's actions last started (the cooldown).

and the pending approvals (ids, who asked, when, the step, and the primary and the version's
stage it was asked from: a file saved before these were recorded restores them from the state
it holds). Decided approvals are history: the audit log keeps them.

Restoring is all or nothing: the file is read and checked, the run-time versions are loaded,
and only when every part can be applied are the stages, weights and approvals set (in one step,
without awaiting). Otherwise the versions it loaded are dropped again, the recipe's rollout
serves, one ERROR names the file, what failed and the fix, and the file is left as it is until
the first change is saved (it is then moved aside to ``<file>.unapplied``). The drift cooldown
is the exception: it is restored whenever the file can be read, since it only ever delays a
drift action (a restart under drift must not retrain again).

The file is written atomically: a temporary file in the same folder, written, flushed to disk,
renamed over the old one (a crash before the rename leaves the old file whole), mode 0640.
A lock (``<file>.lock``, ``flock``) is held while the server runs: two servers never share one
state.

Writes happen off the event loop (:class:`StateWriter`): the snapshot is taken on the loop,
where the rollout lives, and one thread of its own encodes it, writes, fsyncs and renames. One
writer keeps the writes in order, and a snapshot handed over while another is being written
replaces any still waiting, so a burst of changes costs one more write, of the newest. The
server waits for the last write when it stops (:data:`FLUSH_TIMEOUT_S` at most). An admin call
answers once the write holding its change is done (it awaits the write's future; the event
loop serves on meanwhile): a 2xx means the change is on disk, and a restart after it, even a
SIGKILL, restores it. A write that fails does not undo the change (it is made and audited):
the call answers as it would have, the ERROR and
``infercore_rollout_state_save_failures_total`` say it is not saved. Changes that no call
waits for (a canary guard trip, drift actions starting) are written the same way, soon after.

Compatibility: a file is read by the infercore that wrote it, and by any other that reads its
``format``. Fields a record of it has that this infercore does not know (a newer one added
them) are ignored, with one WARNING naming them and the file; the next save writes the file
without them. A wrong type or a missing required field is refused as before, naming the field.
A file of a newer ``format`` (one whose records an older infercore must not read as its own) is
refused, naming both formats and the fix (upgrade infercore, or delete the file): the recipe's
rollout serves, and the file is moved aside to ``<file>.unapplied`` by the first change saved,
not overwritten. A field added to a record keeps the format only if it is optional, with a
default that means what files without it meant.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import logging
import math
import os
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from infercore.errors import ConfigError, InfercoreError, ShuttingDown
from infercore.lifecycle.audit import check_folder, now_iso
from infercore.runtime.repository import COMPANIONS_OPTION
from infercore.runtime.served import CANARY, PRIMARY, SHADOW, STAGES, UNLOADED

if TYPE_CHECKING:
    from infercore.lifecycle.manager import Lifecycle
    from infercore.runtime.served import ServedVersion

log = logging.getLogger("infercore.lifecycle")

FORMAT = 1
_MODE = 0o640
#: Records of the audit log that change what serves: a run that wrote one and kept no state
#: file leaves changes a restart does not restore.
CHANGES = frozenset(
    {
        "approval_requested",
        "approved",
        "promoted",
        "weights_set",
        "rolled_back",
        "loaded",
        "unloaded",
        "guard_tripped",
        "state_restored",
    }
)
#: Previous primaries remembered for rollback (as the runtime keeps them).
_HISTORY = 16
_PIN_KEYS = ("path", "sha256", COMPANIONS_OPTION)
_FIX = "delete the state file to start from the recipe's rollout"
#: How long a stopping server waits for the state file's last write.
FLUSH_TIMEOUT_S = 5.0


# --- the file --------------------------------------------------------------------------------


class StateFile:
    """The state file, its lock and its atomic writes.

    Args:
        path: ``admin.state_file``.
        audit_log: ``admin.audit_log`` (the two must be different files).

    Raises:
        ConfigError: The path cannot be written, its folder's parent does not exist, it is the
            audit log, or another server holds its lock (naming that server when it can).
    """

    def __init__(self, path: str | os.PathLike[str], *, audit_log: str | None = None) -> None:
        # The file a symlink points at: the lock is that file's, and the atomic rename
        # replaces it, not the link (two paths to one file are one state file).
        self.path = Path(os.path.realpath(path))
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.unapplied_path = self.path.with_name(self.path.name + ".unapplied")
        #: Set when a restore failed: the first save moves the unapplied file aside first.
        self.keep_aside = False
        self._lock_fd: int | None = None
        check_path(self.path, audit_log=audit_log, create=True)
        self._lock_fd = self._lock()
        self._remove_temporaries()

    def _lock(self) -> int:
        hint = "point admin.state_file at a writable file in an existing folder, or unset it"
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, _MODE)
        except OSError as exc:
            raise ConfigError(
                f"admin.state_file: cannot write {str(self.lock_path)!r} ({exc.strerror})",
                hint=hint,
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _holder(fd)
            os.close(fd)
            raise ConfigError(
                f"admin.state_file: {str(self.path)!r} is in use by another server{holder}",
                hint="each server keeps its own rollout state: stop the other server, or point "
                "admin.state_file at another file",
            ) from None
        with contextlib.suppress(OSError):
            info = msgspec.json.encode(
                {"pid": os.getpid(), "host": socket.gethostname(), "since": now_iso()}
            )
            os.ftruncate(fd, 0)
            os.pwrite(fd, info + b"\n", 0)
        return fd

    def _remove_temporaries(self) -> None:
        # Left by a server that died between writing and renaming; the lock says none writes.
        for tmp in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()

    def read(self) -> bytes | None:
        """The saved state; ``None`` when none was saved yet.

        Raises:
            OSError: The file exists but cannot be read.
        """
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def write(self, data: bytes) -> None:
        """Replace the file with ``data``, atomically and durably.

        Raises:
            OSError: Nothing was replaced (the old file, if any, is whole).
        """
        if self.keep_aside:
            if self.path.exists():
                os.replace(self.path, self.unapplied_path)
                log.warning(
                    "admin.state_file: the state that could not be restored at start-up was "
                    "moved aside to %s; the rollout now saved replaces it",
                    self.unapplied_path.name,
                )
            self.keep_aside = False
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _MODE)
            try:
                os.fchmod(fd, _MODE)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            _replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        # The rename itself reaches the disk with its folder.
        with contextlib.suppress(OSError):
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def close(self) -> None:
        """Release the lock (the server stops)."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _replace(src: Path, dst: Path) -> None:
    # A function of its own, so that a test can fail it: a crash between write and rename.
    os.replace(src, dst)


def _holder(fd: int) -> str:
    try:
        info = msgspec.json.decode(os.pread(fd, 512, 0).strip() or b"{}")
    except (OSError, msgspec.DecodeError):
        return ""
    if not isinstance(info, dict) or "pid" not in info:
        return ""
    return f" (pid {info.get('pid')} on {info.get('host', '?')}, since {info.get('since', '?')})"


class StateWriter:
    """Writes the state file on a thread of its own: in order, the newest snapshot, coalesced.

    :meth:`submit` (on the event loop) hands over a snapshot and returns at once, with a
    future the thread completes once a snapshot holding that change is on disk. The thread
    (started on the first one) encodes it and replaces the file; a snapshot submitted while
    another is being written waits, and replaces any that waited before it: after a burst of
    changes the file is written once more, with the newest (each snapshot holds the whole
    rollout, so the newest holds every change before it), and that write completes the
    futures of all of them.

    A write that fails counts the changes it carried in ``failures`` (a metric's ``inc``) and
    logs one ERROR; the writes after it that fail too only count, until one succeeds (an INFO
    says so).

    Args:
        store: The state file (its lock is released by :meth:`close`).
        failures: Called with the number of changes a failed write carried.
    """

    def __init__(self, store: StateFile, failures: Callable[[int], None]) -> None:
        self._store = store
        self._failures = failures
        self._cond = threading.Condition()
        self._waiting: dict[str, Any] | None = None
        #: The changes submitted since the last write began (what the next one carries).
        self._changes: list[Future[bool]] = []
        self._busy = False
        self._closing = False
        #: The thread ended; ``_release``: it releases the lock when it ends (a late close).
        self._done = False
        self._release = False
        self._failing = 0
        self._thread: threading.Thread | None = None
        #: Writes done, failed ones included (for tests and the log).
        self.writes = 0

    def submit(self, doc: dict[str, Any]) -> Future[bool]:
        """Write ``doc`` (a snapshot, see :func:`snapshot_doc`) soon, after any write running.

        Returns:
            A future, completed on the writer's thread once the write that carries ``doc`` (or
            a newer snapshot) is done: True when it is on disk (written, flushed, renamed),
            False when that write failed or the writer was closed first. Cancelling it only
            stops the waiting: the write happens all the same.
        """
        done: Future[bool] = Future()
        with self._cond:
            if self._closing:
                log.debug("admin.state_file: a change after the server stopped is not saved")
                done.set_result(False)
                return done
            self._waiting = doc
            self._changes.append(done)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="infercore-state-writer", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()
        return done

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._waiting is None and not self._closing:
                    self._cond.wait()
                doc, changes = self._waiting, self._changes
                if doc is None:  # closing, and everything is written
                    self._done = True
                    release = self._release
                    self._cond.notify_all()
                    break
                self._waiting, self._changes, self._busy = None, [], True
            saved = False
            try:
                saved = self._write(doc, len(changes))
            finally:
                with self._cond:
                    self._busy = False
                    self.writes += 1
                    self._cond.notify_all()
                for change in changes:
                    # Cancelled: its waiter went away (the client left); the write is done.
                    with contextlib.suppress(InvalidStateError):
                        change.set_result(saved)
        if release:
            self._store.close()

    def _write(self, doc: dict[str, Any], changes: int) -> bool:
        """Write ``doc``; True when it is on disk."""
        try:
            self._store.write(encode(doc))
        except Exception as exc:  # an OSError; anything else is a defect, handled alike
            self._failures(changes)
            self._failing += 1
            if self._failing == 1:
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                log.error(
                    "admin.state_file: the rollout could not be saved (%s); the change is "
                    "made, and a restart now would not restore it (until a save succeeds: "
                    "infercore_rollout_state_save_failures_total counts the changes)",
                    why,
                    exc_info=not isinstance(exc, OSError),
                )
            return False
        if self._failing:
            log.info(
                "admin.state_file: the rollout is saved again, after %d failed write(s)",
                self._failing,
            )
            self._failing = 0
        return True

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every submitted snapshot is written (or failed); False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._done or (self._waiting is None and not self._busy), timeout
            )

    def close(self, timeout: float = FLUSH_TIMEOUT_S) -> bool:
        """Write what is waiting, then stop the thread and release the lock.

        Returns:
            False when the last write took longer than ``timeout``: the thread releases the
            lock once it is done (the file is whole either way: the old state or the new).
        """
        with self._cond:
            if self._release:  # an earlier close left the lock to the thread
                return self._done
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        with self._cond:
            if thread is not None and not self._done:
                self._release = True
                return False
        self._store.close()
        return True


def check_path(
    path: str | os.PathLike[str], *, audit_log: str | None = None, create: bool = False
) -> None:
    """What ``admin.state_file`` must be, the rule of ``admin.audit_log``: a file (not a folder,
    not the audit log) in a folder that exists or whose parent does (only the file's own folder
    is created, by ``create``), writable. ``infercore config validate`` checks it without
    ``create``; the server, with. An empty path is no path: unset (``admin.state_file=`` on
    the command line), so nothing to check.

    Raises:
        ConfigError: The first problem, naming the path and the fix.
    """
    if not os.fspath(path):
        return
    path = Path(path)
    hint = "point admin.state_file at a writable file in an existing folder, or unset it"
    if audit_log is not None and os.path.realpath(audit_log) == os.path.realpath(path):
        raise ConfigError(
            "admin.state_file: it is admin.audit_log too",
            hint="give the state its own file, e.g. rollout-state.json beside the audit log",
        )
    if path.is_dir():
        raise ConfigError(f"admin.state_file: {str(path)!r} is a folder", hint=hint)
    if check_folder("admin.state_file", path, hint, create=create):
        # The file is replaced by a rename: its folder must be writable, whatever the file is.
        writable = os.access(path.parent, os.W_OK | os.X_OK)
    else:
        writable = create or os.access(path.parent.parent, os.W_OK | os.X_OK)
    if not writable:
        raise ConfigError(
            f"admin.state_file: cannot write in the folder of {str(path)!r} "
            f"({os.strerror(errno.EACCES)})",
            hint=hint,
        )


# --- what is saved ---------------------------------------------------------------------------
#
# Unknown fields are ignored (a newer infercore wrote them; :func:`unknown_fields` names them
# for a WARNING), so a field added to these records must be optional, with a default that
# means what files without it meant. A change an older reader must not ignore (a field that
# changes the meaning of another, a required field) takes a new FORMAT instead.


class SavedVersion(msgspec.Struct, kw_only=True):
    stage: Literal["candidate", "shadow", "canary", "primary", "retired"]
    weight: float = 0.0
    loaded: bool = True
    origin: Literal["recipe", "repository"] = "recipe"
    #: A version loaded from the repository: the pins its load used.
    pin: dict[str, Any] | None = None
    guard_trip: dict[str, Any] | None = None


class SavedModel(msgspec.Struct, kw_only=True):
    recipe: dict[str, Any]
    primary: str
    versions: dict[str, SavedVersion]
    previous: list[str] = msgspec.field(default_factory=list)
    drift_last_action_at: float | None = None


class SavedApproval(msgspec.Struct, kw_only=True):
    id: str
    model: str
    version: str
    to: str
    weight: float | None
    requested_by: str
    requested_at: str
    reason: str
    gates: list[str]
    #: The model's primary and the version's stage when it was asked for; absent from files
    #: saved before they were recorded (restored from the state the file holds).
    primary: str | None = None
    from_stage: Literal["candidate", "shadow", "canary", "primary", "retired"] | None = None
    status: str = "pending"
    decided_by: str | None = None
    decided_at: str | None = None
    decision_reason: str | None = None


class SavedState(msgspec.Struct, kw_only=True):
    format: int
    saved_at: str
    models: dict[str, SavedModel]
    approvals: list[SavedApproval] = msgspec.field(default_factory=list)
    run: str | None = None


def recipe_rollout(lifecycle: Lifecycle, model: str) -> dict[str, Any]:
    """The recipe's rollout of ``model``: what a saved state must have been saved with."""
    from infercore.runtime.runtime import default_primary

    mc = lifecycle.runtime.config.models[model]
    primary = mc.primary or default_primary(mc.versions)
    doc: dict[str, Any] = {
        "primary": primary,
        "versions": {
            v: [PRIMARY if v == primary else vc.stage, 0.0 if v == primary else vc.weight]
            for v, vc in sorted(mc.versions.items())
        },
        "repository": None,
    }
    repo = mc.repository
    if repo is not None:
        # Where run-time versions come from; not how they warm up.
        doc["repository"] = {
            "folder": repo.folder,
            "version_folder": repo.version_folder,
            "manifest": repo.manifest,
            "kind": repo.loader.get("kind"),
            "path": repo.loader.get("path"),
        }
    # Through JSON, so that it compares equal to what a file read back holds.
    return msgspec.json.decode(msgspec.json.encode(doc))  # type: ignore[no-any-return]


def snapshot(lifecycle: Lifecycle) -> bytes:
    """The rollout now, as the state file holds it."""
    return encode(snapshot_doc(lifecycle))


def encode(doc: dict[str, Any]) -> bytes:
    """A snapshot document as the file's bytes (indented JSON)."""
    return msgspec.json.format(msgspec.json.encode(doc), indent=2) + b"\n"


def snapshot_doc(lifecycle: Lifecycle) -> dict[str, Any]:
    """The rollout now, as a document of its own (nothing in it is shared with the rollout, so
    that another thread may encode it while the rollout changes)."""
    models: dict[str, Any] = {}
    for name, served in lifecycle.runtime.models.items():
        versions: dict[str, Any] = {}
        for v, sv in served.versions.items():
            doc: dict[str, Any] = {
                "stage": sv.stage,
                "weight": sv.weight if sv.stage == CANARY else 0.0,
            }
            if sv.origin == "repository":
                doc["origin"] = "repository"
                doc["pin"] = {k: copy.deepcopy(sv.node[k]) for k in _PIN_KEYS if k in sv.node}
            if sv.state == UNLOADED:
                doc["loaded"] = False
            trip = lifecycle.guard_trips.get((name, v))
            if trip is not None:
                doc["guard_trip"] = dict(trip)
            versions[v] = doc
        entry: dict[str, Any] = {
            "recipe": recipe_rollout(lifecycle, name),
            "primary": served.primary,
            "previous": [p for p in served.previous if p in versions],
            "versions": versions,
        }
        if served.drift is not None and served.drift.last_action_at is not None:
            entry["drift_last_action_at"] = served.drift.last_action_at
        models[name] = entry
    return {
        "format": FORMAT,
        "saved_at": now_iso(),
        "run": lifecycle.audit.run,
        "models": models,
        "approvals": [a.to_dict() for a in lifecycle.approvals.values() if a.status == "pending"],
    }


# --- restoring -------------------------------------------------------------------------------


class Unrestorable(Exception):
    """Why a saved state cannot be applied in full, and the fix."""

    def __init__(self, what: str, fix: str = _FIX) -> None:
        super().__init__(what)
        self.what = what
        self.fix = fix


@dataclass
class _ModelPlan:
    name: str
    primary: str
    previous: list[str]
    versions: dict[str, SavedVersion]
    #: Versions to load from the repository first (name -> pins).
    loads: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Versions loaded from the repository at run time and unloaded since: known again,
    #: unloaded (name -> the version, built but not loaded).
    known: dict[str, ServedVersion] = field(default_factory=dict)
    #: Such versions that cannot be known again (name -> why): forgotten, with a WARNING.
    forgotten: dict[str, str] = field(default_factory=dict)


_SHAPE = 'an object with "format": 1, "saved_at", "models" and "approvals"'
#: The keys of a model's ``recipe`` (see :func:`recipe_rollout`), and of its ``repository``.
_RECIPE_KEYS = ("primary", "versions", "repository")
_RECIPE_REPOSITORY_KEYS = ("folder", "version_folder", "manifest", "kind", "path")


def decode(raw: bytes) -> SavedState:
    """Parse a state file. Fields this infercore does not know are ignored (see
    :func:`read_state` for their names).

    Raises:
        Unrestorable: Not JSON, JSON of another shape, a state of a format this server does
            not read (a newer one's: the message names both formats and the fix), or invalid
            (naming the field: a wrong type, a missing required field).
    """
    return read_state(raw)[0]


def read_state(raw: bytes) -> tuple[SavedState, list[str]]:
    """Parse a state file: the state, and the fields of it this infercore does not know (a
    newer infercore wrote them), ignored, as :func:`unknown_fields` names them.

    Raises:
        Unrestorable: As :func:`decode`.
    """
    try:
        doc = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise Unrestorable(f"the file is not valid JSON ({exc}); it is damaged") from None
    if not isinstance(doc, dict) or "format" not in doc:
        raise Unrestorable(
            f"the file is JSON but not an infercore rollout state (expected {_SHAPE}; it "
            f"holds {_kind(doc)})",
            fix="point admin.state_file at a file of its own, which infercore writes (not one "
            "of yours), or " + _FIX,
        )
    version = doc["format"]
    if type(version) is int and version > FORMAT:
        # Its records may mean something this server would get wrong: not guessed at. The
        # file stays as it is until a change is saved, which moves it aside (*.unapplied).
        raise Unrestorable(
            f"the file holds rollout state format {version}, written by a newer infercore; "
            f"this infercore reads format {FORMAT}",
            fix=f"upgrade infercore to the version that wrote it (it reads format {version}), "
            "or delete the state file to start from the recipe's rollout",
        )
    if type(version) is not int or version != FORMAT:
        raise Unrestorable(
            f"the file holds rollout state format {version!r}; this server reads format {FORMAT}",
            fix="serve it with the infercore version that wrote it, or " + _FIX,
        )
    try:
        saved = msgspec.convert(doc, SavedState)
    except msgspec.ValidationError as exc:
        raise Unrestorable(f"the file is not a valid rollout state ({_named(doc, exc)})") from None
    for sm in saved.models.values():
        sm.recipe = known_recipe(sm.recipe)
    return saved, unknown_fields(doc)


def known_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    """A saved model's ``recipe`` without the keys this infercore does not write (a newer one
    may record more of the recipe; compared with what this one writes, they would read as a
    changed recipe)."""
    known = {k: v for k, v in recipe.items() if k in _RECIPE_KEYS}
    repository = known.get("repository")
    if isinstance(repository, dict):
        known["repository"] = {k: v for k, v in repository.items() if k in _RECIPE_REPOSITORY_KEYS}
    return known


def unknown_fields(doc: dict[str, Any]) -> list[str]:
    """The fields of a state document (one that converts to :class:`SavedState`) this
    infercore does not know, each named once, as where it is in any record:
    ``approvals[].risk``, ``models.<model>.versions.<version>.note``."""
    found: set[str] = set()

    def extra(record: Any, known: Any, where: str) -> None:
        if isinstance(record, dict):
            found.update(where + str(k) for k in record if k not in known)

    extra(doc, SavedState.__struct_fields__, "")
    for model in (doc.get("models") or {}).values():
        extra(model, SavedModel.__struct_fields__, "models.<model>.")
        recipe = model.get("recipe")
        extra(recipe, _RECIPE_KEYS, "models.<model>.recipe.")
        if isinstance(recipe, dict):
            extra(
                recipe.get("repository"),
                _RECIPE_REPOSITORY_KEYS,
                "models.<model>.recipe.repository.",
            )
        for version in (model.get("versions") or {}).values():
            extra(version, SavedVersion.__struct_fields__, "models.<model>.versions.<version>.")
    for approval in doc.get("approvals") or ():
        extra(approval, SavedApproval.__struct_fields__, "approvals[].")
    return sorted(found)


def _kind(doc: Any) -> str:
    if isinstance(doc, dict):
        return 'an object without "format"' if doc else "an empty object"
    if isinstance(doc, list):
        return "an array"
    if isinstance(doc, bool) or doc is None:
        return json_text(doc)
    return "a number" if isinstance(doc, int | float) else "a string"


def json_text(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def _named(doc: dict[str, Any], exc: msgspec.ValidationError) -> str:
    """``exc``'s message, naming the model and version where msgspec writes ``[...]`` (it
    hides the keys of a dict): ``at `$.models["m"].versions["3"].stage```."""
    text = str(exc)
    models = doc.get("models")
    if "[...]" not in text or not isinstance(models, dict):
        return text
    for name, model in models.items():
        where = f"$.models[{json_text(name)}]"
        try:
            msgspec.convert(model, SavedModel)
            continue
        except msgspec.ValidationError as inner:
            found = inner
        versions = model.get("versions") if isinstance(model, dict) else None
        for v, saved in versions.items() if isinstance(versions, dict) else ():
            try:
                msgspec.convert(saved, SavedVersion)
            except msgspec.ValidationError as deepest:
                return _rebased(deepest, f"{where}.versions[{json_text(v)}]")
        return _rebased(found, where)
    return text


def _rebased(exc: msgspec.ValidationError, where: str) -> str:
    text = str(exc)
    if " - at `$" in text:
        return text.replace(" - at `$", f" - at `{where}", 1)
    return f"{text} - at `{where}`"


def _plan(lifecycle: Lifecycle, saved: SavedState) -> list[_ModelPlan]:
    """Check every part of ``saved`` against the runtime as the recipe built it; change nothing.

    Raises:
        Unrestorable: The first part that cannot be applied.
    """
    runtime = lifecycle.runtime
    plans: list[_ModelPlan] = []
    for name, sm in saved.models.items():
        served = runtime.models.get(name)
        if served is None:
            raise Unrestorable(f"model {name!r} is not in the recipe any more")
        now = recipe_rollout(lifecycle, name)
        if sm.recipe != now:
            raise Unrestorable(
                f"model {name!r}: the recipe's rollout changed since the state was saved "
                f"({_recipe_change(sm.recipe, now)})",
                fix="put the recipe back, or delete the state file to serve the recipe's "
                "rollout (write into the recipe what you want to keep of the run-time changes)",
            )
        plan = _ModelPlan(name, sm.primary, list(sm.previous), dict(sm.versions))
        recipe_versions = set(runtime.config.models[name].versions)
        missing = sorted(recipe_versions - set(sm.versions))
        if missing:
            raise Unrestorable(f"model {name!r}: the state has no stage for version {missing[0]!r}")
        for v, vs in sm.versions.items():
            if vs.origin == "recipe":
                if v not in recipe_versions:
                    raise Unrestorable(f"model {name!r}: version {v!r} is not in the recipe")
                continue
            if v in recipe_versions:
                raise Unrestorable(
                    f"model {name!r}: version {v!r} is in the recipe now, not loaded at run time"
                )
            if vs.loaded or vs.stage == PRIMARY:  # an unloaded primary: refused below
                plan.loads[v] = _check_pin(lifecycle, name, v, vs)
                continue
            known = _known_unloaded(lifecycle, name, v)
            if isinstance(known, str):
                plan.forgotten[v] = known
                del plan.versions[v]
                plan.previous = [p for p in plan.previous if p != v]
            else:
                plan.known[v] = known
        _check_stages(lifecycle, plan)
        plans.append(plan)
    _check_approvals(saved, {p.name: p for p in plans})
    return plans


def _recipe_change(before: dict[str, Any], now: dict[str, Any]) -> str:
    if before.get("primary") != now.get("primary"):
        return f"primary {before.get('primary')!r} -> {now.get('primary')!r}"
    old, new = before.get("versions") or {}, now.get("versions") or {}
    added, removed = sorted(set(new) - set(old)), sorted(set(old) - set(new))
    if added or removed:
        parts = [f"added {', '.join(added)}"] if added else []
        parts += [f"removed {', '.join(removed)}"] if removed else []
        return "versions " + "; ".join(parts)
    for v in sorted(new):
        if old[v] != new[v]:
            return f"version {v!r}: stage/weight {old[v]} -> {new[v]}"
    return "its repository folder"


def _check_pin(lifecycle: Lifecycle, name: str, version: str, vs: SavedVersion) -> dict[str, Any]:
    """The pins of a version loaded at run time: the manifest must pin them still."""
    served = lifecycle.runtime.models[name]
    repo = served.repository
    pin = vs.pin or {}
    fix = (
        f"restore the folder of version {version!r} and its pin in the manifest of "
        f"models.{name}.repository, then restart; or " + _FIX
    )
    if repo is None:
        raise Unrestorable(f"model {name!r} has no repository to load version {version!r} from")
    if not isinstance(pin.get("path"), str) or not isinstance(pin.get("sha256"), str):
        raise Unrestorable(f"model {name!r} version {version!r}: the state has no digest pin")
    if vs.stage == PRIMARY and not vs.loaded:
        raise Unrestorable(f"model {name!r}: its primary {version!r} is not loaded")
    try:
        node = repo.loader_node(version)
    except OSError as exc:
        raise Unrestorable(
            f"model {name!r}: the repository manifest cannot be read ({exc.strerror})", fix=fix
        ) from None
    except InfercoreError as exc:
        raise Unrestorable(
            f"model {name!r} version {version!r} was loaded from the repository at run time, "
            f"and now: {lifecycle.runtime.scrub(exc.message)}",
            fix=fix,
        ) from None
    if node.get("path") != pin["path"] or node.get("sha256") != pin["sha256"]:
        raise Unrestorable(
            f"model {name!r} version {version!r}: the repository manifest now pins "
            f"{str(node.get('sha256'))[:12]}… for its artifact; the state was saved with "
            f"{pin['sha256'][:12]}…",
            fix=fix,
        )
    return pin


def _known_unloaded(lifecycle: Lifecycle, name: str, version: str) -> ServedVersion | str:
    """A version loaded from the repository at run time and unloaded since, built again (not
    loaded) as the repository has it now; or why it cannot be (its folder or pin is gone).

    Built as :meth:`Runtime.load` builds it (:meth:`Runtime.build_repository_version`), which
    loads it again later from the manifest (a load of a known repository version reads the
    manifest again, before the restart too).
    """
    runtime = lifecycle.runtime
    if runtime.models[name].repository is None:
        return "the model has no repository folder now"
    try:
        sv = runtime.build_repository_version(name, version)
    except OSError as exc:
        return f"the repository manifest cannot be read ({exc.strerror})"
    except InfercoreError as exc:
        return runtime.scrub(exc.message)
    sv.state = UNLOADED
    return sv


def _check_stages(lifecycle: Lifecycle, plan: _ModelPlan) -> None:
    served = lifecycle.runtime.models[plan.name]
    name = plan.name
    primaries = [v for v, vs in plan.versions.items() if vs.stage == PRIMARY]
    if primaries != [plan.primary]:
        raise Unrestorable(
            f"model {name!r}: the state's primary {plan.primary!r} is not its only version in "
            f"stage primary ({', '.join(primaries) or 'none'})"
        )
    total = 0.0
    for v, vs in plan.versions.items():
        if vs.stage not in STAGES:  # the Literal checks it; kept for safety
            raise Unrestorable(f"model {name!r} version {v!r}: unknown stage {vs.stage!r}")
        if not math.isfinite(vs.weight) or not 0.0 <= vs.weight <= 100.0:
            raise Unrestorable(f"model {name!r} version {v!r}: weight {vs.weight!r}")
        if vs.weight and vs.stage != CANARY:
            raise Unrestorable(f"model {name!r} version {v!r}: a {vs.stage} with a weight")
        if v == plan.primary and not vs.loaded:
            raise Unrestorable(f"model {name!r}: its primary {v!r} is not loaded")
        if vs.stage == SHADOW and served.shadow is None:
            raise Unrestorable(
                f"model {name!r}: version {v!r} is a shadow, and the model's router copies no "
                "requests to shadows"
            )
        if vs.stage == CANARY and vs.weight > 0:
            if not served.router.splits_traffic:
                raise Unrestorable(
                    f"model {name!r}: canary {v!r} has a weight, and the model's router sends "
                    "canaries no traffic"
                )
            named = served.router.named_versions()
            if named and v not in set(named.values()):
                raise Unrestorable(
                    f"model {name!r}: canary {v!r} has a weight and is in no arm of its router"
                )
            total += vs.weight
    if total > 100 + 1e-9:
        raise Unrestorable(f"model {name!r}: canary weights add up to {total:g}")


def _check_approvals(saved: SavedState, plans: dict[str, _ModelPlan]) -> None:
    seen: set[str] = set()
    for a in saved.approvals:
        plan = plans.get(a.model)
        if a.status != "pending" or a.id in seen:
            raise Unrestorable(f"approval {a.id!r}: not a pending approval, or listed twice")
        if plan is None or a.version not in plan.versions or a.to not in STAGES:
            raise Unrestorable(
                f"approval {a.id!r}: model {a.model!r} version {a.version!r} is not in the state"
            )
        seen.add(a.id)


async def restore(lifecycle: Lifecycle) -> None:
    """Restore the saved rollout (see the module); log what was done, or why not."""
    store = lifecycle.state
    if store is None:
        warn_unrestored_changes(lifecycle, "admin.state_file is not set")
        return
    try:
        raw = store.read()
    except OSError as exc:
        _failed(lifecycle, None, Unrestorable(f"the file cannot be read ({exc.strerror})"))
        return
    if raw is None:
        log.info("admin.state_file: no rollout state saved yet; the recipe's rollout serves")
        warn_unrestored_changes(lifecycle, "admin.state_file holds no saved state yet")
        return
    try:
        saved, unknown = read_state(raw)
    except Unrestorable as exc:
        _failed(lifecycle, None, exc)
        return
    if unknown:
        log.warning(
            "admin.state_file %r: ignored field(s) this infercore does not know: %s (a newer "
            "infercore wrote the file); the rest of the file is read as usual, and the next "
            "rollout change saves it without them",
            str(store.path),
            ", ".join(unknown),
        )
    _restore_cooldowns(lifecycle, saved)
    loaded: list[tuple[str, str]] = []
    try:
        plans = _plan(lifecycle, saved)
        for plan in plans:
            for version, pin in plan.loads.items():
                try:
                    await lifecycle.runtime.load(plan.name, version, pin=pin)
                except ShuttingDown:
                    raise
                except InfercoreError as exc:
                    raise Unrestorable(
                        f"model {plan.name!r} version {version!r} was loaded from the "
                        f"repository at run time, and did not load again: "
                        f"{lifecycle.runtime.scrub(exc.message)}",
                        fix=f"restore the folder of version {version!r} as the manifest pins "
                        "it, then restart; or " + _FIX,
                    ) from None
                loaded.append((plan.name, version))
        _check_primaries(lifecycle, plans)
    except Unrestorable as exc:
        await _discard(lifecycle, loaded)
        _failed(lifecycle, saved.saved_at, exc)
        return
    except ShuttingDown:
        await _discard(lifecycle, loaded)
        log.info("admin.state_file: not restored: the server is stopping")
        return
    except Exception as exc:  # a defect here must not stop the server: the recipe serves
        log.debug("restoring admin.state_file failed", exc_info=exc)
        await _discard(lifecycle, loaded)
        _failed(lifecycle, saved.saved_at, Unrestorable(f"{type(exc).__name__}: {exc}"))
        return
    await _apply(lifecycle, saved, plans)


def _check_primaries(lifecycle: Lifecycle, plans: list[_ModelPlan]) -> None:
    for plan in plans:
        served = lifecycle.runtime.models[plan.name]
        sv = served.versions[plan.primary]
        if not sv.ready and served.ready:
            raise Unrestorable(
                f"model {plan.name!r}: the saved primary {plan.primary!r} is {sv.state} "
                f"({sv.error or 'not ready'}), and the recipe's serves",
                fix="fix that version's artifact and restart, or " + _FIX,
            )


async def _discard(lifecycle: Lifecycle, loaded: list[tuple[str, str]]) -> None:
    for name, version in reversed(loaded):
        await lifecycle.runtime.discard(name, version)


async def _apply(lifecycle: Lifecycle, saved: SavedState, plans: list[_ModelPlan]) -> None:
    from infercore.lifecycle.manager import Approval

    runtime = lifecycle.runtime
    summary: list[str] = []
    # One step, no await: nothing routes by a half-restored table.
    for plan in plans:
        served = runtime.models[plan.name]
        recipe_primary = served.primary
        served.versions.update(plan.known)
        for v, vs in plan.versions.items():
            sv = served.versions[v]
            weight = vs.weight if vs.stage == CANARY else 0.0
            if sv.window is not None and (sv.stage, sv.weight) != (vs.stage, weight):
                sv.window.reset()
            sv.stage, sv.weight = vs.stage, weight
            if vs.guard_trip is not None:
                lifecycle.guard_trips[(plan.name, v)] = dict(vs.guard_trip)
        served.primary = plan.primary
        # As it was: the primary may be in it too (promoted again since), and stays.
        kept = [v for v in plan.previous if v in served.versions]
        served.previous = kept[-_HISTORY:]
        served.refresh()
        summary.append(_describe_plan(plan, recipe_primary))
    ids = []
    by_name = {plan.name: plan for plan in plans}
    for a in saved.approvals:
        approval = Approval(**msgspec.structs.asdict(a))
        # Saved before the context was recorded: the state the file holds is the best known.
        plan = by_name[a.model]
        if approval.primary is None:
            approval.primary = plan.primary
        if approval.from_stage is None:
            approval.from_stage = plan.versions[a.version].stage
        lifecycle.approvals[a.id] = approval
        ids.append(a.id)
    for plan in plans:
        lifecycle.pending_gauge(plan.name)
    unloads = [
        (plan.name, v)
        for plan in plans
        for v, vs in plan.versions.items()
        if not vs.loaded and v not in plan.known
    ]
    for name, version in unloads:
        try:
            await runtime.unload(name, version)
        except ShuttingDown:
            break  # stopping anyway; the file is as it was
    approvals = (
        f"{len(ids)} pending approval(s) ({', '.join(ids)})" if ids else "no pending approvals"
    )
    line = f"{'; '.join(summary) or 'no models'}; {approvals}"
    log.info("admin.state_file: restored the rollout saved at %s: %s", saved.saved_at, line)
    for plan in plans:
        for version, why in plan.forgotten.items():
            log.warning(
                "admin.state_file: model %s version %s was loaded from the repository at run "
                "time and unloaded since; it is forgotten (not listed, not in the rollback "
                "history): %s. To load it again, restore its folder and its pin in the "
                "manifest, then load it",
                plan.name,
                version,
                why,
            )
    lifecycle.audit.append(
        {
            "event": "state_restored",
            "actor": "server",
            "reason": f"admin.state_file, saved at {saved.saved_at}: {line}",
            "approvals": ids,
        },
        strict=False,
    )


def _describe_plan(plan: _ModelPlan, recipe_primary: str) -> str:
    parts = [f"primary {plan.primary}"]
    if plan.primary != recipe_primary:
        parts[0] += f" (the recipe's: {recipe_primary})"
    for v, vs in plan.versions.items():
        if vs.stage == CANARY:
            parts.append(f"canary {v} at {vs.weight:g} %")
        elif vs.stage == SHADOW:
            parts.append(f"shadow {v}")
    if plan.loads:
        parts.append(f"loaded from the repository: {', '.join(plan.loads)}")
    unloaded = [v for v, vs in plan.versions.items() if not vs.loaded]
    if unloaded:
        parts.append(f"unloaded: {', '.join(unloaded)}")
    return f"{plan.name}: {', '.join(parts)}"


def _restore_cooldowns(lifecycle: Lifecycle, saved: SavedState) -> None:
    for name, sm in saved.models.items():
        served = lifecycle.runtime.models.get(name)
        if served is not None and served.drift is not None and sm.drift_last_action_at:
            served.drift.restore_last_action(sm.drift_last_action_at)


def _failed(lifecycle: Lifecycle, saved_at: str | None, exc: Unrestorable) -> None:
    store = lifecycle.state
    assert store is not None
    store.keep_aside = store.path.exists()
    when = f" (saved at {saved_at})" if saved_at else ""
    log.error(
        "admin.state_file %r: the rollout state%s cannot be applied in full: %s. Nothing of it "
        "was restored: the recipe's rollout serves. Fix: %s. (The file is kept as it is until "
        "the first rollout change is saved, which moves it to %s.)",
        str(store.path),
        when,
        exc.what,
        exc.fix,
        store.unapplied_path.name,
    )
    lifecycle.runtime.metrics.rollout_state_restore_failures.inc()
    lifecycle.audit.append(
        {"event": "state_not_restored", "actor": "server", "reason": exc.what}, strict=False
    )


def warn_unrestored_changes(lifecycle: Lifecycle, why: str) -> None:
    """One WARNING when the audit log shows that the previous run changed the rollout: those
    changes are not restored (``why``), and how to keep them."""
    changes = [r for r in lifecycle.audit.previous_run() if r.get("event") in CHANGES]
    if not changes:
        return
    shown = [
        " ".join(str(r[k]) for k in ("event", "model", "version") if r.get(k) is not None)
        for r in changes[-5:]
    ]
    more = f" (latest {len(shown)} of {len(changes)})" if len(changes) > len(shown) else ""
    log.warning(
        "the previous run changed the rollout (audit log%s: %s), and %s: those changes are not "
        "restored, the recipe's rollout serves. To keep run-time rollout changes across "
        "restarts, set admin.state_file, or write them into the recipe",
        more,
        "; ".join(shown),
        why,
    )
    # Recorded, so that the next start (this run's records) does not warn again for them.
    lifecycle.audit.append(
        {
            "event": "rollout_not_restored",
            "actor": "server",
            "reason": f"{why}: the previous run's {len(changes)} rollout change(s) are not "
            "restored; the recipe's rollout serves",
        },
        strict=False,
    )
