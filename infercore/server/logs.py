"""Structured logs: text for people, JSON lines for collectors; a request id where known."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Hashable
from typing import Any, TextIO

_STD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info and record.levelno >= logging.DEBUG:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


#: C0 and C1 controls, DEL and the Unicode line and paragraph separators. In a text log line
#: any of them lets a client-controlled string (a path, a model name, a header) end the line and
#: start a forged one (CR, LF), or drive the operator's terminal (ESC): CWE-117.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
#: The same but for LF and tab, which a traceback's own layout uses.
_TRACEBACK_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_control(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def escape_controls(text: str) -> str:
    """``text`` with its control characters written as Python escapes (``\\n``, ``\\x1b``), so
    that it stays on one line."""
    return _CONTROL.sub(_escape_control, text) if _CONTROL.search(text) else text


class TextFormatter(logging.Formatter):
    """``HH:MM:SS LEVEL logger: message key=value …``, one line per record, then the
    traceback when there is one.

    The line (message, arguments and extras) has its control characters escaped, so that
    whatever a client sent (a path, a model name, a header) stays on it. A traceback keeps the
    line breaks and tabs of its layout (it must stay readable), and only those.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        extras = {k: v for k, v in vars(record).items() if k not in _STD and not k.startswith("_")}
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return escape_controls(line)

    def formatException(self, ei: Any) -> str:
        # Its own lines stay lines; a CR or an ESC sequence in an exception's text cannot
        # overwrite what the terminal shows.
        text = super().formatException(ei)
        return _TRACEBACK_CONTROL.sub(_escape_control, text)


#: Runs a callback after a delay in seconds: ``(delay_s, callback)``.
Schedule = Callable[[float, Callable[[], None]], object]


def call_later(delay_s: float, callback: Callable[[], None]) -> None:
    """``loop.call_later`` on the running event loop; nothing without one (then the next line
    of the key, or :func:`flush_held_lines` at the stop, tells the count)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    loop.call_later(delay_s, callback)


class _Key:
    """One key's limit: when its next line may come, the lines held back since its last one,
    and that line (logger, level, text) for the line that tells their count."""

    __slots__ = ("due", "extra", "held", "level", "line", "logger")

    def __init__(self) -> None:
        self.due = 0.0
        self.held = 0
        self.logger = logging.getLogger()
        self.level = logging.WARNING
        self.line = ""
        #: The last line's structured fields (its request id left out: the count is no
        #: request's), for the line that tells the count (JSON logs keep model and reason).
        self.extra: dict[str, Any] | None = None


#: Every :class:`_HeldLines` alive, for :func:`flush_held_lines`.
_LIMITS: weakref.WeakSet[_HeldLines] = weakref.WeakSet()


class _HeldLines:
    """What :class:`FailureLog` and :class:`ClientWarningLimit` share: at most one line per key
    and interval, and the count of the lines held back told once, by the next line of the key
    or by a line of its own (:meth:`flush`; :meth:`hold` schedules one).

    ``note`` ends the line of its own: where the lines held back went.
    """

    def __init__(
        self, interval_s: float, clock: Callable[[], float], schedule: Schedule, note: str
    ) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self._schedule = schedule
        self._tell = f"%s (%d more like it since the last such line, {note})"
        self._keys: dict[Hashable, _Key] = {}
        _LIMITS.add(self)

    def hold(self, key: Hashable, now: float) -> _Key | None:
        """``None`` when a line of ``key`` now is held back (and counted); else the key's
        state, for :meth:`logged`."""
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _Key()
        if now < state.due:
            if not state.held:
                # The first held back since the key's last line: once an interval has passed
                # after the next line could have come, without one, a line tells the count.
                # One timer per key and interval of a flood, none per request.
                check = functools.partial(self._quiet, state, state.due)
                self._schedule(state.due - now + self.interval_s, check)
            state.held += 1
            return None
        return state

    def logged(
        self,
        state: _Key,
        now: float,
        logger: logging.Logger,
        level: int,
        line: str,
        extra: dict[str, Any] | None = None,
    ) -> int:
        """A line of the key is logged now: the count it tells (held back since the last)."""
        held = state.held
        state.due, state.held = now + self.interval_s, 0
        state.logger, state.level, state.line = logger, level, line
        state.extra = {k: v for k, v in extra.items() if k != "request_id"} if extra else None
        return held

    def _quiet(self, state: _Key, due: float) -> None:
        # The same ``due``: no line of the key was logged since the check was scheduled.
        if state.due == due and state.held:
            self._told(state)

    def _told(self, state: _Key) -> None:
        held, state.held = state.held, 0
        state.logger.log(state.level, self._tell, state.line, held, extra=state.extra)

    def flush(self) -> int:
        """Log, for every key with lines held back, one line with their count (the text of
        the key's last line, then ``(N more like it since the last such line, …)``); each
        count is told once. How many lines were logged."""
        told = [state for state in self._keys.values() if state.held]
        for state in told:
            self._told(state)
        return len(told)


def flush_held_lines() -> int:
    """:meth:`FailureLog.flush` and :meth:`ClientWarningLimit.flush` for every one alive: the
    server calls it as it stops, so that the lines held back last, after a flood's last line,
    are counted in the log. How many lines were logged."""
    return sum(limit.flush() for limit in list(_LIMITS))


def _text(msg: str, args: tuple[Any, ...]) -> str:
    """``msg % args`` as a log record makes its message, or ``msg`` when they do not fit."""
    try:
        return msg % args if args else msg
    except (TypeError, ValueError):
        return msg


class FailureLog:
    """Warnings about failed requests, at most one line per key and interval.

    Under overload a server answers thousands of 503s a second; a log line for each would
    cost the core more than the rejection itself and bury everything else in the log. The
    first failure of a key (model, reason) is logged at once; the ones after it within
    ``interval_s`` go to DEBUG only, and the next line logged for that key says how many
    there were. Once a flood stops, no next line comes: if none has come an interval after
    it could have, a line of its own says how many (the first line's text, then ``(N more
    like it since the last such line, logged at DEBUG)``), as :func:`flush_held_lines` does
    when the server stops. Every failure is counted in the metrics whatever is logged.

    Args:
        logger: Where the lines go.
        interval_s: Shortest time between two WARNING lines of one key.
        clock: Seconds, monotonic (tests pass their own).
        schedule: Runs the check for a count left untold (tests pass their own):
            ``loop.call_later`` on the running loop, nothing without one.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        schedule: Schedule = call_later,
    ) -> None:
        self._log = logger
        self._lines = _HeldLines(interval_s, clock, schedule, "logged at DEBUG")

    def warning(self, key: tuple[str, str], msg: str, *args: Any, extra: dict[str, Any]) -> None:
        self.log(logging.WARNING, key, msg, *args, extra=extra)

    def log(
        self,
        level: int,
        key: tuple[str, str],
        msg: str,
        *args: Any,
        extra: dict[str, Any],
        exc_info: bool = False,
    ) -> None:
        """Log at ``level`` unless ``key`` was logged less than ``interval_s`` ago (DEBUG then)."""
        lines = self._lines
        now = lines.clock()
        state = lines.hold(key, now)
        if state is None:
            self._log.debug(msg, *args, extra=extra, exc_info=exc_info)
            return
        held = lines.logged(state, now, self._log, level, _text(msg, args), extra)
        if held:
            msg += " (and %d more like it in the last %.0f s, logged at DEBUG)"
            args = (*args, held, lines.interval_s)
        self._log.log(level, msg, *args, extra=extra, exc_info=exc_info)

    def flush(self) -> int:
        """One line for each key with failures held back since its last line, saying how
        many (each told once); how many lines."""
        return self._lines.flush()


#: What uvicorn logs at WARNING for one request a client sent: the request is answered (a 400
#: counted in the metrics, or uvicorn's own 503 past ``limit_concurrency``), and a client
#: sending them in a loop would fill the log.
CLIENT_WARNINGS = frozenset(
    {
        "Invalid HTTP request received.",
        "Unsupported upgrade request.",
        "Exceeded concurrency limit.",
    }
)


class ClientWarningLimit(logging.Filter):
    """On uvicorn's logger: each of :data:`CLIENT_WARNINGS` at most once per ``interval_s``,
    as :class:`FailureLog` limits infercore's own failure lines; the next line logged says how
    many were left out since the one before. Those left out last, once the client stops, are
    counted by a line of their own (``… (N more like it since the last such line, left
    out)``) an interval after the next line could have come, or when the server stops
    (:func:`flush_held_lines`). Other records pass untouched.

    Args:
        interval_s: Shortest time between two lines of one message.
        clock: Seconds, monotonic (tests pass their own).
        schedule: As :class:`FailureLog`'s.
    """

    def __init__(
        self,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        schedule: Schedule = call_later,
    ) -> None:
        super().__init__()
        self._lines = _HeldLines(interval_s, clock, schedule, "left out")

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        if not isinstance(msg, str) or msg not in CLIENT_WARNINGS:
            return True
        lines = self._lines
        now = lines.clock()
        state = lines.hold(msg, now)
        if state is None:
            return False
        held = lines.logged(state, now, logging.getLogger(record.name), record.levelno, msg)
        if held:
            record.msg = f"{msg} (and %d more like it since the last such line, left out)"
            record.args = (held,)
        return True

    def flush(self) -> int:
        """One line for each message with lines left out since its last one, saying how many
        (each told once); how many lines."""
        return self._lines.flush()


#: The logger Python warnings go to (the name ``logging.captureWarnings`` uses).
WARNINGS_LOGGER = "py.warnings"
_warnings_log = logging.getLogger(WARNINGS_LOGGER)


#: Plugin packages whose loggers :func:`configure` set to the server's level.
_leveled: set[str] = set()


def plugin_packages() -> set[str]:
    """The top-level packages of the installed plugins (entry points of group ``infercore``),
    infercore's own left out: their loggers log at the server's level."""
    from importlib import metadata

    from infercore.plugin_manager import ENTRY_POINT_GROUP

    packages = set()
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        package = ep.module.split(".", 1)[0]
        if package and package != "infercore":
            packages.add(package)
    return packages


class _RootFilter(logging.Filter):
    """What infercore's handler on the root logger lets through: a plugin package's records
    at the server's level; any other library's at WARNING or the server's level, whichever is
    higher (a library that sets its own logger to INFO does not fill the log, nor print what
    its INFO lines hold); and only a record no handler below the root printed already (a
    library with a handler of its own that still propagates would print it twice)."""

    def __init__(self, level: int, packages: frozenset[str]) -> None:
        super().__init__()
        self.level = level
        self.library_level = max(level, logging.WARNING)
        self.packages = packages

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        floor = self.level if name.partition(".")[0] in self.packages else self.library_level
        if record.levelno < floor:
            return False
        logger: logging.Logger | None = logging.getLogger(name)
        while logger is not None and logger.parent is not None:  # stop at the root
            if any(not isinstance(h, logging.NullHandler) for h in logger.handlers):
                return False
            if not logger.propagate:
                break
            logger = logger.parent
        return True


def configure(level: str = "info", fmt: str = "text", stream: str = "stderr") -> None:
    """Route infercore's (and uvicorn's) logs, and Python warnings, to stderr (or stdout) in
    the chosen format; and every other logger's records too, through the root logger: the
    installed plugins' packages (``logging.getLogger(__name__)`` in a plugin) at ``level``,
    other libraries at WARNING or ``level``, whichever is higher (:class:`_RootFilter`)."""
    handler = logging.StreamHandler(sys.stdout if stream == "stdout" else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    for name in ("infercore", "uvicorn", "uvicorn.error", WARNINGS_LOGGER):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
    # Without a handler on the root logger, a plugin's or a library's line is dropped below
    # WARNING and printed bare (no time, level or logger; no JSON) above it. Handlers others
    # put there (a test's log capture) stay; the one an earlier call put there goes.
    try:
        packages = plugin_packages()
    except Exception:  # a broken installation: the plugin manager names it, not this
        packages = set()
    for package in packages | _leveled:
        logging.getLogger(package).setLevel(level.upper())
    _leveled.update(packages)
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not getattr(h, "infercore_root", False)]
    to_root = logging.StreamHandler(handler.stream)
    to_root.setFormatter(handler.formatter)
    to_root.addFilter(_RootFilter(logging.getLevelName(level.upper()), frozenset(_leveled)))
    to_root.infercore_root = True  # type: ignore[attr-defined]
    root.addHandler(to_root)
    # uvicorn logs a WARNING per malformed request (and per upgrade it cannot serve): a client
    # sending them in a loop would flood the log. At most one line per message every 10 s.
    uvicorn_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, ClientWarningLimit) for f in uvicorn_log.filters):
        uvicorn_log.addFilter(ClientWarningLimit())
    # A warning a library emits (a DeprecationWarning, say) is otherwise printed raw on stderr:
    # two lines, one of them an absolute file path, in the middle of JSON lines (S6).
    warnings.showwarning = _log_warning


def _log_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` that logs one WARNING line naming the module, not the file.

    Not ``logging.captureWarnings``: it logs ``warnings.formatwarning``'s text, which is the
    file's absolute path and the source line, on two lines.
    """
    if file is not None:
        # Asked for in a file of the caller's own: the standard rendering there.
        with contextlib.suppress(OSError):
            file.write(warnings.formatwarning(message, category, filename, lineno, line))
        return
    _warnings_log.warning(
        "%s: %s",
        category.__name__,
        message,
        extra={"source": f"{module_name(filename)}:{lineno}"},
    )


def module_name(filename: str) -> str:
    """The dotted module name of ``filename`` when it is under ``sys.path``, else its stem
    (``<string>`` and the like as they are).

    Warnings and event-loop stalls (:mod:`infercore.server.loopwatch`) are rare: the search
    costs nothing that matters.
    """
    if filename.startswith("<"):
        return filename
    best = ""
    for entry in sys.path:
        root = os.path.join(os.path.abspath(entry or os.curdir), "")
        if filename.startswith(root) and len(root) > len(best):
            best = root
    rel = filename[len(best) :] if best else os.path.basename(filename)
    stem = os.path.splitext(rel)[0]
    if stem.endswith(f"{os.sep}__init__"):
        stem = stem[: -len("__init__") - 1]
    return stem.replace(os.sep, ".")
